"""One whole decoder layer built from the ops, compiled by inductor: no graph breaks, and the
compiled layer computes what the eager one does (the ops are opaque to inductor, so exactly)."""
import torch

import reference
from d3kernels.model import rope_tables
from d3kernels.config import LlamaConfig
from d3kernels.ops.attention import attention_decode, attention_decode_workspace
from d3kernels.ops.qkv_rope import qkv_rope
from d3kernels.ops.swiglu import down_residual, swiglu_gate_up
from tests.ops.conftest import DEVICE, assert_close, randn
from tests.ops.paged import shuffled_block_table

EPS = 1e-5


def _decode_layer(residual, pos, context, attn_norm, w_qkv, w_o, mlp_norm, w_gate_up, w_down,
                  cos, sin, k_cache, v_cache, block_table, workspace, heads, kv_heads):
    """The triton backend's decode layer: 5 launches, the residual updated in place."""
    B = residual.shape[0]
    q = qkv_rope(residual[:, None], w_qkv, cos, sin, pos, k_cache, v_cache, block_table,
                 num_heads=heads, num_kv_heads=kv_heads, norm_weight=attn_norm, eps=EPS)
    attn = attention_decode(q[:, 0], k_cache, v_cache, block_table, context,
                            workspace=workspace)
    down_residual(attn.reshape(B, -1), w_o, residual)
    down_residual(swiglu_gate_up(residual, w_gate_up, norm_weight=mlp_norm, eps=EPS), w_down,
                  residual)
    return residual


def test_decoder_layer_compiles_with_inductor():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=160, num_layers=1,
                      num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    B, T, S = 3, 32, 8  # S: the page size
    H, Q, K, I = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    w = dict(attn_norm=1 + 0.3 * randn(H), w_qkv=randn(Q + 2 * K, H, scale=H ** -0.5),
             w_o=randn(H, Q, scale=Q ** -0.5), mlp_norm=1 + 0.3 * randn(H),
             w_gate_up=randn(2 * I, H, scale=H ** -0.5), w_down=randn(H, I, scale=I ** -0.5))
    cos, sin = rope_tables(cfg, T, torch.float32, DEVICE)
    pos = torch.tensor([5, 0, 17], dtype=torch.int32, device=DEVICE)
    context = pos + 1
    residual = randn(B, H)
    # each row's pages up to its position, shuffled in a pool with spare pages
    table = shuffled_block_table([1, 1, 3], T // S, 8, seed=0)
    history = tuple(randn(8, S, cfg.num_kv_heads, cfg.head_dim) for _ in "kv")

    def run(layer):
        k, v = (c.clone() for c in history)
        ws = attention_decode_workspace(B, cfg.num_heads, cfg.head_dim, 2, DEVICE)
        return layer(residual.clone(), pos, context, *w.values(), cos, sin, k, v, table, ws,
                     cfg.num_heads, cfg.num_kv_heads), k, v

    eager = run(_decode_layer)
    compiled = run(torch.compile(_decode_layer, fullgraph=True, backend="inductor"))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    # and the layer is the reference's: norm, attention over the cache, MLP
    x = residual.double().cpu()
    ref = {k: t.double().cpu() for k, t in w.items()}
    # [B, T, kv_heads, D] -> [B, kv_heads, T, D], the rows' caches as the reference reads them
    k_ref, v_ref = (reference.gather_pages(c, table).double().cpu().transpose(1, 2)
                    for c in eager[1:])
    h = reference.rms_norm(x, ref["attn_norm"], EPS)
    q = (h @ ref["w_qkv"][:Q].T).view(B, 1, cfg.num_heads, cfg.head_dim)
    q = reference.apply_rope(q, pos.long().cpu()[:, None],
                             reference.rope_inv_freq(cfg.head_dim, cfg.rope_theta))[:, 0]
    kv = (h @ ref["w_qkv"][Q:].T).view(B, 1, 2 * cfg.num_kv_heads, cfg.head_dim)
    k_new = reference.apply_rope(kv[:, :, :cfg.num_kv_heads], pos.long().cpu()[:, None],
                                 reference.rope_inv_freq(cfg.head_dim, cfg.rope_theta))[:, 0]
    rows = torch.arange(B)
    assert_close(k_ref[rows, :, pos.long().cpu()], k_new, torch.float32)
    assert_close(v_ref[rows, :, pos.long().cpu()], kv[:, 0, cfg.num_kv_heads:], torch.float32)
    outs = []
    for b in range(B):
        n = int(context[b])
        kb = k_ref[b, :, :n].repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 0)
        vb = v_ref[b, :, :n].repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 0)
        p = torch.softmax(q[b, :, None] @ kb.transpose(1, 2) / cfg.head_dim ** 0.5, dim=-1)
        outs.append((p @ vb)[:, 0].reshape(-1))
    x = x + torch.stack(outs) @ ref["w_o"].T
    x = x + reference.swiglu_mlp(reference.rms_norm(x, ref["mlp_norm"], EPS),
                                 ref["w_gate_up"][:I], ref["w_gate_up"][I:], ref["w_down"])
    assert_close(compiled[0], x, torch.float32)
