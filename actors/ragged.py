"""A decode batch without a merged KV cache.

mlx-lm batches sequences by merging their caches into one left-padded array per
layer (BatchKVCache): every join copies everyone's KV into a new padded array,
every leave copies it again, growth concatenates, and a prompt batch right-pads
and rolls. Measured here: 0.66 s to merge 8 x 1.5k-token caches and ~0.5 s of
concat and roll, against ~1.7 s of real compute.

Here each sequence keeps its own mlx-lm KVCache per layer for its whole turn.
A decode step runs the model once over the batch (one token per sequence: the
projections and MLP are one matmul with B rows), and only attention is done per
sequence, over that sequence's own keys and values. Joining and leaving the
batch is list bookkeeping; a turn's cache is handed back as it is.

The seam is the one cpu_attention.py already uses: mlx-lm's attention layers
call `cache.update_and_fetch(keys, values)` and then the module-level
`scaled_dot_product_attention` imported from mlx_lm.models.base. RaggedCache
answers update_and_fetch with a RaggedKV (one array per sequence), and the
installed attention function recognises it. RoPE gets one offset per row
(as it does for BatchKVCache). A model whose module lacks the seam, or whose
layers use other cache types, is decoded one sequence at a time instead
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
    """One layer's view of a decode batch: row i is sequence i's own KVCache."""

    def __init__(self, layers: list):
        self.layers = layers
        self.offset = mx.array([c.offset for c in layers])

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        ks, vs = [], []
        for i, cache in enumerate(self.layers):
            k, v = cache.update_and_fetch(keys[i : i + 1], values[i : i + 1])
            ks.append(k)
            vs.append(v)
        return RaggedKV(ks), RaggedKV(vs)

    def make_mask(self, n: int, **kwargs):
        if n != 1:
            raise ValueError("a ragged batch decodes one token per sequence")
        return None  # every sequence attends to all of its own keys

    @property
    def state(self):
        return [c.state for c in self.layers]


def ragged_caches(seq_caches: list[list]) -> list[RaggedCache]:
    """Per-layer RaggedCaches over `seq_caches` (one list of layer caches per sequence)."""
    return [RaggedCache([c[layer] for c in seq_caches]) for layer in range(len(seq_caches[0]))]


def _make_attention(inner):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(keys, RaggedKV):
            outs = [
                inner(queries[i : i + 1], k, v, cache=cache.layers[i], scale=scale, mask=None, sinks=sinks)
                for i, (k, v) in enumerate(zip(keys, values))
            ]
            return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        return inner(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

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
