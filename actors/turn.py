"""One turn, from the gateway's request to its client's final event (vLLM's Request).

A Turn is created by the gateway, prepared by the agent's session (prompt, cache,
grammar), held by the scheduler while it waits and runs, and ended exactly once by
whoever holds it at that moment: `finish()` is idempotent and always leaves the
client a final event (TurnDone, whose finish_reason may be "error" or "abort").
Its status only moves forward (TurnStatus is ordered).

The client's events wait in a small outbox that the gateway drains. While the
client reads slower than the model writes, text events merge (memory stays the
size of the text), and past BACKLOG_CHARS unread the scheduler pauses the turn's
decoding until the client catches up: backpressure instead of an unbounded queue.

Everything here runs on the event loop; nothing blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from actors.messages import (
    ChatRequest,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    TokenOut,
    TurnDone,
    TurnRejected,
    TurnStatus,
)

# Unread text (characters) past which the scheduler stops decoding the turn.
BACKLOG_CHARS = 64 * 1024
_ids = itertools.count(1)

FINISH_REASON = {
    TurnStatus.FINISHED_STOPPED: "stop",
    TurnStatus.FINISHED_LENGTH: "length",
    TurnStatus.FINISHED_ABORTED: "cancelled",
    TurnStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True, slots=True)
class Ended:
    """What a finished turn hands back to its session: the KV cache (None when it
    died with a failed step or a crashed actor) and the tokens it holds."""

    status: TurnStatus
    cache: list | None
    tokens: tuple[int, ...]


class Turn:
    def __init__(self, request: ChatRequest, agent_id: str):
        self.id = next(_ids)
        self.agent_id = agent_id
        self.request = request
        self.status = TurnStatus.WAITING
        self.created = time.monotonic()
        self.last_progress = self.created  # a step prefilled or decoded for it
        # Set by the session when it submits the turn.
        self.prompt: tuple[int, ...] = ()
        self.cached: tuple[int, ...] = ()  # prompt tokens the cache it brings holds
        self.cache: Any = None  # actors.kvblocks.KVPieces of the cached prefix, or None
        self.pinned: tuple = ()  # the pool blocks `cache` reads (held until the turn ends)
        self.keys: list[bytes] = []  # the prompt's full-block keys (actors/prefix_pool.py)
        self.scope = ""
        self.published = 0  # leading prompt blocks the pool has (or that were published)
        self.params = SamplingParams()
        self.max_tokens = 0
        self.constraint: Any = None
        self.output: Any = None  # actors.turn_output.TurnOutput
        self.model_name = ""
        # Kept by the scheduler.
        self.remaining = 0  # prompt tokens to prefill before it decodes
        self.offset = 0  # tokens its cache holds
        self.generated = 0
        self.submitted: float | None = None
        self.first_token_at: float | None = None
        self.cancel_requested = False
        self.on_cancel = None  # set by the scheduler holding it: wakes its step loop
        self.abort_reason: str | None = None  # the server ended it (drain, restart, shutdown)
        # The client's side.
        self._outbox: deque = deque()
        self._unread_chars = 0
        self._readable = asyncio.Event()
        self._ended: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self.done: TurnDone | None = None
        self.rejected: TurnRejected | None = None

    # ------------------------------------------------------------ state

    @property
    def finished(self) -> bool:
        return self.status.finished or self.rejected is not None

    @property
    def suffix(self) -> tuple[int, ...]:
        return self.prompt[len(self.cached):]

    @property
    def backlogged(self) -> bool:
        return self._unread_chars > BACKLOG_CHARS

    def cancel(self, reason: str | None = None) -> None:
        """Ask for the turn to end at the next step (client gone, stop string, server).
        `reason` set: the server ended it (finish_reason "abort")."""
        if not self.finished:
            self.cancel_requested = True
            if reason is not None and self.abort_reason is None:
                self.abort_reason = reason
            if self.on_cancel is not None:
                self.on_cancel()

    # ------------------------------------------------------------ the scheduler's side

    def start(self) -> None:
        self.status = TurnStatus.RUNNING

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def add_token(self, out: TokenOut) -> None:
        self.generated += 1
        self.last_progress = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = self.last_progress
        if self.output is None or self.output.stopped:
            return
        for event in self.output.add(out):
            self.emit(event)
        if self.output.stopped:
            self.cancel()  # a stop string: the sequence leaves at the next step

    def finish(self, status: TurnStatus, cache: list | None, tokens: tuple[int, ...], error: str | None = None) -> None:
        """End the turn (idempotent): its last text, TurnDone, and the cache back to the session."""
        if self.finished:
            return
        if self.output is not None and self.output.stopped:
            status = TurnStatus.FINISHED_STOPPED  # ended by its stop string, not the cancel
        self.status = status
        if self.output is not None:
            for event in self.output.finish():
                self.emit(event)
        self.done = TurnDone(
            finish_reason=self._finish_reason(status, error),
            prompt_tokens=len(self.prompt),
            completion_tokens=self.generated,
            cached_tokens=len(self.cached),
            prefilled_tokens=min(len(self.suffix), max(0, len(tokens) - len(self.cached))),
            model=self.model_name,
            error=error or (self.abort_reason if status is TurnStatus.FINISHED_ABORTED else None),
            stop_sequence=self.output.stop_sequence if self.output is not None else None,
        )
        self.emit(self.done)
        if not self._ended.done():
            self._ended.set_result(Ended(status, cache, tuple(tokens)))

    def fail(self, error: str) -> None:
        """End it with an error; its cache (lent to the batch) is lost."""
        self.finish(TurnStatus.FINISHED_ERROR, None, (), error)
        if self.on_cancel is not None:
            self.on_cancel()  # a running turn failed from outside: its sequence leaves

    def reject(self, rejected: TurnRejected) -> None:
        """The turn never started (bad prompt, busy): the gateway answers an HTTP error."""
        if self.finished:
            return
        self.rejected = rejected
        self.emit(rejected)
        if not self._ended.done():
            self._ended.set_result(Ended(TurnStatus.FINISHED_ABORTED, None, ()))

    def _finish_reason(self, status: TurnStatus, error: str | None) -> str:
        if status is TurnStatus.FINISHED_ABORTED and (self.abort_reason or error):
            return "abort"
        if status is TurnStatus.FINISHED_STOPPED and self.output is not None and self.output.has_tool_calls:
            return "tool_calls"
        return FINISH_REASON[status]

    # ------------------------------------------------------------ the session's side

    async def wait_ended(self) -> Ended:
        return await asyncio.shield(self._ended)

    @property
    def ended(self) -> bool:
        return self._ended.done()

    # ------------------------------------------------------------ the client's side

    def emit(self, event) -> None:
        """Queue an event for the client (text merges while the client is behind)."""
        last = self._outbox[-1] if self._outbox else None
        if isinstance(event, (TextDelta, ReasoningDelta)):
            self._unread_chars += len(event.text)
            if type(last) is type(event):  # the reader is behind: merge, so memory is the text's size
                merged = last.text + event.text
                if isinstance(event, TextDelta):
                    self._outbox[-1] = TextDelta(merged, last.logprobs + event.logprobs)
                else:
                    self._outbox[-1] = ReasoningDelta(merged)
                self._readable.set()
                return
        self._outbox.append(event)
        self._readable.set()

    async def next_events(self, timeout: float) -> list:
        """Everything the client has not read yet; [] if nothing came within `timeout`."""
        if not self._outbox:
            self._readable.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._readable.wait()
            except TimeoutError:
                return []
        events = list(self._outbox)
        self._outbox.clear()
        self._unread_chars = 0
        return events
