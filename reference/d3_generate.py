import torch

from reference.llama import llama_forward
from reference.schedule import depth_at, kept_layers


def d3_generate_turn(weights: dict, cfg, prompt: list[int], max_new_tokens: int, *,
                     alpha: float, start: int = 0, min_depth: int | None = None, head: int,
                     tail: int, order="lower", stop_tokens=(),
                     history_keep: list[list[bool]] | None = None, backfill: str = "propagate"
                     ) -> tuple[list[int], list[int], list[list[bool]]]:
    """One reply of a conversation by masked full-sequence recompute (the oracle).

    ``prompt`` is the whole sequence so far. ``history_keep`` gives, for its first positions,
    which layers each one's pass ran (rows of L bools; the rows a previous turn returned);
    the other prompt positions are the new turn, full depth. The schedule restarts at i = 0.
    Returns (generated token ids, depth of the pass that predicted each, keep rows of
    prompt + generated tokens). The last generated token's row is full depth: no pass of this
    reply consumed it, so it enters the sequence with the next turn's full-depth prefill.
    backfill: "propagate" or "mask" (see :func:`reference.llama.llama_forward`).
    """
    L = cfg.num_layers
    min_depth = head + tail if min_depth is None else min_depth
    history_keep = [list(row) for row in (history_keep or [])]
    if len(history_keep) > len(prompt) or any(len(row) != L for row in history_keep):
        raise ValueError(f"history_keep must hold at most len(prompt)={len(prompt)} rows of "
                         f"{L} bools")
    seq = list(prompt)
    # per position, which layers its pass ran
    keep_rows = history_keep + [[True] * L for _ in prompt[len(history_keep):]]
    tokens, depths = [], []
    for i in range(max_new_tokens):
        depth = L if i == 0 else depth_at(i, L, alpha, start, min_depth)
        if i > 0:  # the newest position is the input of the pass predicting T_i
            kept = set(kept_layers(depth, L, head, tail, order))
            keep_rows[-1] = [j in kept for j in range(L)]
        ids = torch.tensor([seq])
        keep = torch.tensor([keep_rows])
        logits = llama_forward(weights, cfg, ids, keep, backfill)[0, -1]
        token = int(logits.argmax())
        tokens.append(token)
        depths.append(depth)
        if token in stop_tokens:
            break
        seq.append(token)
        keep_rows.append([True] * L)
    if tokens and tokens[-1] in stop_tokens:  # the stop token was never appended above
        keep_rows.append([True] * L)
    return tokens, depths, keep_rows


def d3_generate(weights: dict, cfg, prompt: list[int], max_new_tokens: int, *, alpha: float,
                start: int = 0, min_depth: int | None = None, head: int, tail: int,
                order="lower", stop_tokens=(), history_keep: list[list[bool]] | None = None,
                backfill: str = "propagate") -> tuple[list[int], list[int]]:
    """Greedy D³ generation by masked full-sequence recompute, no KV cache (the oracle).

    Every step runs the whole sequence through all layers; position t keeps layer j's output
    only where the depth of the pass that consumed t keeps j. Prompt positions, whose pass
    predicts T_0, are full depth (except the first len(history_keep) ones, which keep the
    layers their rows say: an earlier turn's reply, see :func:`d3_generate_turn`); the
    position holding T_{i-1} belongs to the pass predicting T_i. backfill: "propagate" (a
    skipped layer's K/V come from the residual reaching it) or "mask" (they do not exist).
    Returns (generated token ids, depth of the pass that predicted each).
    """
    tokens, depths, _ = d3_generate_turn(weights, cfg, prompt, max_new_tokens, alpha=alpha,
                                         start=start, min_depth=min_depth, head=head, tail=tail,
                                         order=order, stop_tokens=stop_tokens,
                                         history_keep=history_keep, backfill=backfill)
    return tokens, depths


def d3_chat(weights: dict, cfg, turns: list[list[int]], max_new_tokens: int, *,
            stop_tokens=(), backfill: str = "propagate",
            **schedule) -> list[tuple[list[int], list[int]]]:
    """A multi-turn conversation by masked full-sequence recompute over the whole of it.

    turns[k]: the token ids that turn k adds after the previous reply (the first: the whole
    first prompt). Each prompt runs at full depth, each reply token's position keeps the layers
    of its pass, and each reply's last token is full depth (the next prefill processes it).
    schedule: alpha, start, min_depth, head, tail, order as in :func:`d3_generate`;
    backfill: "propagate" or "mask", for every turn.
    Returns [(reply token ids, depths)] per turn.
    """
    seq, keep, replies = [], None, []
    for new in turns:
        seq = seq + list(new)
        tokens, depths, keep = d3_generate_turn(weights, cfg, seq, max_new_tokens,
                                                stop_tokens=stop_tokens, history_keep=keep,
                                                backfill=backfill, **schedule)
        seq = seq + tokens
        replies.append((tokens, depths))
    return replies
