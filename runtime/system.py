"""The root of the actor tree.

    async with ActorSystem([ChildSpec("engine", Engine), ...]) as system:
        ...serve, using system.ref("engine")...
        failure = await system.wait_failed()   # the Escalation if the root gave up

The system owns one TaskGroup holding the root supervisor's run(). A root that gives
up is recorded in ``failed`` rather than raised: raised inside the group it would
cancel whatever the entering task is awaiting and come out of ``async with`` as an
ExceptionGroup, a confusing way to learn that the engine kept crashing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import TracebackType

from runtime.supervision import ActorRef, ChildSpec, RestartIntensity, Supervisor
from runtime.tasks import finish

log = logging.getLogger(__name__)

# Past its own timeout, shutdown() cancels the root supervisor; this leaves the root
# the time to cancel its stragglers itself first, newest first.
_BACKSTOP_GRACE = 1.0


class ActorSystem:
    def __init__(
        self,
        children: Sequence[ChildSpec] = (),
        *,
        intensity: RestartIntensity | None = None,
        name: str = "root",
    ) -> None:
        self._root = Supervisor(name, children, intensity=intensity)
        self._group: asyncio.TaskGroup | None = None
        self._root_task: asyncio.Task[None] | None = None
        self._ended = asyncio.Event()
        self.failed: BaseException | None = None

    async def __aenter__(self) -> ActorSystem:
        """Start the children in order; raises Escalation if one fails to start."""
        if self._root_task is not None:
            raise RuntimeError("an ActorSystem can be entered only once")
        # Entered by hand rather than with `async with` so the group spans from
        # our __aenter__ to our __aexit__.
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = group
        self._root_task = group.create_task(self._run_root(), name=f"supervisor {self._root.name}")
        try:
            await self._root.wait_started()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            await self.shutdown()
        finally:
            group, self._group = self._group, None
            if group is not None:
                # The root task has ended (shutdown waits for it), so this only closes
                # the group. The body's exception is not passed in: the group would
                # wrap it in an ExceptionGroup; it propagates unchanged instead.
                await group.__aexit__(None, None, None)
        return False

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every actor newest first; idempotent.

        Runs to the end even if the caller is cancelled meanwhile (the cancel is
        re-raised afterwards). Actors still running after ``timeout`` are cancelled.
        """
        task = self._root_task
        if task is None:
            return
        self._root.request_stop(timeout)
        if not await finish(task, timeout + _BACKSTOP_GRACE):
            log.error("actor system %r: shutdown exceeded %.1fs; cancelled", self._root.name, timeout)

    async def wait_failed(self) -> BaseException | None:
        """Wait until the root supervisor ends: its Escalation, or None after a clean shutdown."""
        await self._ended.wait()
        return self.failed

    def ref(self, name: str) -> ActorRef:
        return self._root.ref(name)

    def children(self) -> list[str]:
        return self._root.children()

    async def start_child(self, spec: ChildSpec) -> ActorRef:
        return await self._root.start_child(spec)

    async def stop_child(self, name: str) -> None:
        await self._root.stop_child(name)

    async def restart_child(self, name: str) -> ActorRef:
        """An operator's restart: graceful, and not counted toward the restart intensity."""
        return await self._root.restart_child(name)

    async def _run_root(self) -> None:
        try:
            await self._root.run()
        except Exception as exc:
            self.failed = exc
            log.critical("actor system %r failed: %s", self._root.name, exc)
        finally:
            self._ended.set()
