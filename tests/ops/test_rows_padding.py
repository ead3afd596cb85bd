"""The ``rows`` contract shared by every op: an entry -1 is a padding slot, skipped, so a
fixed-size row list (a CUDA graph's) can hold fewer rows. Each op, given the same rows with
padding slots mixed in, writes exactly what it writes without them, and nothing else."""
import pytest
import torch

from d3kernels.model import rope_tables
from d3kernels.config import LlamaConfig
from d3kernels.ops.attention import attention_decode, attention_prefill
from d3kernels.ops.decode_embed import decode_embed
from d3kernels.ops.lm_head import lm_head
from d3kernels.ops.qkv_rope import qkv_rope
from d3kernels.ops.rms_norm import rms_norm
from d3kernels.ops.swiglu import down_residual, swiglu_gate_up
from tests.ops.conftest import DEVICE, poisoned, randn
from tests.ops.paged import shuffled_block_table

M, H, I, V, T, S = 5, 96, 160, 300, 24, 8  # S: the page size of the caches
CFG = LlamaConfig(V, H, I, 1, 6, 2, 16)


def i32(xs):
    return torch.tensor(xs, dtype=torch.int32, device=DEVICE)


def _cases():
    """(name, run(rows) -> the tensors the op writes), on inputs drawn once."""
    torch.manual_seed(0)
    x, w_qkv = randn(M, H), randn(CFG.q_size + 2 * CFG.kv_size, H, scale=H ** -0.5)
    norm = 1 + 0.3 * randn(H)
    cos, sin = rope_tables(CFG, T, torch.float32, DEVICE)
    pos = i32([3, 7, 0, 11, 5])
    # every row holds its T positions, in shuffled pages of a pool with two spare pages
    num_pages = M * T // S + 2
    table = shuffled_block_table([T // S] * M, T // S, num_pages, seed=0)
    kv = randn(num_pages, S, 2, 16), randn(num_pages, S, 2, 16)
    q1, q4 = randn(M, 6, 16), randn(M, 4, 6, 16)
    h, w_gu, w_down, w_lm = randn(M, I), randn(2 * I, H, scale=H ** -0.5), \
        randn(H, I, scale=I ** -0.5), randn(V, H, scale=H ** -0.5)
    embed = randn(V, H)

    def qkv(rows):
        k, v = (c.clone() for c in kv)
        q = qkv_rope(x[:, None], w_qkv, cos, sin, pos, k, v, table, num_heads=6, num_kv_heads=2,
                     rows=rows, q_out=poisoned((M, 1, 6, 16), torch.float32), norm_weight=norm)
        return q, k, v

    def down(rows):
        res, stash = x.clone(), poisoned((2, num_pages, S, H), torch.float32)
        down_residual(h, w_down, res, rows=rows, stash=stash, stash_index=i32([1, 0, -1, 0, 1]),
                      positions=pos, block_table=table)
        return res, stash

    def head(rows):
        p = pos.clone()
        t = lm_head(x, norm, w_lm, 1e-5, rows=rows, logits_out=poisoned((M, V), torch.float32),
                    tokens_out=torch.full((M,), -5, device=DEVICE), positions=p)
        return t, p

    def embed_step(rows):
        res, ctx = poisoned((M, H), torch.float32), torch.full((M,), -3, dtype=torch.int32,
                                                                 device=DEVICE)
        tokens = rows.clamp(min=0).long() * 7  # row b embeds token 7b, padded or not
        written = torch.zeros(3, num_pages, S, dtype=torch.bool, device=DEVICE)
        decode_embed(tokens, embed, pos, res, ctx, rows=rows, written=written,
                     mark=torch.ones(3, dtype=torch.bool, device=DEVICE), block_table=table)
        return res, ctx, written

    return {
        "rms_norm": lambda rows: rms_norm(x, norm, 1e-5, rows=rows,
                                          out=poisoned((M, H), torch.float32))[:1],
        "qkv_rope": qkv,
        "attention_decode": lambda rows: (attention_decode(
            q1, *kv, table, pos + 1, rows=rows, out=poisoned((M, 6, 16), torch.float32),
            num_splits=3),),
        "attention_prefill": lambda rows: (attention_prefill(
            q4, *kv, table, pos, i32([4, 2, 1, 4, 3]), rows=rows,
            out=poisoned((M, 4, 6, 16), torch.float32)),),
        "swiglu_gate_up": lambda rows: (swiglu_gate_up(
            x, w_gu, rows=rows, out=poisoned((M, I), torch.float32), norm_weight=norm),),
        "down_residual": down,
        "lm_head": head,
        "decode_embed": embed_step,
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_padding_slots_are_skipped(name):
    run = CASES[name]
    plain = run(i32([3, 0, 2]))
    padded = run(i32([-1, 3, -1, 0, 2]))
    for a, b in zip(plain, padded):
        assert torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0)), name
