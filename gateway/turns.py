"""Running one turn for an HTTP handler, whichever API it speaks.

Both gateways (OpenAI, Anthropic) translate their request into one ChatRequest,
then:

    async with open_turn(request, server, chat, agent_id) as turn:
        first = await turn.first()          # TurnRejected -> raise TurnRefused
        async for event in turn.events():   # TextDelta, ReasoningDelta, ToolCallEvent ... TurnDone
            ...

The turn is cancelled (the scheduler frees its slot) when the client goes away
or the handler leaves the block early, and an ephemeral session is released.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from actors.messages import CancelRequested, ChatRequest, ChatTurn, TurnDone, TurnRejected
from runtime.actor import ActorError, MailboxFull

# How often a waiting handler checks whether its client is still connected.
DISCONNECT_POLL_S = 0.25


class TurnRefused(Exception):
    """The turn never started: the gateway answers `status` in its API's error shape."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error", rejected=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.rejected: TurnRejected | None = rejected  # prompt_tokens / limit for context errors


class ClientGone(Exception):
    """The client disconnected while the handler waited for the turn."""


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@dataclass(slots=True)
class Turn:
    request: web.Request
    agent_id: str
    chat_turn: ChatTurn
    done: TurnDone | None = None
    _first: object | None = None
    _cancelled: bool = False

    async def _next(self):
        """The session's next event; raises ClientGone once the client disconnected."""
        events = self.chat_turn.events
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if client_gone(self.request):
                    self.cancel()
                    raise ClientGone() from None

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
        if not self._cancelled and self.done is None:
            self._cancelled = True
            self.chat_turn.inbox.put_nowait(CancelRequested())


@contextlib.asynccontextmanager
async def open_turn(request: web.Request, server, chat: ChatRequest, agent_id: str | None):
    """Submit `chat` to the agent's session; yields the running Turn."""
    # During a drain or a model swap new turns wait here; they are not rejected.
    async with server.admission.turn():
        ephemeral = agent_id is None
        if ephemeral:
            agent_id, session = await server.pool.ephemeral()
        else:
            session = await server.pool.session(agent_id)
        turn = Turn(request, agent_id, ChatTurn(chat, asyncio.Queue(), asyncio.Queue()))
        try:
            try:
                session.tell(turn.chat_turn)
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
            else:
                await server.pool.make_room()
