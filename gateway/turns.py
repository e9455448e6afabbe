"""Running one turn for an HTTP handler, whichever API it speaks.

Both gateways (OpenAI, Anthropic) translate their request into one ChatRequest,
then:

    async with open_turn(request, server, chat, agent_id) as turn:
        first = await turn.first()          # refused -> raises TurnRefused
        async for event in turn.events():   # TextDelta, ReasoningDelta, ToolCallEvent ... TurnDone
            ...

Every wait here has a deadline: the client is checked every DISCONNECT_POLL_S
(gone: the turn is cancelled and ClientGone raised), and a turn that makes no
progress for `stall_timeout` seconds (nothing prefilled or generated for it) is
failed, so its client gets a final event even if something below hangs. Leaving
the block early cancels the turn; an ephemeral session is released.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import web

from actors.messages import ChatRequest, TurnDone, TurnRejected
from actors.turn import Turn as ActorTurn
from runtime.actor import ActorError, MailboxFull

# How often a waiting handler checks whether its client is still connected.
DISCONNECT_POLL_S = 0.25


class TurnRefused(Exception):
    """The turn never started: the gateway answers `status` in its API's error shape."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error", rejected=None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.rejected: TurnRejected | None = rejected  # prompt_tokens / limit for context errors
        self.retry_after = retry_after  # seconds, for a 503 the client should retry


class ClientGone(Exception):
    """The client disconnected while the handler waited for the turn."""


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class Turn:
    """The handler's view of one turn (actors/turn.py holds its state)."""

    def __init__(self, request: web.Request, turn: ActorTurn, stall_timeout: float):
        self.request = request
        self.turn = turn
        self.agent_id = turn.agent_id
        self.stall_timeout = stall_timeout
        self._pending: deque = deque()
        self._first = None
        self.done: TurnDone | None = None  # once events() yielded it

    async def _next(self):
        """The turn's next event; raises ClientGone once the client disconnected."""
        while not self._pending:
            events = await self.turn.next_events(DISCONNECT_POLL_S)
            if events:
                self._pending.extend(events)
                break
            if client_gone(self.request):
                self.cancel()
                raise ClientGone()
            if time.monotonic() - self.turn.last_progress > self.stall_timeout:
                self.turn.fail(f"no progress for {self.stall_timeout:.0f}s; the turn was ended")
        return self._pending.popleft()

    async def first(self):
        """Wait for the turn to start (or be refused). Returns its first event."""
        if self._first is None:
            event = await self._next()
            if isinstance(event, TurnRejected):
                raise TurnRefused(event.status, event.message, event.code, event)
            self._first = event
        return self._first

    async def events(self) -> AsyncIterator[object]:
        """Every event of the turn, the first included, ending with TurnDone."""
        event = await self.first()
        while True:
            if isinstance(event, TurnDone):
                self.done = event
                yield event
                return
            yield event
            event = await self._next()

    def cancel(self) -> None:
        self.turn.cancel()


@contextlib.asynccontextmanager
async def open_turn(request: web.Request, server, chat: ChatRequest, agent_id: str | None):
    """Submit `chat` to the agent's session; yields the running Turn."""
    config = server.config
    # During a drain or a model swap new turns wait here, up to the drain timeout.
    async with server.admission.turn(config.drain_timeout) as admitted:
        if not admitted:
            raise TurnRefused(503, "the server is draining or switching models; retry shortly",
                              "server_busy", retry_after=max(1.0, config.drain_timeout / 4))
        ephemeral = agent_id is None
        if ephemeral:
            agent_id, session = await server.pool.ephemeral()
        else:
            session = await server.pool.session(agent_id)
        turn = Turn(request, ActorTurn(chat, agent_id), config.stall_timeout)
        try:
            try:
                session.tell(turn.turn)
            except MailboxFull:
                raise TurnRefused(429, f"agent {agent_id!r} has too many queued turns", "rate_limit_exceeded")
            except ActorError as exc:
                raise TurnRefused(503, f"agent {agent_id!r} is unavailable: {exc}", "server_busy")
            try:
                yield turn
            finally:
                turn.cancel()  # a no-op once the turn is done
        finally:
            if ephemeral:
                await server.pool.release(agent_id)
                server.pool.want_room()  # its blocks are now an idle cache
