"""Supervision, Erlang/OTP style: start children in order, restart them per their spec,
stop them newest first, and give up (escalate) when they crash too often.

The Supervisor is not an Actor: it needs no bounded mailbox and no handle(), only a
control loop (run()) that owns the children's run() tasks in a TaskGroup and makes
every change to the child table — restarts, start_child, stop_child, stop — one at a
time, so they never interleave. Because of that, a child must not await
start_child/stop_child from its own on_start, nor stop_child for itself from its
handle(): the loop would be waiting on itself. (A child stops itself with stop().)
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.child import Child, Exited
from runtime.errors import ActorStopped, Escalation
from runtime.specs import ActorRef, ChildSpec, Restart, RestartIntensity, Strategy

__all__ = [
    "ActorRef", "ChildSpec", "Escalation", "Restart", "RestartIntensity", "Strategy", "Supervisor",
]

log = logging.getLogger(__name__)

OnRestart = Callable[[str, BaseException | None], None]


# Requests to the control loop (child exits come as child.Exited).
@dataclass(frozen=True, slots=True)
class _StartChild:
    spec: ChildSpec
    reply: asyncio.Future[ActorRef]


@dataclass(frozen=True, slots=True)
class _StopChild:
    name: str
    reply: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class _RestartChild:
    name: str
    reply: asyncio.Future[ActorRef]


@dataclass(frozen=True, slots=True)
class _Shutdown:
    pass


class _Phase(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DONE = "done"


class Supervisor:
    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        intensity: RestartIntensity | None = None,
        on_restart: OnRestart | None = None,
    ) -> None:
        names = [spec.name for spec in children]
        if len(set(names)) != len(names):
            raise ValueError(f"supervisor {name!r}: duplicate child names in {names}")
        if strategy is not Strategy.ONE_FOR_ONE:
            raise NotImplementedError(f"strategy {strategy}")
        self.name = name
        self.strategy = strategy
        self._initial = tuple(children)
        limit = intensity or RestartIntensity()
        self._intensity = RestartIntensity(limit.max_restarts, limit.period)  # our own history
        self._on_restart = on_restart
        self._children: dict[str, Child] = {}  # in start order; a restart keeps its place
        self._inbox: asyncio.Queue[Exited | _StartChild | _StopChild | _RestartChild | _Shutdown] = asyncio.Queue()
        self._group: asyncio.TaskGroup | None = None
        self._phase = _Phase.NEW
        self._deadline: float | None = None  # of the requested shutdown
        self._stop_requested = False
        self._start_error: Escalation | None = None
        self._up = False  # every initial child started
        self._start_over = asyncio.Event()
        self._ended = asyncio.Event()

    # -- public ---------------------------------------------------------------

    async def run(self) -> None:
        """Start the children in order, then supervise them until stop() or escalation.

        Returns after stop(). Raises Escalation when a child fails to start or
        crashes too often, after stopping the others newest first. A cancel also
        stops the children newest first; a second cancel kills the rest at once.
        """
        if self._phase is not _Phase.NEW:
            raise RuntimeError(f"supervisor {self.name!r} can run only once")
        self._phase = _Phase.RUNNING
        problem: Escalation | None = None
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                # Escalation comes back as a value: raised inside the group it would
                # come out wrapped in an ExceptionGroup.
                problem = await self._supervise()
        finally:
            self._phase = _Phase.DONE
            self._group = None
            self._fail_requests()
            self._start_over.set()
            self._ended.set()
        if problem is not None:
            raise problem

    async def wait_started(self) -> None:
        """Wait until every initial child has started; raises what stopped that."""
        await self._start_over.wait()
        if self._start_error is not None:
            raise self._start_error
        if not self._up:
            raise ActorStopped(f"supervisor {self.name!r} stopped before its children started")

    async def wait_stopped(self) -> None:
        await self._ended.wait()

    def request_stop(self, timeout: float | None = None) -> None:
        """Ask run() to stop every child newest first and return; does not wait.

        Each child gets its spec's shutdown_timeout, and all together ``timeout``;
        a child past its budget is cancelled.
        """
        if self._phase is _Phase.NEW:  # never ran: nothing to stop
            self._phase = _Phase.DONE
            self._start_over.set()
            self._ended.set()
        if self._phase is _Phase.DONE or self._stop_requested:
            return
        self._stop_requested = True
        if timeout is not None:
            self._deadline = asyncio.get_running_loop().time() + timeout
        self._inbox.put_nowait(_Shutdown())

    async def stop(self, timeout: float | None = None) -> None:
        """Stop every child newest first (see request_stop) and wait for it; idempotent."""
        self.request_stop(timeout)
        await self._ended.wait()

    async def start_child(self, spec: ChildSpec) -> ActorRef:
        """Start a child after the existing ones; returns once its on_start completed."""
        return await self._request(_StartChild(spec, asyncio.get_running_loop().create_future()))

    async def stop_child(self, name: str) -> None:
        """Stop a child (bounded by its shutdown_timeout) and forget it; KeyError if unknown."""
        await self._request(_StopChild(name, asyncio.get_running_loop().create_future()))

    async def restart_child(self, name: str) -> ActorRef:
        """Stop a child gracefully and start a fresh incarnation (an operator's restart).

        Not a crash: it does not count toward the restart intensity. KeyError if unknown."""
        return await self._request(_RestartChild(name, asyncio.get_running_loop().create_future()))

    def ref(self, name: str) -> ActorRef:
        child = self._children.get(name)
        if child is None or child.ref is None:
            raise KeyError(f"supervisor {self.name!r} has no child {name!r}")
        return child.ref

    def children(self) -> list[str]:
        """Child names in start order."""
        return list(self._children)

    # -- the control loop -------------------------------------------------------

    async def _supervise(self) -> Escalation | None:
        try:
            problem = await self._start_children()
            if problem is None:
                problem = await self._serve()
        except asyncio.CancelledError:
            await self._stop_all()  # a second cancel interrupts this: the TaskGroup kills the rest
            raise
        await self._stop_all()
        return problem

    async def _start_children(self) -> Escalation | None:
        for spec in self._initial:
            try:
                await self._add(spec)
            except Exception as exc:
                self._start_error = Escalation(
                    f"supervisor {self.name!r}: child {spec.name!r} failed to start: {exc!r}"
                )
                self._start_error.__cause__ = exc
                return self._start_error
        self._up = True
        self._start_over.set()
        return None

    async def _serve(self) -> Escalation | None:
        while True:
            match await self._inbox.get():
                case _Shutdown():
                    return None
                case Exited() as exited:
                    problem = await self._on_exit(exited)
                    if problem is not None:
                        return problem
                case _StartChild(spec, reply):
                    if reply.done():
                        continue  # the caller gave up: a child nobody knows of would leak
                    try:
                        _settle(reply, await self._add(spec))
                    except Exception as exc:
                        _settle(reply, error=exc)
                case _RestartChild(name, reply):
                    child = self._children.get(name)
                    if child is None:
                        _settle(reply, error=KeyError(f"supervisor {self.name!r} has no child {name!r}"))
                        continue
                    await self._stop_one(child)  # its exit report is then stale and ignored
                    try:
                        assert self._group is not None
                        _settle(reply, await child.launch(self._group))
                    except Exception as exc:  # it does not start again: as a crash would
                        _settle(reply, error=exc)
                        problem = await self._on_exit(Exited(child, child.ref.actor, exc))
                        if problem is not None:
                            return problem
                case _StopChild(name, reply):
                    child = self._children.pop(name, None)
                    if child is None:
                        _settle(reply, error=KeyError(f"supervisor {self.name!r} has no child {name!r}"))
                    else:
                        await self._stop_one(child)
                        _settle(reply, None)

    async def _on_exit(self, exited: Exited) -> Escalation | None:
        child = exited.child
        if self._children.get(child.name) is not child or not child.is_current(exited.actor):
            return None  # an incarnation already replaced or removed
        if exited.error is not None:
            log.error("supervisor %r: child %r crashed", self.name, child.name, exc_info=exited.error)
        if self._stop_requested:
            return None  # shutting down anyway
        if not child.wants_restart(exited.error):
            del self._children[child.name]
            return None
        error = exited.error
        while True:
            if self._intensity.record(asyncio.get_running_loop().time()):
                escalation = Escalation(
                    f"supervisor {self.name!r}: child {child.name!r} restarted more than "
                    f"{self._intensity.max_restarts} times in {self._intensity.period}s; "
                    f"last error: {error!r}"
                )
                escalation.__cause__ = error
                return escalation
            self._report_restart(child.name, error)
            assert self._group is not None
            try:
                await child.launch(self._group)
                return None
            except Exception as exc:
                error = exc  # a failed restart counts as a restart, as in Erlang

    async def _add(self, spec: ChildSpec) -> ActorRef:
        if spec.name in self._children:
            raise ValueError(f"supervisor {self.name!r} already has a child {spec.name!r}")
        assert self._group is not None
        child = Child(spec, self._inbox.put_nowait, owner=self.name)
        ref = await child.launch(self._group)
        self._children[spec.name] = child
        return ref

    async def _stop_all(self) -> None:
        for child in reversed(list(self._children.values())):
            await self._stop_one(child)

    async def _stop_one(self, child: Child) -> None:
        budget = child.spec.shutdown_timeout
        if self._deadline is not None:
            budget = min(budget, max(0.0, self._deadline - asyncio.get_running_loop().time()))
        await child.stop(budget)

    def _report_restart(self, name: str, error: BaseException | None) -> None:
        log.warning("supervisor %r: restarting child %r after %r", self.name, name, error)
        if self._on_restart is not None:
            try:
                self._on_restart(name, error)
            except Exception:  # a metrics hook must not break supervision
                log.exception("supervisor %r: on_restart hook failed", self.name)

    async def _request(self, item: _StartChild | _StopChild | _RestartChild) -> Any:
        if self._phase is _Phase.NEW:
            raise RuntimeError(f"supervisor {self.name!r} is not running")
        if self._phase is _Phase.DONE or self._stop_requested:
            raise ActorStopped(f"supervisor {self.name!r} is stopped")
        self._inbox.put_nowait(item)
        return await item.reply

    def _fail_requests(self) -> None:
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, (_StartChild, _StopChild, _RestartChild)):
                _settle(item.reply, error=ActorStopped(f"supervisor {self.name!r} stopped"))


def _settle(future: asyncio.Future[Any], result: Any = None, *, error: BaseException | None = None) -> None:
    if future.done():
        return  # the caller gave up
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
