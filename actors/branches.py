"""An agent's cached conversations ("branches") and where a new turn starts from.

One agent id often carries several conversations at once (Claude Code runs its
main thread, sub-agents and short side calls under one session id), so an agent
keeps up to `limit` branches, least recently used out first. A branch is its
tokens, the prefix pool's blocks for its full 64-token blocks (shared with any
agent in the same scope that sent the same prefix), and a private tail for the
rest. Branches are never lent to a turn: a turn gets a fresh assembled copy
(actors/kvblocks.py), so a failed step or a crash loses nothing at rest.

A turn starts from the longest cached prefix of its prompt: the pool's blocks
(anyone's) or one of the agent's own branches (which also covers its private
tail). When it ends, its cache becomes a branch again: blocks the pool already
has are not copied, new full blocks join the pool, the rest is the new tail.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from actors.kvblocks import KVPieces, cut
from actors.prefix_pool import BLOCK_TOKENS, Block, PrefixPool


def common_prefix_len(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False, slots=True)
class Branch:
    tokens: tuple[int, ...]
    blocks: list[Block]  # tokens[: BLOCK_TOKENS * len(blocks)]
    tail: Any = None  # mx.array (layers, 2, kv_heads, rest, head_dim) for the remaining tokens
    last_used: float = field(default_factory=time.time)

    @property
    def tail_tokens(self) -> int:
        return len(self.tokens) - BLOCK_TOKENS * len(self.blocks)

    @property
    def tail_nbytes(self) -> int:
        return int(self.tail.nbytes) if self.tail is not None else 0

    def segments(self) -> list[tuple[Any, int]]:
        out = [(b.kv, BLOCK_TOKENS) for b in self.blocks]
        if self.tail_tokens:
            out.append((self.tail, self.tail_tokens))
        return out


@dataclass(frozen=True, slots=True)
class Start:
    """Where a turn starts: `cached` prompt tokens from `pieces` (None: from scratch);
    `pinned` are the pool blocks it reads (held until the turn ends)."""

    cached: int = 0
    pieces: KVPieces | None = None
    pinned: tuple[Block, ...] = ()


def take(segments: list[tuple[Any, int]], n: int) -> tuple[tuple[Any, int], ...]:
    """The first n tokens of `segments` (whole segments, then part of one)."""
    out = []
    for kv, count in segments:
        if n <= 0:
            break
        out.append((kv, min(count, n)))
        n -= count
    return tuple(out)


class Branches:
    def __init__(self, pool: PrefixPool, scope: str, limit: int):
        self.pool = pool
        self.scope = scope
        self.limit = limit
        self.items: list[Branch] = []  # most recently used first

    @property
    def nbytes(self) -> int:
        """Private bytes (tails); blocks are counted once, by the pool."""
        return sum(b.tail_nbytes for b in self.items)

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.items[0].tokens if self.items else ()

    def keys(self, tokens) -> list[bytes]:
        return self.pool.keys(tokens, self.scope)

    def start_for(self, prompt: tuple[int, ...]) -> Start:
        """The longest cached prefix of `prompt` (never all of it: the model must read
        at least one token to produce the next one's logits)."""
        shared = self.pool.match(self.keys(prompt))
        best, lcp = None, 0
        for branch in self.items:
            n = common_prefix_len(branch.tokens, prompt)
            if n > lcp:
                best, lcp = branch, n
        cached = min(max(BLOCK_TOKENS * len(shared), lcp), len(prompt) - 1)
        if cached <= 0:
            return Start()
        if best is not None and lcp > BLOCK_TOKENS * len(shared):
            segments, blocks = best.segments(), best.blocks  # its private tail reaches further
        else:
            segments, blocks = [(b.kv, BLOCK_TOKENS) for b in shared], shared
        pinned = tuple(blocks[: -(-cached // BLOCK_TOKENS)])
        self.pool.acquire(pinned)
        self.pool.hits += len(pinned)
        return Start(cached, KVPieces(take(segments, cached)), pinned)

    def keep(self, branch: Branch) -> None:
        """Add a turn's result. It replaces every branch it contains whole (the one it
        continued); a conversation that diverged is kept beside it, up to the limit."""
        branch.last_used = time.time()
        keep = []
        for old in self.items:
            if branch.tokens[: len(old.tokens)] == old.tokens:
                self.pool.release(old.blocks)
            else:
                keep.append(old)
        self.items = [branch, *keep]
        while len(self.items) > self.limit:
            self.pool.release(self.items.pop().blocks)

    def clear(self) -> None:
        for branch in self.items:
            self.pool.release(branch.blocks)
        self.items = []

    async def from_cache(self, cache: list, tokens: tuple[int, ...], executor) -> Branch:
        """The branch of a turn's final cache (KVCache per layer, evaluated): blocks the
        pool has are not copied; the others and the tail are, on `executor`."""
        keys = self.keys(tokens)
        present = {i: self.pool.blocks[k] for i, k in enumerate(keys) if k in self.pool.blocks}
        self.pool.acquire(present.values())  # not evicted while the copies are made
        missing = [i for i in range(len(keys)) if i not in present]
        full = BLOCK_TOKENS * len(keys)

        def copy_out():
            new = {i: cut(cache, i * BLOCK_TOKENS, (i + 1) * BLOCK_TOKENS) for i in missing}
            tail = cut(cache, full, len(tokens)) if len(tokens) > full else None
            return new, tail

        try:
            new, tail = await asyncio.get_running_loop().run_in_executor(executor, copy_out)
        except BaseException:
            self.pool.release(present.values())
            raise
        blocks = []
        for i, key in enumerate(keys):
            if i in present:
                blocks.append(present[i])
            else:
                block = self.pool.add(key, new[i])
                self.pool.acquire([block])
                blocks.append(block)
        return Branch(tuple(tokens), blocks, tail)
