"""D³ depth schedule: how many and which layers the pass predicting generated token i runs."""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

BUILTIN_ORDERS = ("upper", "lower")


@dataclass(frozen=True)
class DepthSchedule:
    """``n_i = clamp(floor(L * alpha ** max(0, i - start)), min_depth, L)`` (design.md §2).

    alpha in (0, 1] (1 = full depth); start: warm-up tokens at full depth; head/tail: core
    layers always kept at the bottom/top; min_depth: None means head + tail; order: 'lower'
    (drop flex layers bottom-up), 'upper' (top-down) or an explicit permutation of the flex
    layers, dropped first to last. T_0 comes from the prefill and is always full depth.
    """

    alpha: float = 0.98
    start: int = 0
    min_depth: int | None = None
    head: int = 4
    tail: int = 2
    order: str | tuple[int, ...] = "lower"
    _kept: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not 0 < self.alpha <= 1:
            raise ValueError(f"DepthSchedule: alpha must be a number in (0, 1], got {self.alpha!r}")
        for name in ("start", "head", "tail"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DepthSchedule: {name} must be an int >= 0, got {value!r}")
        if self.min_depth is not None:
            if isinstance(self.min_depth, bool) or not isinstance(self.min_depth, int):
                raise ValueError(f"DepthSchedule: min_depth must be an int or None, "
                                 f"got {self.min_depth!r}")
            if self.min_depth < self.head + self.tail:
                raise ValueError(f"DepthSchedule: min_depth ({self.min_depth}) must be >= head + "
                                 f"tail ({self.head + self.tail})")
        if isinstance(self.order, str):
            if self.order not in BUILTIN_ORDERS:
                raise ValueError(f"DepthSchedule: order must be one of {BUILTIN_ORDERS} or a list "
                                 f"of flex layer indices, got {self.order!r}")
        else:
            object.__setattr__(self, "order", tuple(int(j) for j in self.order))

    @classmethod
    def full(cls) -> "DepthSchedule":
        """Every token at full depth."""
        return cls(alpha=1.0, head=0, tail=0)

    @property
    def is_full_depth(self) -> bool:
        return self.alpha == 1

    def validate(self, num_layers: int) -> None:
        """Check the schedule against a model of ``num_layers`` layers; raise ValueError if not."""
        if self.head + self.tail > num_layers:
            raise ValueError(f"DepthSchedule: head + tail ({self.head} + {self.tail}) exceeds the "
                             f"model's {num_layers} layers")
        if self.min_depth is not None and self.min_depth > num_layers:
            raise ValueError(f"DepthSchedule: min_depth ({self.min_depth}) exceeds the model's "
                             f"{num_layers} layers")
        if not isinstance(self.order, str):
            flex = set(range(self.head, num_layers - self.tail))
            if sorted(self.order) != sorted(flex) or len(set(self.order)) != len(self.order):
                raise ValueError(f"DepthSchedule: order must be a permutation of the flex layers "
                                 f"{sorted(flex)}, got {list(self.order)}")

    def depth(self, i: int, num_layers: int) -> int:
        """Layers in the pass that predicts generated token ``i`` (0 = the prefill)."""
        if i == 0:
            return num_layers
        min_depth = self.head + self.tail if self.min_depth is None else self.min_depth
        raw = math.floor(num_layers * self.alpha ** max(0, i - self.start))  # float64 power
        return max(min_depth, min(num_layers, raw))

    def skip_order(self, num_layers: int) -> tuple[int, ...]:
        """Flex layers in the order they are dropped."""
        flex = range(self.head, num_layers - self.tail)
        if self.order == "lower":
            return tuple(flex)
        if self.order == "upper":
            return tuple(reversed(flex))
        return self.order

    def kept_layers(self, depth: int, num_layers: int) -> tuple[int, ...]:
        """Ascending layer indices that a pass of ``depth`` layers runs."""
        key = (depth, num_layers)
        if key not in self._kept:
            dropped = set(self.skip_order(num_layers)[:num_layers - depth])
            self._kept[key] = tuple(j for j in range(num_layers) if j not in dropped)
        return self._kept[key]

    def to_dict(self) -> dict:
        order = self.order if isinstance(self.order, str) else list(self.order)
        return {"alpha": self.alpha, "start": self.start, "min_depth": self.min_depth,
                "head": self.head, "tail": self.tail, "order": order}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DepthSchedule":
        """Read a schedule file written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"DepthSchedule.load: {path}: expected a JSON object, got "
                             f"{type(data).__name__}")
        unknown = set(data) - {"alpha", "start", "min_depth", "head", "tail", "order"}
        if unknown:
            raise ValueError(f"DepthSchedule.load: {path}: unknown keys {sorted(unknown)}")
        return cls(**data)


@functools.lru_cache(maxsize=None)
def skipped_runs(kept: tuple[int, ...], num_layers: int) -> tuple[tuple[int, int], ...]:
    """Maximal runs [a, b) of consecutive skipped layers: they share one residual input."""
    runs, a = [], None
    kept_set = set(kept)
    for j in range(num_layers + 1):
        skipped = j < num_layers and j not in kept_set
        if skipped and a is None:
            a = j
        elif not skipped and a is not None:
            runs.append((a, j))
            a = None
    return tuple(runs)
