"""The README's example of another stack calling our ops on its own pages runs as written (on
the CPU through Triton's interpreter in float32, bf16 on a GPU) and computes what the float64
reference computes on the gathered pages."""
import re
from pathlib import Path

import torch

from reference import apply_rope, causal_gqa_attention, gather_pages
from tests.ops.conftest import CUDA, DEVICE, assert_close

MARKER = "<!-- paged-ops-example: run by tests/test_readme_paged_example.py -->"


def _example() -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.S)
    assert block, "the README lost its paged-ops example"
    return "\n".join(line[2:] for line in block.group(1).splitlines())  # a list item's indent


def test_readme_paged_ops_example():
    code = _example()
    here = 'dev, dt = "cuda", torch.bfloat16'
    assert here in code
    if not CUDA:  # the interpreter: float32 (bf16 dots are broken there), CPU tensors
        code = code.replace(here, f'dev, dt = "{DEVICE}", torch.float32')
    torch.manual_seed(0)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    heads, kv, D, H = env["heads"], env["kv_heads"], env["D"], env["H"]
    x, w, pos, table = env["x"], env["w_qkv"], env["pos"], env["block_table"]
    dt = env["dt"]
    qkv = (x[:, 0].double() @ w.double().T).view(2, 1, heads + 2 * kv, D)
    inv_freq = 10000.0 ** (-torch.arange(D // 2, dtype=torch.float64) / (D // 2))
    rot = apply_rope(qkv[:, :, :heads + kv].cpu(), pos.long().cpu()[:, None], inv_freq)
    q_ref, k_new, v_new = rot[:, 0, :heads], rot[:, 0, heads:], qkv[:, 0, heads + kv:].cpu()
    assert_close(env["q"][:, 0], q_ref, dt)
    for b, page, slot in ((0, 60, 2), (1, 9, 12)):  # the README's comment
        assert table[b, int(pos[b]) // 16] == page and int(pos[b]) % 16 == slot
        assert_close(env["k_pages"][page, slot], k_new[b], dt)
        assert_close(env["v_pages"][page, slot], v_new[b], dt)
    k = gather_pages(env["k_pages"].double().cpu(), table.cpu())
    v = gather_pages(env["v_pages"].double().cpu(), table.cpu())
    n = k.shape[1]
    ref = causal_gqa_attention(env["q"].double().cpu(), k, v, pos.long().cpu()[:, None],
                               torch.arange(n).expand(2, n))
    assert_close(env["out"], ref[:, 0], dt)
