"""One supervised child across its incarnations: build it, run it, report its exit, stop it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from runtime.actor import Actor, ActorStopped
from runtime.specs import ActorRef, ChildSpec, Restart
from runtime.tasks import finish

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Exited:
    """How one incarnation ended; reported to the supervisor's control loop."""

    child: Child
    actor: Actor
    error: Exception | None  # None: run() returned normally


class Child:
    """A supervisor's record of one child: its spec, its ref, the task of its current incarnation."""

    def __init__(self, spec: ChildSpec, report: Callable[[Exited], None], *, owner: str) -> None:
        self.spec = spec
        self.ref: ActorRef | None = None  # set by the first launch that gets through on_start
        self._report = report
        self._owner = owner
        self._task: asyncio.Task[Exception | None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def is_current(self, actor: Actor) -> bool:
        return self.ref is not None and self.ref.actor is actor

    def wants_restart(self, error: Exception | None) -> bool:
        if self.spec.restart is Restart.PERMANENT:
            return True
        if self.spec.restart is Restart.TRANSIENT:
            return error is not None
        return False

    async def launch(self, group: asyncio.TaskGroup) -> ActorRef:
        """Run a fresh incarnation in ``group``; return once its on_start has completed.

        Raises whatever ended it before that (on_start's or the factory's exception).
        """
        actor = self.spec.factory()
        task = group.create_task(self._watch(actor), name=f"{self._owner}/{self.name}")
        try:
            await actor.wait_started()
        except ActorStopped:
            pass  # run() ended during on_start; the watcher has the reason
        else:
            # Bound only now: until the new on_start is done, tell/ask raise ActorStopped.
            if self.ref is None:
                self.ref = ActorRef(self.name, actor)
            else:
                self.ref._bind(actor)
            self._task = task
            return self.ref
        error = await task
        raise error if error is not None else ActorStopped(f"child {self.name!r} stopped in on_start")

    async def stop(self, budget: float) -> None:
        """Stop the current incarnation; cancel it if it takes more than ``budget`` seconds."""
        if self.ref is None or self._task is None:
            return
        self.ref.actor.stop()
        if not await finish(self._task, budget):
            log.warning("supervisor %r: child %r did not stop within %.1fs; cancelled",
                        self._owner, self.name, budget)

    async def _watch(self, actor: Actor) -> Exception | None:
        # Never raises (but for cancellation): an error escaping into the supervisor's
        # TaskGroup would take every sibling down with it. The supervisor decides instead.
        try:
            await actor.run()
        except Exception as exc:
            error: Exception | None = exc
        else:
            error = None
        self._report(Exited(self, actor, error))
        return error
