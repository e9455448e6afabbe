"""Anthropic Messages API endpoints: POST /v1/messages, POST /v1/messages/count_tokens,
and GET|HEAD / (Claude Code and the SDKs probe it).

This module only speaks HTTP: gateway/anthropic_models.py declares the shapes,
gateway/anthropic_translate.py turns a request into the API-neutral ChatRequest,
gateway/turns.py runs the turn, and gateway/anthropic_reply.py turns its events
into Anthropic's message or stream events. Any model name is accepted and served by the
loaded model; the reply echoes the name the client asked for.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import orjson
from aiohttp import web
from pydantic import ValidationError

from gateway.anthropic_models import CountTokensRequest, MessagesRequest
from gateway.anthropic_reply import Reply, ToolArgumentsError
from gateway.anthropic_translate import (
    BadRequest,
    agent_id_for,
    log_unknown_fields,
    to_chat_request,
    validation_message,
)
from gateway.app import ANTHROPIC_ERROR_TYPES, SERVER, anthropic_error_body, json_response
from gateway.turns import ClientGone, TurnRefused, open_turn

log = logging.getLogger("greenroom.anthropic")

# A streamed reply waits this long for the turn's first event before it sends its
# headers, so that a refusal (the prompt is too long: the session says so once it
# has tokenized the prompt, well within this) is still a real HTTP 400, which is
# what Claude Code compacts on. After that, message_start goes out and pings keep
# the connection alive while a long prompt is prefilled. (The session sends no
# "turn accepted" event yet; with one, the headers could go out at once.)
ACCEPT_WINDOW_S = 3.0
PING_INTERVAL_S = 5.0

class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------- errors


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    """An error in Anthropic's shape."""
    return json_response(anthropic_error_body(status, message), status=status, headers=headers)


def refusal(exc: TurnRefused) -> tuple[int, str]:
    """(status, message) for a turn that never started."""
    rejected = exc.rejected
    if exc.code == "context_length_exceeded" and rejected and rejected.prompt_tokens is not None:
        # Claude Code recognises exactly this wording and compacts its context.
        return 400, f"prompt is too long: {rejected.prompt_tokens} tokens > {rejected.limit} maximum"
    if exc.status == 503:  # the server is busy (scheduler, memory budget)
        return 529, exc.message
    if exc.status in ANTHROPIC_ERROR_TYPES:
        return exc.status, exc.message
    return (400 if exc.status < 500 else 500), exc.message


# ---------------------------------------------------------------- requests


async def parse(request: web.Request, shape):
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, f"request body too large ({exc.text})") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = shape.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc)) from None
    log_unknown_fields(body)
    return body


def _headers(agent_id: str | None, **extra) -> dict:
    headers = {"request-id": f"req_{uuid.uuid4().hex}", **extra}
    if agent_id:
        headers["X-Agent-Id"] = agent_id
    return headers


async def messages(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    try:
        body = await parse(request, MessagesRequest)
        chat = to_chat_request(body)
        agent_id = agent_id_for(request.headers, body.metadata)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except BadRequest as exc:
        return error_response(400, str(exc))
    reply = Reply(body.model)
    try:
        async with open_turn(request, server, chat, agent_id) as turn:
            if body.stream:
                return await _stream(request, turn, reply)
            return await _complete(turn, reply)
    except TurnRefused as exc:
        retry = {"retry-after": str(round(exc.retry_after))} if exc.retry_after else None
        return error_response(*refusal(exc), headers=retry)
    except ClientGone:
        return web.Response(status=499)


async def _complete(turn, reply: Reply) -> web.Response:
    await turn.first()
    try:
        async for event in turn.events():
            reply.feed(event)
    except ToolArgumentsError as exc:
        return error_response(500, str(exc))
    done = turn.done
    if done.finish_reason == "error":
        return error_response(500, done.error or "generation failed")
    if done.finish_reason == "abort":
        return error_response(529, done.error or "the server ended the turn")
    if done.finish_reason == "cancelled":
        return web.Response(status=499)
    return json_response(reply.message(done), headers=_headers(turn.agent_id))


# ---------------------------------------------------------------- streaming


PING = ("ping", {"type": "ping"})


def sse(events) -> bytes:
    return b"".join(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n" for name, data in events)


def error_event(status: int, message: str):
    return ("error", anthropic_error_body(status, message))


async def _stream(request: web.Request, turn, reply: Reply) -> web.StreamResponse:
    first = asyncio.ensure_future(turn.first())
    try:
        await asyncio.wait({first}, timeout=ACCEPT_WINDOW_S)
        if first.done():
            first.result()  # a refusal (or a client gone) before any byte went out
        response = web.StreamResponse(
            headers=_headers(turn.agent_id, **{"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        )
        await response.prepare(request)
        try:
            await response.write(sse(reply.start() + [PING]))
            while not first.done():
                await asyncio.wait({first}, timeout=PING_INTERVAL_S)
                if not first.done():
                    await response.write(sse([PING]))
            await _stream_events(response, turn, reply, first)
            await response.write_eof()
        except (ClientGone, ConnectionError):
            turn.cancel()
        return response
    finally:
        if not first.done():
            first.cancel()
            await asyncio.wait({first})


async def _stream_events(response: web.StreamResponse, turn, reply: Reply, first) -> None:
    try:
        first.result()
    except TurnRefused as exc:  # refused after the headers went out
        await response.write(sse([error_event(*refusal(exc))]))
        return
    try:
        async for event in turn.events():
            events = reply.feed(event)
            if events:
                await response.write(sse(events))
    except ToolArgumentsError as exc:
        turn.cancel()
        await response.write(sse([error_event(500, str(exc))]))
        return
    done = turn.done
    if done.finish_reason == "error":
        await response.write(sse([error_event(500, done.error or "generation failed")]))
    elif done.finish_reason == "abort":
        await response.write(sse([error_event(529, done.error or "the server ended the turn")]))
    elif done.finish_reason != "cancelled":
        await response.write(sse(reply.finish(done)))


# ---------------------------------------------------------------- count_tokens and /


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's tokens as /v1/messages would count them (its usage.input_tokens),
    rendered the same way, without touching the model or any agent's cache."""
    server = request.app[SERVER]
    try:
        body = await parse(request, CountTokensRequest)
        chat = to_chat_request(body)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except BadRequest as exc:
        return error_response(400, str(exc))
    # Imported here: actors/prompt.py (the session's renderer) is landing separately.
    from actors.prompt import render

    try:
        rendered = await asyncio.to_thread(render, server.loaded.tokenizer, chat)
    except Exception as exc:  # template errors are the client's messages' fault, as in the session
        return error_response(400, f"could not apply the chat template: {exc}")
    return json_response({"input_tokens": len(rendered.tokens)}, headers=_headers(None))


async def root(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "service": "greenroom"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/", root)  # HEAD too
