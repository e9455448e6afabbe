"""The session pool: activation on demand, a KV memory budget, hibernation.

SessionPool is the registry of live session actors (children of the actor
system, one per agent id). It activates a session on its first message (the
session restores its cache from disk in on_start), and when resident KV bytes
would exceed the budget it hibernates idle sessions, least recently used
first: stopping a session saves its cache, and the next message activates it
again from disk.

Persistence is the disk side for one model tag (actors/blockstore.py): restore,
and a coalesced write-behind after every turn. Saves are versioned so that an
older version finishing late on the I/O thread never overwrites a newer one. The
store keeps under the disk budget (junk first, then the files of agents that are
not active, least recently used first); the pool tells it which agents are
active (in memory or being restored).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from actors.blockstore import BlockStore, SavedAgent, SavedBranch
from actors.branches import Branch
from actors.diskbudget import BudgetExceeded
from actors.prefix_pool import BLOCK_TOKENS
from actors.session import SaveNow
from runtime.supervision import ChildSpec, Restart
from runtime.errors import ActorError

log = logging.getLogger("greenroom.pool")

IO_THREADS = 2  # the server's disk I/O executor (cache loads and saves)


def close_io(io: ThreadPoolExecutor, workers: int = IO_THREADS) -> None:
    """Let the pending file writes finish, then stop the I/O threads.

    The block store's loads and saves run MLX on these threads, and MLX keeps per-thread streams
    that must be freed on their own thread before it ends: left to process exit they
    abort it now and then ("terminate called without an active exception", mlx#3126).
    The barrier makes the clean-up land once on every worker. Blocking."""
    import mlx.core as mx

    barrier = threading.Barrier(workers)

    def clear() -> None:
        try:
            barrier.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass  # a worker stuck elsewhere: still clear this one
        mx.clear_streams()

    for future in [io.submit(clear) for _ in range(workers)]:
        future.exception()  # waits; a failure here must not stop the shutdown
    io.shutdown(wait=True)


class Persistence:
    """The disk side for one model tag (actors/blockstore.py): each agent's branches as
    one small file (tokens, block keys, private tails) and the shared blocks written
    once, content-addressed. Every store call runs on the I/O threads."""

    def __init__(self, store: BlockStore, io: ThreadPoolExecutor):
        self.store = store
        self.model_tag = store.model_tag
        self.io = io
        self._versions = itertools.count(1)
        self._written: dict[str, int] = {}  # agent -> version on disk (an older write never wins)
        self._locks: dict[str, threading.Lock] = {}
        # agent id -> (branch tokens, future) of the write on the I/O thread right now
        self._inflight: dict[str, tuple[tuple, asyncio.Future]] = {}
        self.saves = 0
        self.save_errors = 0

    @classmethod
    async def open(cls, root, model_tag: str, io: ThreadPoolExecutor, disk_budget_bytes: int | None):
        """Open (index) the tag's store off the event loop."""
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(
            io, lambda: BlockStore(root, model_tag, block_tokens=BLOCK_TOKENS, disk_budget_bytes=disk_budget_bytes)
        )
        return cls(store, io)

    @property
    def active_agents(self) -> Callable[[], Iterable[str]]:
        return self.store.pinned

    @active_agents.setter
    def active_agents(self, agents: Callable[[], Iterable[str]]) -> None:
        # The store asks on its I/O threads: hand it a snapshot, never a live view.
        self.store.pinned = lambda: frozenset(agents())

    def stats(self) -> dict:
        return self.store.stats()

    async def restore(self, agent_id: str, branches) -> list:
        """The agent's saved branches (`branches` is the session's actors.branches.Branches):
        blocks the prefix pool holds are shared, the others read from disk and added to
        it; a branch ends at its first block that cannot be read. [] when none."""
        loop = asyncio.get_running_loop()
        saved = await loop.run_in_executor(self.io, self.store.load_agent, agent_id)
        if saved is None:
            if self.store.was_evicted(agent_id):
                log.info("%s starts cold: its saved cache was evicted to stay under the disk budget", agent_id)
            return []
        pool = branches.pool
        wanted = {k for b in saved.branches for k in b.block_keys if k not in pool.blocks}
        read = await loop.run_in_executor(self.io, self.store.load_blocks, wanted) if wanted else {}
        restored = []
        for saved_branch in saved.branches:
            blocks = []
            for key in saved_branch.block_keys:
                kv = read.get(key)
                block = pool.blocks.get(key) if kv is None else pool.add(key, kv)
                if block is None:
                    break
                blocks.append(block)
            if len(blocks) < len(saved_branch.block_keys):  # cut at the first missing block
                log.warning("%s: a branch is cut to %d cached tokens (a block is missing on disk)",
                            agent_id, len(blocks) * BLOCK_TOKENS)
                tokens, tail = saved_branch.tokens[: len(blocks) * BLOCK_TOKENS], None
            else:
                tokens, tail = saved_branch.tokens, saved_branch.tail
            if tokens:
                pool.acquire(blocks)
                restored.append(Branch(tuple(tokens), blocks, tail))
        log.info("restored %s: %d branches, %d cached tokens", agent_id, len(restored),
                 sum(len(b.tokens) for b in restored))
        return restored

    async def save_now(self, agent_id: str, branches: tuple) -> bool:
        """Write the agent's branches now; True once on disk (errors are logged, not
        raised). Branches never change once made, so the caller may move on at once.

        If the very same branches are being written already (a write-behind whose task
        was cancelled when its session stopped), that write is awaited instead."""
        if not branches:
            return True
        signature = tuple(b.tokens for b in branches)
        inflight = self._inflight.get(agent_id)
        if inflight is not None and inflight[0] == signature:
            try:
                await asyncio.shield(inflight[1])
                return True
            except Exception:
                pass  # it failed: write again below
        saved = SavedAgent(
            agent_id,
            tuple(SavedBranch(b.tokens, tuple(block.key for block in b.blocks), b.tail) for b in branches),
        )
        # Every block: the store writes only the ones it does not hold yet.
        arrays = {block.key: block.kv for b in branches for block in b.blocks}
        version = next(self._versions)
        loop = asyncio.get_running_loop()
        # Shielded: once handed to the I/O thread the write completes regardless.
        future = loop.run_in_executor(self.io, self._write_sync, version, saved, arrays)
        self._inflight[agent_id] = (signature, future)

        def forget(f, agent_id=agent_id):
            current = self._inflight.get(agent_id)
            if current is not None and current[1] is f:
                del self._inflight[agent_id]

        future.add_done_callback(forget)
        try:
            return await asyncio.shield(future)
        except Exception as exc:
            self.save_errors += 1
            log.error("saving the cache of %s failed: %s: %s", agent_id, type(exc).__name__, exc)
            return False

    def _write_sync(self, version: int, saved: SavedAgent, arrays: dict) -> bool:
        lock = self._locks.setdefault(saved.agent_id, threading.Lock())
        with lock:
            if self._written.get(saved.agent_id, 0) > version:
                return True  # a newer version is already on disk
            try:
                self.store.save_agent(saved, arrays)
            except BudgetExceeded as exc:
                log.warning("not saving the cache of %s: %s", saved.agent_id, exc)
                return False
            self._written[saved.agent_id] = version
            self.saves += 1
            return True


@dataclass(frozen=True, slots=True)
class PoolStats:
    budget_bytes: int
    resident_bytes: int
    active: int
    hibernated: int

    @property
    def usage(self) -> float:
        return self.resident_bytes / self.budget_bytes if self.budget_bytes else 0.0


class SessionPool:
    def __init__(
        self,
        system: Any,  # ActorSystem
        *,
        scheduler: Any,
        loaded: Any,
        persistence: Persistence | None,
        budget_bytes: int,
        session_factory: Any,
        prefixes: Any = None,  # actors.prefix_pool.PrefixPool: shared blocks, counted once
    ):
        self.system = system
        self.prefixes = prefixes
        self.scheduler = scheduler
        self.loaded = loaded
        self.persistence = persistence
        self.budget_bytes = budget_bytes
        self._factory = session_factory  # (agent_id, persistence) -> SessionActor
        self.sessions: dict[str, Any] = {}  # agent id -> SessionActor (live)
        self._refs: dict[str, Any] = {}
        self._activating: dict[str, list] = {}  # agent id -> [lock, callers]
        self._making_room = asyncio.Lock()
        # Set when a turn's cache was filed (or a session left): the supervisor then
        # brings resident KV back under the budget (SupervisorActor._keep_budget).
        self.room_wanted = asyncio.Event()
        self._ephemeral = itertools.count(1)
        self._attach(persistence)

    def _attach(self, persistence: Persistence | None) -> None:
        """The disk budget never evicts the file of a session in memory (with a cache,
        in a turn, or restoring): tell the persistence which agents those are."""
        if persistence is not None:
            persistence.active_agents = lambda: (*self.sessions, *self._activating)

    def set_model(self, loaded: Any, persistence: Persistence | None) -> None:
        """After a swap (all sessions saved and stopped): new sessions use the new model."""
        if self.sessions:
            raise RuntimeError("set_model needs every session stopped first")
        self.loaded = loaded
        self.persistence = persistence
        if self.prefixes is not None:
            self.prefixes.reset(loaded.tag)
        self._attach(persistence)

    async def session(self, agent_id: str):
        """The live session for agent_id, activated (and restored from disk) if needed."""
        ref = self._live_ref(agent_id)
        if ref is not None:
            return ref
        entry = self._activating.setdefault(agent_id, [asyncio.Lock(), 0])
        entry[1] += 1  # callers using this lock; the last one removes it
        try:
            async with entry[0]:
                ref = self._live_ref(agent_id)
                if ref is not None:
                    return ref
                # Its saved cache comes back into memory: make room first (the budget is
                # checked again after the restore, when the bytes are known).
                await self.make_room()
                return await self._start(agent_id, self.persistence)
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._activating[agent_id]

    def _live_ref(self, agent_id: str):
        ref = self._refs.get(agent_id)
        if ref is not None and self.sessions[agent_id].alive:
            return ref
        return None

    async def ephemeral(self):
        """A one-turn session that is never persisted; the caller ends it with `release`.
        Its id cannot collide with a client's: '~' is not allowed in agent ids."""
        agent_id = f"~ephemeral-{next(self._ephemeral)}"
        return agent_id, await self._start(agent_id, None)

    async def _start(self, agent_id: str, persistence):
        holder = {}

        def build():
            holder["actor"] = self._factory(agent_id, persistence)
            return holder["actor"]

        # A session that crashed is gone from the supervisor; forget it here too.
        self.sessions.pop(agent_id, None)
        self._refs.pop(agent_id, None)
        spec = ChildSpec(f"session:{agent_id}", build, restart=Restart.TEMPORARY, shutdown_timeout=30)
        ref = await self.system.start_child(spec)
        self.sessions[agent_id] = holder["actor"]
        self._refs[agent_id] = ref
        return ref

    def want_room(self) -> None:
        self.room_wanted.set()

    async def release(self, agent_id: str) -> None:
        """Stop the session (its on_stop saves the cache); it leaves memory."""
        if self.sessions.pop(agent_id, None) is not None:
            self._refs.pop(agent_id, None)
            try:
                await self.system.stop_child(f"session:{agent_id}")
            except KeyError:
                pass  # it had crashed: the supervisor already forgot it
            except ActorError:
                pass  # the whole system is stopping: it stops (and saves) the session itself

    async def hibernate(self, agent_id: str) -> bool:
        """Save the session's cache to disk and drop it from memory."""
        session = self.sessions.get(agent_id)
        if session is None or self.persistence is None or session.persistence is None:
            return False
        nbytes, tokens = session.cache_nbytes, len(session.tokens)
        await self.release(agent_id)
        log.info("hibernated %s (%d tokens, %d bytes)", agent_id, tokens, nbytes)
        return True

    async def make_room(self, extra_bytes: int = 0) -> None:
        """Hibernate idle sessions, least recently used first, until the resident KV
        bytes plus `extra_bytes` fit the budget. Sessions in a turn (or with turns
        queued) stay. Without persistence (--no-persist) an idle session's cache is
        dropped instead: the agent's next turn starts cold."""
        async with self._making_room:  # concurrent callers must not both evict for the same need
            while self.resident_bytes() + extra_bytes > self.budget_bytes:
                if self.prefixes is not None:  # first the shared blocks nobody holds (a cache)
                    over = self.resident_bytes() + extra_bytes - self.budget_bytes
                    if self.prefixes.evict(over) >= over:
                        break
                idle = [
                    s
                    for s in self.sessions.values()
                    if s.alive and not s.in_turn and s.mailbox_depth == 0 and s.cache
                ]
                if not idle:
                    return  # nothing more can go; /health reports the overuse
                lru = min(idle, key=lambda s: s.last_used)
                try:
                    if not await self.hibernate(lru.agent_id):
                        nbytes = lru.cache_nbytes
                        await self.release(lru.agent_id)
                        log.info("dropped the cache of %s (%d bytes; persistence is off)", lru.agent_id, nbytes)
                except ActorError as exc:  # shutting down
                    log.warning("could not hibernate %s: %s", lru.agent_id, exc)
                    return

    def resident_bytes(self) -> int:
        """KV bytes in memory: every shared block once, plus each session's own bytes."""
        shared = self.prefixes.nbytes if self.prefixes is not None else 0
        return shared + sum(s.cache_nbytes for s in self.sessions.values() if s.alive)

    def stats(self) -> PoolStats:
        hibernated = 0
        if self.persistence is not None:  # from the in-memory index: no directory read
            live = set(self.sessions)
            hibernated = sum(1 for a in self.persistence.store.agents() if a not in live)
        return PoolStats(self.budget_bytes, self.resident_bytes(), len(self.sessions), hibernated)

    async def save_all(self) -> None:
        """Save every session's cache, then stop them all (shutdown, model swap).

        The saves run side by side (snapshots on the model thread one after the
        other, file writes on the I/O threads); stopping a session whose cache is
        on disk is then quick, and one that did not manage saves in its on_stop."""
        started = time.perf_counter()
        refs = list(self._refs.values())
        results = await asyncio.gather(
            *(ref.ask(SaveNow(), timeout=120) for ref in refs), return_exceptions=True
        )
        for ref, result in zip(refs, results):
            if isinstance(result, BaseException) and not isinstance(result, ActorError):
                log.error("saving %s failed: %s: %s", ref.name, type(result).__name__, result)
        for agent_id in list(self.sessions):
            await self.release(agent_id)
        if refs:
            saved = sum(1 for r in results if r is True)
            log.info("saved %d of %d sessions' caches in %.2fs", saved, len(refs), time.perf_counter() - started)

    def agents(self) -> list[dict]:
        now = time.time()
        rows = []
        for agent_id, s in sorted(self.sessions.items()):
            rows.append(
                {
                    "id": agent_id,
                    "state": "active" if s.in_turn else "idle",
                    "cached_tokens": len(s.tokens),
                    "branches": len(s.branches.items),
                    "bytes": s.cache_nbytes,
                    "idle_seconds": round(now - s.last_used, 1),
                }
            )
        return rows
