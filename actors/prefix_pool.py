"""One copy of every cached prefix: KV blocks keyed by hash chains (vLLM's automatic
prefix caching, without paged attention).

A prompt is cut into blocks of BLOCK_TOKENS tokens; block i's key is a hash of
block i-1's key and block i's tokens, so a key names a whole prefix and a lookup
walks the prompt's keys until one is missing (cheap at 100k tokens: one hash per
block). Each block holds that block's keys and values for every layer as one
evaluated array of shape (layers, 2, kv_heads, BLOCK_TOKENS, head_dim).

The chain starts from a scope: requests in different scopes never share a block
(sharing is per API key; --no-shared-prefix makes every agent its own scope). A
block is only ever found by a prompt that contains exactly its tokens after
exactly the same prefix, so reuse serves no agent KV for tokens it did not send.

Blocks are referenced by the agents' branches (actors/session.py) and by turns
waiting to start from them; unreferenced blocks stay as a cache, least recently
used first out when the memory budget needs room. Lives on the event loop; the
arrays inside are evaluated, so any thread may read them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

BLOCK_TOKENS = 64


def chain(tokens: tuple[int, ...] | list[int], scope: str, model_tag: str) -> list[bytes]:
    """The keys of every full block of `tokens`."""
    keys = []
    parent = hashlib.blake2b(f"{model_tag}\0{scope}".encode(), digest_size=16).digest()
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b"".join(t.to_bytes(4, "little") for t in tokens[start : start + BLOCK_TOKENS]))
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass(eq=False, slots=True)
class Block:
    key: bytes
    kv: Any  # mx.array (layers, 2, kv_heads, BLOCK_TOKENS, head_dim), evaluated
    nbytes: int
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)


class PrefixPool:
    def __init__(self, model_tag: str):
        self.model_tag = model_tag
        self.blocks: dict[bytes, Block] = {}
        self.nbytes = 0  # every block's bytes, once
        self.hits = 0  # blocks served from the pool
        self.evicted = 0

    def reset(self, model_tag: str) -> None:
        """A new model (after a swap, every session stopped): nothing cached applies."""
        self.model_tag = model_tag
        self.blocks.clear()
        self.nbytes = 0

    def keys(self, tokens, scope: str) -> list[bytes]:
        return chain(tokens, scope, self.model_tag)

    def match(self, keys: list[bytes]) -> list[Block]:
        """The pool's blocks for the longest run of `keys` from the start."""
        found = []
        now = time.monotonic()
        for key in keys:
            block = self.blocks.get(key)
            if block is None:
                break
            block.last_used = now
            found.append(block)
        return found

    def add(self, key: bytes, kv: Any) -> Block:
        """The pool's block for `key`: the existing one (this copy is dropped), or `kv`."""
        block = self.blocks.get(key)
        if block is None:
            block = Block(key, kv, int(kv.nbytes))
            self.blocks[key] = block
            self.nbytes += block.nbytes
        block.last_used = time.monotonic()
        return block

    def acquire(self, blocks: Iterable[Block]) -> None:
        for block in blocks:
            block.refs += 1

    def release(self, blocks: Iterable[Block]) -> None:
        for block in blocks:
            block.refs -= 1
            assert block.refs >= 0, "a block was released more often than acquired"

    @property
    def idle_bytes(self) -> int:
        """Bytes of blocks no branch or turn holds (a cache that can be dropped)."""
        return sum(b.nbytes for b in self.blocks.values() if b.refs == 0)

    def evict(self, nbytes: int) -> int:
        """Drop unreferenced blocks, least recently used first, until `nbytes` are freed
        (or none is left). Returns the bytes freed."""
        idle = sorted((b for b in self.blocks.values() if b.refs == 0), key=lambda b: b.last_used)
        freed = 0
        for block in idle:
            if freed >= nbytes:
                break
            del self.blocks[block.key]
            self.nbytes -= block.nbytes
            freed += block.nbytes
            self.evicted += 1
        return freed
