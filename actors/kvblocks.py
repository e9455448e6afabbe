"""Moving KV between a running sequence's per-layer caches and the prefix pool's blocks.

A sequence decodes from one contiguous KVCache per layer (attention needs its
keys in one array); at rest, its KV is pool blocks (one array per 64 tokens,
all layers: (layers, 2, kv_heads, tokens, head_dim)) plus a private tail of the
same layout. `assemble` joins such pieces into fresh KVCaches when a turn starts
(one copy, with room reserved for the prompt still to come); `cut` copies a
range of a running cache back out as one such array. Both evaluate what they
make, so the results can be used from any thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import KVCache


@dataclass(frozen=True, slots=True)
class KVPieces:
    """Where a turn's cached prefix comes from: the first `take` tokens of each array,
    in order. Assembled on the model thread when the turn joins the batch."""

    pieces: tuple[tuple[mx.array, int], ...]

    @property
    def tokens(self) -> int:
        return sum(take for _, take in self.pieces)


# KV caches grow in steps of this many tokens while decoding (mlx-lm's own step).
DECODE_GROWTH = 256


def decode_room(max_tokens: int) -> int:
    """Room for a turn's first generated tokens, made with its prompt's: growing a
    cache later copies all of it (87 MB for 1,900 tokens of the embedded model)."""
    return min(max_tokens, DECODE_GROWTH)


def assemble(source: KVPieces, reserve: int = 0) -> list[KVCache]:
    """One KVCache per layer holding `source`'s tokens, with room for `reserve` more
    (each layer's keys and values are copied once, straight into their final array)."""
    first = source.pieces[0][0]
    layers, _, heads, _, dim = first.shape
    pad = mx.zeros((1, heads, reserve, dim), dtype=first.dtype) if reserve else None
    caches = []
    for layer in range(layers):
        cache = KVCache()
        for which in (0, 1):
            parts = [kv[layer, which, :, :take, :][None] for kv, take in source.pieces if take]
            if pad is not None:
                parts.append(pad)
            array = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
            if which == 0:
                cache.keys = array
            else:
                cache.values = array
        cache.offset = source.tokens
        caches.append(cache)
    mx.eval([(c.keys, c.values) for c in caches])
    return caches


def cut(cache: list[KVCache], start: int, end: int) -> mx.array:
    """A copy of tokens [start, end) of every layer: (layers, 2, kv_heads, end - start, head_dim)."""
    out = mx.stack(
        [mx.stack([layer.keys[0, :, start:end, :], layer.values[0, :, start:end, :]]) for layer in cache]
    )
    out = mx.contiguous(out)
    mx.eval(out)
    return out
