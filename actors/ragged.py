"""A batch of sequences without a merged KV cache.

mlx-lm batches sequences by merging their caches into one left-padded array per
layer (BatchKVCache): every join copies everyone's KV into a new padded array,
every leave copies it again, growth concatenates, and a prompt batch right-pads
and rolls. Measured here: 0.66 s to merge 8 x 1.5k-token caches and ~0.5 s of
concat and roll, against ~1.7 s of real compute.

Here each sequence keeps its own mlx-lm KVCache per layer for its whole turn.
A step runs the model once over the batch: row i holds sequence i's `lengths[i]`
new tokens (one when decoding, a prompt chunk when prefilling), right-padded to
the longest row, so the projections and MLP are one matmul over every row's
tokens. Only attention is done per sequence, over that sequence's own keys and
values with its own causal mask; padding never reaches a cache and its outputs
are zeros. Joining and leaving the batch is list bookkeeping; a turn's cache is
handed back as it is.

The seam is the one cpu_attention.py already uses: mlx-lm's attention layers
call `cache.update_and_fetch(keys, values)` and then the module-level
`scaled_dot_product_attention` imported from mlx_lm.models.base. RaggedCache
answers update_and_fetch with a RaggedKV (one array per sequence), and the
installed attention function recognises it. RoPE gets one offset per row
(as it does for BatchKVCache). A model whose module lacks the seam, or whose
layers use other cache types, runs sequences one at a time instead
(`supports_ragged`).
"""

from __future__ import annotations

import logging
import sys

import mlx.core as mx

log = logging.getLogger("greenroom.ragged")

_NAME = "scaled_dot_product_attention"


class RaggedKV(tuple):
    """Per-sequence keys (or values) of one layer: item i is (1, kv_heads, T_i, dim)."""


class RaggedCache:
    """One layer's view of a batch: row i is sequence i's own KVCache, taking the
    first lengths[i] positions of the row (all of them when lengths is None)."""

    def __init__(self, layers: list, lengths: tuple[int, ...] | None = None):
        self.layers = layers
        self.lengths = lengths
        self.offset = mx.array([c.offset for c in layers])

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        ks, vs = [], []
        for i, cache in enumerate(self.layers):
            n = keys.shape[2] if self.lengths is None else self.lengths[i]
            k, v = cache.update_and_fetch(keys[i : i + 1, :, :n], values[i : i + 1, :, :n])
            ks.append(k)
            vs.append(v)
        return RaggedKV(ks), RaggedKV(vs)

    def make_mask(self, n: int, **kwargs):
        # Each row's own mask is made in the attention (its own length and offset).
        return None if n == 1 else "causal"

    @property
    def state(self):
        return [c.state for c in self.layers]


def ragged_caches(seq_caches: list[list], lengths: tuple[int, ...] | None = None) -> list[RaggedCache]:
    """Per-layer RaggedCaches over `seq_caches` (one list of layer caches per sequence),
    row i bringing lengths[i] new tokens (one each when None)."""
    return [RaggedCache([c[layer] for c in seq_caches], lengths) for layer in range(len(seq_caches[0]))]


def padded_rows(rows: list[list[int]], pad: int = 0) -> mx.array:
    """The model's input for rows of different lengths: right-padded to the longest."""
    width = max(len(r) for r in rows)
    return mx.array([list(r) + [pad] * (width - len(r)) for r in rows])


def _make_attention(inner):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if not isinstance(keys, RaggedKV):
            return inner(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        width = queries.shape[2]
        outs = []
        for i, (k, v) in enumerate(zip(keys, values)):
            n = width if cache.lengths is None else cache.lengths[i]
            out = inner(queries[i : i + 1, :, :n], k, v, cache=cache.layers[i], scale=scale,
                        mask="causal" if n > 1 else None, sinks=sinks)
            if n < width:  # padding: its outputs are never read
                out = mx.pad(out, [(0, 0), (0, 0), (0, width - n), (0, 0)])
            outs.append(out)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)

    scaled_dot_product_attention.greenroom_ragged = True
    return scaled_dot_product_attention


def install(model) -> bool:
    """Make `model`'s mlx-lm module accept RaggedKV in its attention. Returns whether
    the model can decode a ragged batch (False: decode sequences one at a time)."""
    module = sys.modules.get(type(model).__module__)
    current = getattr(module, _NAME, None) if module is not None else None
    if current is None:
        return False
    if not getattr(current, "greenroom_ragged", False):
        setattr(module, _NAME, _make_attention(current))
    return supports_ragged(model)


def supports_ragged(model) -> bool:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    module = sys.modules.get(type(model).__module__)
    if not getattr(getattr(module, _NAME, None), "greenroom_ragged", False):
        return False
    try:
        caches = make_prompt_cache(model)
    except Exception:
        return False
    return all(type(c) is KVCache for c in caches)
