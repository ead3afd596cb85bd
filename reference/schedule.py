"""The D³ depth schedule, written out plainly (design.md §2)."""
import math


def depth_at(i: int, num_layers: int, alpha: float, start: int, min_depth: int) -> int:
    """Layers in the pass that predicts generated token i: clamp(floor(L·α^max(0,i-start)))."""
    raw = math.floor(num_layers * alpha ** max(0, i - start))  # Python floats are float64
    return max(min_depth, min(num_layers, raw))


def skip_order(num_layers: int, head: int, tail: int, order) -> list[int]:
    """Flex layers in the order they are dropped: 'upper' top-down, 'lower' bottom-up, or a list."""
    flex = list(range(head, num_layers - tail))
    if order == "upper":
        return flex[::-1]
    if order == "lower":
        return flex
    return list(order)


def kept_layers(depth: int, num_layers: int, head: int, tail: int, order) -> list[int]:
    """Ascending indices of the layers a pass of this depth runs."""
    dropped = set(skip_order(num_layers, head, tail, order)[:num_layers - depth])
    return [j for j in range(num_layers) if j not in dropped]
