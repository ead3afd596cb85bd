import torch

from reference.llama import llama_forward
from reference.schedule import depth_at, kept_layers


def d3_generate(weights: dict, cfg, prompt: list[int], max_new_tokens: int, *, alpha: float,
                start: int = 0, min_depth: int | None = None, head: int, tail: int,
                order="lower", stop_tokens=()) -> tuple[list[int], list[int]]:
    """Greedy D³ generation by masked full-sequence recompute, no KV cache (the oracle).

    Every step runs the whole sequence through all layers; position t keeps layer j's output
    only where the depth of the pass that consumed t keeps j. Prompt positions, whose pass
    predicts T_0, are full depth; the position holding T_{i-1} belongs to the pass predicting T_i.
    Returns (generated token ids, depth of the pass that predicted each).
    """
    L = cfg.num_layers
    min_depth = head + tail if min_depth is None else min_depth
    seq = list(prompt)
    keep_rows = [[True] * L for _ in prompt]  # per position, which layers its pass ran
    tokens, depths = [], []
    for i in range(max_new_tokens):
        depth = L if i == 0 else depth_at(i, L, alpha, start, min_depth)
        if i > 0:  # the newest position is the input of the pass predicting T_i
            kept = set(kept_layers(depth, L, head, tail, order))
            keep_rows[-1] = [j in kept for j in range(L)]
        ids = torch.tensor([seq])
        keep = torch.tensor([keep_rows])
        logits = llama_forward(weights, cfg, ids, keep)[0, -1]
        token = int(logits.argmax())
        tokens.append(token)
        depths.append(depth)
        if token in stop_tokens:
            break
        seq.append(token)
        keep_rows.append([True] * L)
    return tokens, depths
