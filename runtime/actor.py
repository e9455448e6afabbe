"""The actor: a bounded mailbox, a run loop that handles one message at a time, owned tasks.

Stop semantics follow pykka, crash semantics follow Erlang:

* ``tell`` is fire-and-forget. If ``handle`` raises for a told message there is
  nobody to tell, so the actor crashes ("let it crash"): ``run()`` raises and the
  owner (a supervisor) decides what happens next.
* ``ask`` has a caller waiting: a handler exception goes back to that caller and
  the actor keeps serving.
* ``stop()`` closes the mailbox: messages already queued are handled first, later
  ones are refused with ``ActorStopped``. It is never refused, even when full.
* However ``run()`` ends, asks still queued fail with ``ActorStopped`` (no caller
  hangs), tasks started with ``spawn()`` are cancelled, then ``on_stop`` runs.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from runtime.errors import ActorError, ActorStopped, AskTimeout, MailboxFull
from runtime.tasks import finish

__all__ = ["Actor", "ActorError", "ActorStopped", "AskTimeout", "MailboxFull"]

log = logging.getLogger(__name__)

RECANCEL_S = 0.5  # while stopping, how often a spawned task that went on is cancelled again


@dataclass(frozen=True, slots=True)
class _Envelope:
    message: Any
    reply: asyncio.Future[Any] | None  # None for tell(): nobody is waiting


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"  # run() is winding down: no new messages, no new tasks
    DONE = "done"


class Actor:
    stop_timeout: float = 10.0  # bound on on_stop(); a class attribute so subclasses can tune it

    def __init__(self, name: str, *, mailbox_size: int = 256) -> None:
        if mailbox_size < 1:
            raise ValueError(f"mailbox_size must be at least 1, got {mailbox_size}")
        self.name = name
        self.mailbox_size = mailbox_size
        self._mailbox: collections.deque[_Envelope] = collections.deque()
        self._mail = asyncio.Event()  # set whenever the run loop has something to look at
        # stop() is a flag, not a queued item: everything in the mailbox was queued
        # before it, so "drain, then stop" is exactly "stop is the last message".
        self._closed = False
        self._state = _State.NEW
        self._current: _Envelope | None = None  # the ask being handled, failed if we die mid-way
        self._group: asyncio.TaskGroup | None = None
        self._spawned: set[asyncio.Task[Any]] = set()
        self._on_start_done = False
        self._start_over = asyncio.Event()  # on_start completed, or run() ended without it
        self._ended = asyncio.Event()
        self._recancels = 0  # cancel rounds sent to the spawned tasks while stopping

    # -- hooks ----------------------------------------------------------------

    async def on_start(self) -> None:
        """Runs inside run() before the first message; may spawn() tasks."""

    async def on_stop(self) -> None:
        """Runs at the end of run() (stop, crash or cancel) if on_start completed.

        It runs after the spawned tasks are gone, is not cut short by a cancel of
        run(), and is bounded by ``stop_timeout``.
        """

    async def handle(self, message: Any) -> Any:
        """Handle one message; the return value is the reply to ask()."""
        raise NotImplementedError(f"{type(self).__name__} does not handle {type(message).__name__}")

    # -- messages -------------------------------------------------------------

    def tell(self, message: Any) -> None:
        """Queue a message; raises MailboxFull or ActorStopped instead of waiting."""
        self._post(_Envelope(message, None))

    async def ask(self, message: Any, *, timeout: float) -> Any:
        """Queue a message and wait for the reply (or the handler's exception)."""
        reply = asyncio.get_running_loop().create_future()
        self._post(_Envelope(message, reply))
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await reply  # a timeout cancels `reply`, so the actor skips or drops it
        except TimeoutError:
            if not deadline.expired():
                raise  # the handler itself raised a TimeoutError: that is its reply
            raise AskTimeout(
                f"actor {self.name!r} did not answer {type(message).__name__} within {timeout}s"
            ) from None

    def stop(self) -> None:
        """Stop after the messages already queued; never refused, idempotent."""
        self._closed = True
        self._mail.set()

    def _post(self, envelope: _Envelope) -> None:
        if self._closed:
            raise ActorStopped(f"actor {self.name!r} is stopped")
        if len(self._mailbox) >= self.mailbox_size:
            raise MailboxFull(f"actor {self.name!r} has {self.mailbox_size} messages queued")
        self._mailbox.append(envelope)
        self._mail.set()

    # -- life cycle -----------------------------------------------------------

    async def run(self) -> None:
        """The actor's life: returns after stop(), raises the error after a crash."""
        if self._state is not _State.NEW:
            raise RuntimeError(f"actor {self.name!r} already ran; build a fresh instance")
        self._state = _State.RUNNING
        error: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                try:
                    await self.on_start()
                    self._on_start_done = True
                    self._start_over.set()
                    await self._serve()
                finally:
                    self._wind_down()
        except BaseException as exc:  # every way out is handled the same, then re-raised
            error = _unwrap(exc)
        self._group = None
        self._fail_pending(error)
        try:
            if self._on_start_done:
                await self._call_on_stop()
        finally:
            self._state = _State.DONE
            self._start_over.set()
            self._ended.set()
        if error is not None:
            raise error

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task owned by this actor.

        It is cancelled when the actor stops or crashes; if it raises, the actor
        crashes with that exception.
        """
        if self._state is not _State.RUNNING or self._group is None:
            coro.close()  # never started: close it so Python does not warn "never awaited"
            if self._state is _State.NEW:
                raise RuntimeError(f"actor {self.name!r} is not running yet; spawn from on_start")
            raise ActorStopped(f"actor {self.name!r} is stopped")
        task = self._group.create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
        return task

    async def wait_started(self) -> None:
        """Wait until on_start has completed; ActorStopped if run() ended before that."""
        await self._start_over.wait()
        if not self._on_start_done:
            raise ActorStopped(f"actor {self.name!r} stopped before on_start completed")

    async def wait_stopped(self) -> None:
        """Wait until run() has ended, however it ended."""
        await self._ended.wait()

    @property
    def alive(self) -> bool:
        """run() has started and not yet ended."""
        return self._state in (_State.RUNNING, _State.STOPPING)

    @property
    def stopped(self) -> bool:
        """run() has ended (await wait_stopped() to wait for it)."""
        return self._state is _State.DONE

    @property
    def mailbox_depth(self) -> int:
        return len(self._mailbox)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self._state.value} depth={len(self._mailbox)}>"

    # -- internals ------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            if self._mailbox:
                await self._deliver(self._mailbox.popleft())
                await asyncio.sleep(0)  # a backlog must not starve the rest of the event loop
            elif self._closed:
                return
            else:
                self._mail.clear()
                await self._mail.wait()

    async def _deliver(self, envelope: _Envelope) -> None:
        reply = envelope.reply
        if reply is None:
            await self.handle(envelope.message)  # raising here crashes the actor, by design
            return
        if reply.done():
            return  # the asker gave up (timeout, cancel) before we got to it: nobody wants this
        self._current = envelope
        try:
            result = await self.handle(envelope.message)
        except Exception as exc:
            if not reply.done():  # a late failure for an asker who left is nobody's business
                reply.set_exception(exc)
        else:
            if not reply.done():
                reply.set_result(result)
        self._current = None

    def _wind_down(self) -> None:
        self._state = _State.STOPPING
        self._closed = True
        self._cancel_spawned()

    def _cancel_spawned(self) -> None:
        """Cancel the tasks still running (the TaskGroup waits for them to unwind), and
        again every RECANCEL_S while one lingers: a cancel can be swallowed (Python
        3.11's asyncio.wait_for returns the result of an awaitable that completed as
        the cancel came in), and a task that goes on would keep the actor from ever
        stopping."""
        lingering = [task for task in self._spawned if not task.done()]
        if not lingering:
            return
        if self._recancels:
            log.warning("actor %r: %d task(s) went on after a cancel; cancelling again", self.name, len(lingering))
        self._recancels += 1
        for task in lingering:
            task.cancel()
        asyncio.get_running_loop().call_later(RECANCEL_S, self._cancel_spawned)

    def _fail_pending(self, error: BaseException | None) -> None:
        pending = list(self._mailbox)
        if self._current is not None:
            pending.insert(0, self._current)
        self._mailbox.clear()
        self._current = None
        if error is None:
            how = "stopped"
        elif isinstance(error, asyncio.CancelledError):
            how = "was cancelled"
        else:
            how = f"crashed ({type(error).__name__}: {error})"
        dropped = 0
        for envelope in pending:
            if envelope.reply is None:
                dropped += 1
            elif not envelope.reply.done():
                exc = ActorStopped(
                    f"actor {self.name!r} {how} before handling {type(envelope.message).__name__}"
                )
                exc.__cause__ = error if isinstance(error, Exception) else None
                envelope.reply.set_exception(exc)
        if dropped:
            log.warning("actor %r %s with %d told message(s) unhandled", self.name, how, dropped)

    async def _call_on_stop(self) -> None:
        # A task of its own so that a cancel of run() cannot cut it short ("shielded").
        # It is awaited right here, so it never outlives the actor.
        task = asyncio.get_running_loop().create_task(self.on_stop(), name=f"{self.name}.on_stop")
        try:
            await finish(task, self.stop_timeout)
        finally:
            if task.cancelled():
                log.error("actor %r: on_stop did not finish within %.1fs", self.name, self.stop_timeout)
            elif task.exception() is not None:
                log.error("actor %r: on_stop failed", self.name, exc_info=task.exception())


def _unwrap(exc: BaseException) -> BaseException:
    # TaskGroup wraps failures in an ExceptionGroup; a crash has one cause: report that one.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
