"""The session pool: activation on demand, a KV memory budget, hibernation.

SessionPool is the registry of live session actors (children of the actor
system, one per agent id). It activates a session on its first message (the
session restores its cache from disk in on_start), and when resident KV bytes
would exceed the budget it hibernates idle sessions, least recently used
first: stopping a session saves its cache, and the next message activates it
again from disk.

Persistence is the disk side for one model tag: restore, and a coalesced
write-behind after every turn. Saves are versioned so that an older snapshot
finishing late on the I/O thread never overwrites a newer one. Before each write
it makes room under the disk budget (actors.diskbudget): junk first, then the
files of agents that are not active, least recently used first; the pool tells
it which agents are active (in memory, being restored, or writing).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from actors.cachestore import (
    CacheSnapshot,
    CacheStore,
    cache_from_snapshot,
    estimated_file_size,
    file_name,
    snapshot_from_cache,
)
from actors.diskbudget import BudgetExceeded, DiskFile, Plan
from actors.messages import RunOnModelThread
from actors.session import SaveNow
from runtime.supervision import ChildSpec, Restart
from runtime.errors import ActorError

log = logging.getLogger("greenroom.pool")

IO_THREADS = 2  # the server's disk I/O executor (cache loads and saves)


def close_io(io: ThreadPoolExecutor, workers: int = IO_THREADS) -> None:
    """Let the pending file writes finish, then stop the I/O threads.

    CacheStore.load/save run MLX on these threads, and MLX keeps per-thread streams
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
    def __init__(self, store: CacheStore, model: Any, model_tag: str, io: ThreadPoolExecutor):
        self.store = store
        self.model = model  # ActorRef: MLX evaluation happens on the model thread
        self.model_tag = model_tag
        self.io = io
        self._versions = itertools.count(1)
        self._written: dict[str, int] = {}
        self._locks: dict[str, threading.Lock] = {}
        # agent id -> (tokens, future) of the file write on the I/O thread right now
        self._inflight: dict[str, tuple[tuple[int, ...], asyncio.Future]] = {}
        self.saves = 0
        self.save_errors = 0
        # The tag dir's files (kept by the store) and the cap on them (None: no cap).
        self.index = store.index(model_tag)
        self.budget = store.budget
        # Agents whose files must stay (the SessionPool sets this to its live sessions).
        self.active_agents: Callable[[], Iterable[str]] = tuple

    async def restore(self, agent_id: str):
        loop = asyncio.get_running_loop()
        snap = await loop.run_in_executor(self.io, self.store.load, agent_id, self.model_tag)
        if snap is None:
            if self.budget is not None and self.budget.was_evicted(agent_id):
                log.info("%s starts cold: its saved cache was evicted to stay under the disk budget", agent_id)
            return None
        cache = await self.model.ask(RunOnModelThread(lambda: cache_from_snapshot(snap)), timeout=60)
        log.info("restored %s: %d cached tokens", agent_id, len(snap.tokens))
        return cache, tuple(snap.tokens)

    def _capture(self, cache: list, tokens: tuple[int, ...]):
        """Freeze what to save now, without MLX ops: arrays made on the model thread
        must be sliced there. The session may trim (move the offsets of) this cache on
        its next turn, so the offsets are copied; the arrays themselves never change."""
        from mlx_lm.models.cache import KVCache

        frozen = []
        for layer in cache:
            copy = KVCache()
            copy.keys, copy.values, copy.offset = layer.keys, layer.values, layer.offset
            frozen.append(copy)
        return next(self._versions), frozen, tuple(tokens)

    async def save_now(self, agent_id: str, cache: list, tokens: tuple[int, ...]) -> bool:
        """Write this cache now; True once it is on disk (errors are logged, not raised).
        The state is captured before the first await, so the caller may move on.

        If the very same tokens are being written already (a write-behind whose task
        was cancelled when its session stopped), that write is awaited instead."""
        inflight = self._inflight.get(agent_id)
        if inflight is not None and inflight[0] == tuple(tokens):
            try:
                await asyncio.shield(inflight[1])
                return True
            except Exception:
                pass  # it failed: write again below
        return await self._write(agent_id, *self._capture(cache, tokens))

    async def _write(self, agent_id: str, version: int, frozen: list, tokens: tuple[int, ...]) -> bool:
        try:
            snap = await self.model.ask(
                RunOnModelThread(lambda: snapshot_from_cache(agent_id, self.model_tag, tokens, frozen)),
                timeout=60,
            )
            try:
                plan = self._make_room(snap)
            except BudgetExceeded as exc:
                log.warning("not saving the cache of %s (%d tokens): %s", agent_id, len(tokens), exc)
                return False
            loop = asyncio.get_running_loop()
            # Shielded: once handed to the I/O thread the write completes regardless.
            future = loop.run_in_executor(self.io, self._write_sync, version, snap, plan)
            self._inflight[agent_id] = (tokens, future)

            def forget(f, agent_id=agent_id):
                current = self._inflight.get(agent_id)
                if current is not None and current[1] is f:
                    del self._inflight[agent_id]

            future.add_done_callback(forget)
            await asyncio.shield(future)
            return True
        except Exception as exc:
            self.save_errors += 1
            log.error("saving cache of %s failed: %s: %s", agent_id, type(exc).__name__, exc)
            return False

    def disk_bytes(self, agent_id: str) -> int:
        """Size of the agent's saved cache (0 if none); blocking, run it in `io`."""
        try:
            return os.stat(self.store.path_for(agent_id, self.model_tag)).st_size
        except (OSError, ValueError):
            return 0

    def _write_sync(self, version: int, snap: CacheSnapshot, plan: Plan | None = None) -> None:
        try:
            if plan is not None:  # the victims left the index already: their files go first
                self.store.remove(self.model_tag, plan.victims)
            lock = self._locks.setdefault(snap.agent_id, threading.Lock())
            with lock:
                if self._written.get(snap.agent_id, 0) > version:
                    return  # a newer snapshot is already on disk
                self.store.save(snap)
                self._written[snap.agent_id] = version
                self.saves += 1
        finally:
            if plan is not None:
                self.index.release(plan.ticket)

    # ---- disk budget (on the event loop: planning only reads the in-memory index)

    def _pinned(self, writer: str):
        """Whose files must stay: active agents, agents being written, the writer."""
        keep = {*self.active_agents(), *self._inflight, writer}
        return lambda file: file.owner in keep

    def _make_room(self, snap: CacheSnapshot) -> Plan | None:
        """Plan the removals that let `snap` fit the disk budget (BudgetExceeded if
        it cannot); the files go on the I/O thread right before the write."""
        if self.budget is None:
            return None
        incoming = DiskFile(file_name(snap.agent_id), estimated_file_size(snap), time.time(), snap.agent_id)
        plan = self.budget.plan(self.index, incoming, self._pinned(snap.agent_id))
        now = time.time()
        for file in plan.victims:
            if file.owner is None:
                log.info("disk budget: removing %s (%d bytes)", file.name, file.size)
            else:
                log.info(
                    "disk budget: evicting the saved cache of %s (%d bytes, last used %.0fs ago); "
                    "it starts cold next time",
                    file.owner,
                    file.size,
                    now - file.last_used,
                )
        return plan

    async def trim(self) -> int:
        """Bring the tag dir under the budget now (e.g. the budget was lowered since the
        last run): junk first, then idle agents' files. Returns the bytes freed."""
        if self.budget is None:
            return 0
        victims = self.budget.trim(self.index, self._pinned(""))
        if not victims:
            return 0
        log.info("disk budget: removing %d files to get under %d bytes", len(victims), self.budget.budget_bytes)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io, self.store.remove, self.model_tag, victims)


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
    ):
        self.system = system
        self.scheduler = scheduler
        self.loaded = loaded
        self.persistence = persistence
        self.budget_bytes = budget_bytes
        self._factory = session_factory  # (agent_id, persistence) -> SessionActor
        self.sessions: dict[str, Any] = {}  # agent id -> SessionActor (live)
        self._refs: dict[str, Any] = {}
        self._activating: dict[str, list] = {}  # agent id -> [lock, callers]
        self._making_room = asyncio.Lock()
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
                # Its saved cache comes back into memory: make room for it first.
                extra = 0
                if self.persistence is not None:
                    loop = asyncio.get_running_loop()
                    extra = await loop.run_in_executor(self.persistence.io, self.persistence.disk_bytes, agent_id)
                await self.make_room(extra)
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

    async def release(self, agent_id: str) -> None:
        """Stop the session (its on_stop saves the cache); it leaves memory."""
        if self.sessions.pop(agent_id, None) is not None:
            self._refs.pop(agent_id, None)
            try:
                await self.system.stop_child(f"session:{agent_id}")
            except KeyError:
                pass  # it had crashed: the supervisor already forgot it

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
        return sum(s.cache_nbytes for s in self.sessions.values() if s.alive)

    def stats(self) -> PoolStats:
        hibernated = 0
        if self.persistence is not None:  # from the in-memory index: no directory read
            live = set(self.sessions)
            hibernated = sum(1 for a in self.persistence.index.owners() if a not in live)
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
                    "bytes": s.cache_nbytes,
                    "idle_seconds": round(now - s.last_used, 1),
                }
            )
        return rows
