"""What a D³ run saved: layer ratio, work ratio (bytes) and measured speed (design.md §8)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from d3kernels.config import LlamaConfig


def layer_bytes(cfg: LlamaConfig, elem: int) -> int:
    """Weight bytes one decoder layer reads: two norms, QKV, O, gate/up, down."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    return elem * (2 * H + H * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * H + 3 * H * I)


def backfill_layer_bytes(cfg: LlamaConfig, elem: int) -> int:
    """Weight bytes a ``propagate`` backfill reads per skipped layer: its input norm and K/V
    projections (an eager backfill reads them every step, a deferred one once per flush)."""
    return elem * (cfg.hidden_size + 2 * cfg.kv_size * cfg.hidden_size)


@dataclass(frozen=True)
class WeightBytes:
    """Bytes a decode step reads of each weight, as stored: a quantized weight counts its
    values, scales and offsets (``LlamaD3.weight_bytes`` measures its own weights).

    layer: one decoder layer (two norms, QKV, O, gate/up, down); backfill_layer: a skipped
    layer's input norm and K/V rows; head: final norm + LM head; embed_row: one embedding row;
    kv_elem: one K/V cache element.
    """

    layer: int
    backfill_layer: int
    head: int
    embed_row: int
    kv_elem: int

    @classmethod
    def dense(cls, cfg: LlamaConfig, elem: int) -> "WeightBytes":
        """Every weight and cache element ``elem`` bytes (an unquantized model)."""
        return cls(layer=layer_bytes(cfg, elem), backfill_layer=backfill_layer_bytes(cfg, elem),
                   head=elem * (cfg.vocab_size + 1) * cfg.hidden_size,
                   embed_row=elem * cfg.hidden_size, kv_elem=elem)


def kv_bytes(cfg: LlamaConfig, tokens: int, elem: int) -> int:
    """Bytes of one layer's K and V for ``tokens`` cached entries."""
    return 2 * tokens * cfg.kv_size * elem


def step_bytes(cfg: LlamaConfig, depth: int, contexts: Sequence[int], elem: int | WeightBytes,
               row_depths: Sequence[int] | None = None) -> int:
    """Bytes a decode step must read: the weights of ``depth`` layers, once for the whole batch,
    and each row's own KV.

    contexts: one entry per row of the batch, the cached tokens that row's attention reads at
    each layer it runs (its new token's entry included: position + 1). row_depths: how many
    layers each row runs (None: every row runs ``depth``; a mixed batch such as the engine's
    reads the weights of every layer any row keeps, ``depth`` of them). Also counted: what every
    step reads whatever its depth: LM head, final norm, the rows' embeddings. Backfill of skipped
    layers is not counted: it can be deferred past the reply (design.md §2), so this is the
    attainable minimum.

    elem: bytes per element of a dense model, or the model's ``WeightBytes`` (quantized
    weights: their stored bytes).
    """
    costs = WeightBytes.dense(cfg, elem) if isinstance(elem, int) else elem
    if isinstance(contexts, int) or not contexts:
        raise ValueError(f"contexts must hold one KV token count per row, got {contexts!r}")
    batch = len(contexts)
    if row_depths is None:
        kv_read = depth * kv_bytes(cfg, sum(contexts), costs.kv_elem)
    else:
        if len(row_depths) != batch:
            raise ValueError(f"row_depths must hold one depth per row ({batch}), got "
                             f"{row_depths!r}")
        kv_read = sum(d * kv_bytes(cfg, n, costs.kv_elem) for d, n in zip(row_depths, contexts))
    return depth * costs.layer + kv_read + costs.head + batch * costs.embed_row


@dataclass
class GenerationStats:
    """Timings and D³ savings of one ``generate`` call.

    Decode figures cover the decode passes taken (tokens T_1, T_2, ...; not a step the decode
    loop's lookahead enqueued and then discarded); T_0 comes from the prefill. decode_seconds:
    each step's enqueue and the wait for its tokens, not the caller's time between streamed
    tokens. layer_ratio = L·steps / Σ n_i; work_ratio = Σ bytes at full depth / Σ bytes at the
    D³ depths (``step_bytes``), over the same steps and each row's own contexts.
    backfill_bytes: weight bytes the call's K/V backfills read (``backfill_layer_bytes`` per
    skipped layer: every step when eager, once per flush when deferred, including a flush the
    call's prefill or ``flush_backfill`` ran; 0 in ``mask`` mode; not a discarded lookahead
    step's); not part of d3_bytes.
    """

    num_layers: int
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_steps: int
    decode_seconds: float
    layers_run: int
    full_bytes: int
    d3_bytes: int
    backfill_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def mean_layers_per_token(self) -> float:
        return self.layers_run / self.decode_steps if self.decode_steps else float(self.num_layers)

    @property
    def layer_ratio(self) -> float:
        return self.num_layers * self.decode_steps / self.layers_run if self.layers_run else 1.0

    @property
    def work_ratio(self) -> float:
        return self.full_bytes / self.d3_bytes if self.d3_bytes else 1.0

    def summary(self) -> str:
        return (f"prefill {self.prefill_tokens_per_s:.1f} tok/s | decode "
                f"{self.decode_tokens_per_s:.1f} tok/s | {self.mean_layers_per_token:.1f}/"
                f"{self.num_layers} layers per token | layer ratio {self.layer_ratio:.2f}x | "
                f"work ratio {self.work_ratio:.2f}x")
