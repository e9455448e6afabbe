"""SupervisorActor: live model swap, drain/resume, restarts, eviction, shutdown.

It is the one place that changes what the server is serving. The kernel's
supervisors (runtime/) restart crashed actors; this actor carries out the
operator's commands from the control socket:

swap: close admission (new turns wait at the gate, they are not rejected), let
running turns finish (or end them at the drain deadline with finish_reason
"abort"), save every session's cache under the old model tag, load the new model
next to the old one, and switch. If loading fails the old model never stopped
serving: reopen the gate and report the error (rollback).

A swap runs as a task of this actor, so status requests are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable

from actors.messages import AbortAll, Crash, InjectFault, LoadModel, RunOnModelThread
from actors.model import ModelSlot
from actors.pool import Persistence
from actors.scheduler import GetSchedulerStats, SetAdmission
from runtime.actor import Actor

log = logging.getLogger("greenroom.supervisor")


class Admission:
    """The gate new turns pass (or wait at) and the count of turns past it."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        # While a swap holds the gate, new turns wait up to its end (loop time), which
        # the operator bounded with the swap's drain timeout; otherwise --drain-timeout.
        self.hold_until: float | None = None
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @asynccontextmanager
    async def turn(self, timeout: float | None = None):
        """Pass the gate (waiting at most `timeout` seconds while it is closed); yields
        whether it was passed. A turn held back longer gets a 503 to retry."""
        if not self.open.is_set():
            if timeout is not None and self.hold_until is not None:
                timeout = max(timeout, self.hold_until - asyncio.get_running_loop().time())
            try:
                async with asyncio.timeout(timeout):
                    await self.open.wait()
            except TimeoutError:
                yield False
                return
        self.inflight += 1
        self._idle.clear()
        try:
            yield True
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False


# ---------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Status:
    pass


@dataclass(frozen=True, slots=True)
class Agents:
    pass


@dataclass(frozen=True, slots=True)
class Swap:
    model: str | None
    drain_timeout: float = 30.0
    abort: bool = False


@dataclass(frozen=True, slots=True)
class Drain:
    pass


@dataclass(frozen=True, slots=True)
class Resume:
    pass


@dataclass(frozen=True, slots=True)
class Evict:
    agent_id: str


@dataclass(frozen=True, slots=True)
class RestartActor:
    actor: str


@dataclass(frozen=True, slots=True)
class Fault:
    actor: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


class CommandError(Exception):
    """A command that cannot be carried out; the message goes back to the operator."""


RESTARTABLE = ("model", "scheduler")


class SupervisorActor(Actor):
    def __init__(
        self,
        *,
        system: Any,
        slot: ModelSlot,
        pool: Any,
        admission: Admission,
        started: float,
        request_shutdown: Callable[[], None],
        faults_enabled: bool = False,
        load_timeout: float = 600.0,
    ):
        super().__init__("supervisor", mailbox_size=64)
        self.system = system
        self.slot = slot
        self.pool = pool
        self.admission = admission
        self.started = started
        self.request_shutdown = request_shutdown
        self.faults_enabled = faults_enabled
        self.load_timeout = load_timeout
        self.state = "serving"
        self.last_swap: dict | None = None
        self._swapping = False

    async def on_start(self) -> None:
        self.spawn(self._keep_budget())

    async def _keep_budget(self) -> None:
        """Hibernate idle sessions when the memory budget is exceeded, each time a turn's
        cache has been filed (at rest: a running turn's working copy is gone by then)."""
        while True:
            await self.pool.room_wanted.wait()
            self.pool.room_wanted.clear()
            try:
                await self.pool.make_room()
            except Exception as exc:  # logged: the budget is enforced again at the next turn
                log.error("keeping the memory budget failed: %s: %s", type(exc).__name__, exc)

    @property
    def model(self):
        return self.system.ref("model")

    @property
    def scheduler(self):
        return self.system.ref("scheduler")

    async def handle(self, message: Any) -> Any:
        match message:
            case Status():
                return await self._status()
            case Agents():
                return self._agents()
            case Swap():
                if self._swapping:
                    raise CommandError("a swap is already in progress")
                self._swapping = True
                done = asyncio.get_running_loop().create_future()
                self.spawn(self._swap_task(message, done))
                return done  # the caller awaits it; this mailbox stays free
            case Drain():
                self.admission.open.clear()
                self.state = "draining"
                return {"state": self.state, "inflight": self.admission.inflight}
            case Resume():
                if self._swapping:
                    raise CommandError("a swap is in progress; it resumes admission when done")
                self.admission.open.set()
                self.state = "serving"
                return {"state": self.state}
            case Evict(agent_id=agent_id):
                if not await self.pool.hibernate(agent_id):
                    raise CommandError(f"agent {agent_id!r} is not active (or persistence is off)")
                return {"evicted": agent_id}
            case RestartActor(actor=name):
                if name not in RESTARTABLE:
                    raise CommandError(f"can restart {', '.join(RESTARTABLE)}; not {name!r}")
                # Graceful, and not a crash: it never counts toward the restart intensity.
                self.spawn(self._restart(name))
                return {"restarting": name}
            case Fault(actor=name):
                # Tests only: "model" makes the next step fail inside MLX work (the batch
                # is dropped, the weights stay); "<actor>-crash" crashes that actor, as a
                # bug would (the supervisor restarts it; this counts toward its intensity).
                if not self.faults_enabled or name not in ("model", *(f"{a}-crash" for a in RESTARTABLE)):
                    raise CommandError("fault injection is off (GREENROOM_ENABLE_FAULTS=1 enables it)")
                if name == "model":
                    await self.model.ask(InjectFault(), timeout=10)
                    return {"fault": "the model's next step fails"}
                self.system.ref(name.removesuffix("-crash")).tell(Crash("fault injected over the control socket"))
                return {"fault": f"{name.removesuffix('-crash')} crashes"}
            case Shutdown():
                self.request_shutdown()
                return {"shutting_down": True}
        raise CommandError(f"unknown command {type(message).__name__}")

    async def _restart(self, name: str) -> None:
        try:
            await self.system.restart_child(name)
            log.info("restarted %s on request", name)
        except Exception as exc:  # logged, not raised: a failed restart must not crash us
            log.error("restarting %s failed: %s: %s", name, type(exc).__name__, exc)

    async def _status(self) -> dict:
        stats = await self.scheduler.ask(GetSchedulerStats(), timeout=5)
        pool = self.pool.stats()
        state = self.state
        if state == "serving" and pool.usage > 0.9:
            state = "degraded"
        return {
            "model": self.pool.loaded.name,
            "model_tag": self.pool.loaded.tag,
            "source": self.pool.loaded.source,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "state": state,
            "pool": {
                "budget_bytes": pool.budget_bytes,
                "resident_bytes": pool.resident_bytes,
                "usage": round(pool.usage, 4),
                "active_sessions": pool.active,
                "hibernated_sessions": pool.hibernated,
                **self._prefix_stats(),
            },
            "running": stats.running,
            "waiting": stats.waiting,
            "inflight": self.admission.inflight,
            "last_swap": self.last_swap,
        }

    def _prefix_stats(self) -> dict:
        """The shared prefix pool: each block once, and how much of it agents hold."""
        prefixes = self.pool.prefixes
        if prefixes is None:
            return {}
        return {
            "shared_blocks": len(prefixes.blocks),
            "shared_bytes": prefixes.nbytes,
            "shared_idle_bytes": prefixes.idle_bytes,
            "shared_block_hits": prefixes.hits,
            "shared_blocks_evicted": prefixes.evicted,
        }

    def _agents(self) -> list[dict]:
        rows = self.pool.agents()
        persistence = self.pool.persistence
        if persistence is not None:
            live = {r["id"] for r in rows}
            for agent_id in persistence.store.agents():
                if agent_id not in live:
                    rows.append({"id": agent_id, "state": "hibernated", "cached_tokens": None, "bytes": None})
        return rows

    # ------------------------------------------------------------ swap

    async def _swap_task(self, swap: Swap, done: asyncio.Future) -> None:
        result = {"ok": False, "error": "the swap was interrupted"}
        try:
            result = await self._swap(swap)
        except Exception as exc:
            log.exception("swap failed")
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            # Whatever happened, admission reopens and the operator gets an answer.
            self._swapping = False
            self.state = "serving"
            self.admission.hold_until = None
            self.admission.open.set()
            try:
                await self.scheduler.ask(SetAdmission(True), timeout=5)
            except Exception as exc:  # a restarting scheduler starts admitting anyway
                log.warning("could not reopen the scheduler's admission: %s: %s", type(exc).__name__, exc)
            finally:  # even when the supervisor stops (cancels) during that ask
                self.last_swap = result
                if not done.done():
                    done.set_result(result)

    async def _swap(self, swap: Swap) -> dict:
        old = self.pool.loaded
        t0 = time.perf_counter()
        self.state = "draining"
        self.admission.open.clear()
        self.admission.hold_until = asyncio.get_running_loop().time() + swap.drain_timeout + self.load_timeout
        drained = swap.abort is False and await self.admission.wait_idle(swap.drain_timeout)
        aborted = 0
        if not drained:
            aborted = self.admission.inflight
            await self.scheduler.ask(AbortAll("the server is switching models"), timeout=5)
            await self.admission.wait_idle(30)
        await self.scheduler.ask(SetAdmission(False), timeout=5)
        t1 = time.perf_counter()
        self.state = "swapping"
        await self.pool.save_all()  # every session saves under the old tag and leaves memory
        t2 = time.perf_counter()
        try:
            loaded = await self.model.ask(LoadModel(swap.model), timeout=self.load_timeout)
        except Exception as exc:
            log.error("swap to %r failed, still serving %s: %s", swap.model, old.name, exc)
            return {
                "ok": False,
                "rolled_back": True,
                "serving": old.name,
                "error": f"{type(exc).__name__}: {exc}",
            }
        t3 = time.perf_counter()
        self.slot.source = swap.model
        persistence = self.pool.persistence
        if persistence is not None:  # the new model's caches live under its own tag
            persistence = await Persistence.open(
                persistence.store.root, loaded.tag, persistence.io, persistence.store.budget_bytes
            )
        self.pool.set_model(loaded, persistence)
        first_token_s = await self._first_token(loaded)
        t4 = time.perf_counter()
        log.info("swapped %s -> %s in %.2fs", old.name, loaded.name, t4 - t0)
        return {
            "ok": True,
            "from": old.name,
            "to": loaded.name,
            "model_tag": loaded.tag,
            "aborted_turns": aborted,
            "seconds": {
                "drain": round(t1 - t0, 3),
                "save": round(t2 - t1, 3),
                "load": round(t3 - t2, 3),
                "load_model_only": round(loaded.load_seconds, 3),
                "first_token": round(first_token_s, 3),
                "total": round(t4 - t0, 3),
            },
        }

    async def _first_token(self, loaded) -> float:
        """One forward pass of the new model: checks it works and warms it up."""
        import mlx.core as mx

        def forward() -> float:
            started = time.perf_counter()
            mx.eval(loaded.model(mx.array([[loaded.tokenizer.eos_token_id or 0]])))
            return time.perf_counter() - started

        return await self.model.ask(RunOnModelThread(forward), timeout=60)
