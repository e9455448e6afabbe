"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

Each handler only translates: the body becomes one actors.messages.ChatRequest
(gateway/openai_request.py, shapes in gateway/openai_models.py), the session
runs the turn (gateway/turns.py), and its events become OpenAI's response
body or SSE chunks (gateway/openai_response.py). Bad input is a 400 in OpenAI's
error shape before anything reaches an actor.
"""

from __future__ import annotations

import time
import uuid

import orjson
from aiohttp import web

from actors.cachestore import InvalidAgentId, validate_agent_id
from gateway.app import SERVER, error_response, json_response
from gateway.openai_request import BadRequest, OpenAICall, parse_chat_body, parse_completion_body
from gateway.openai_response import ChatChunks, CompletionChunks, chat_completion_body, completion_body
from gateway.turns import ClientGone, TurnRefused, open_turn


def agent_id_for(request: web.Request, chat_user: str | None) -> str | None:
    """X-Agent-Id, else OpenAI's `user`, else None (an ephemeral session)."""
    raw = request.headers.get("X-Agent-Id") or chat_user
    if raw is None:
        return None
    try:
        return validate_agent_id(raw)
    except InvalidAgentId as exc:
        raise BadRequest(str(exc), "X-Agent-Id" if request.headers.get("X-Agent-Id") else "user")


async def read_json(request: web.Request):
    raw = await request.read()  # over MAX_BODY_BYTES: 413, turned into JSON by the middleware
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}")


def vocab_size(server) -> int:
    return len(server.loaded.tokenizer)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_chat_body, "chatcmpl", _complete_chat, _chat_chunks)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_completion_body, "cmpl", _complete_text, _text_chunks)


async def _serve(request, parse, prefix, complete, make_chunks) -> web.StreamResponse:
    server = request.app[SERVER]
    try:
        call = parse(await read_json(request), vocab_size(server))
        agent_id = agent_id_for(request, call.user)
    except BadRequest as exc:
        return error_response(400, str(exc), param=exc.param)
    try:
        async with open_turn(request, server, call.chat, agent_id) as turn:
            await turn.first()
            ident = f"{prefix}-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            if call.stream:
                return await _stream(request, turn, make_chunks(server, call, ident, created))
            events = [event async for event in turn.events()]
            done = turn.done
            if done.finish_reason == "error":
                return error_response(500, done.error or "generation failed", "server_error")
            body = complete(events, call, ident, created, server.loaded.tag)
            return json_response(body, headers={"X-Agent-Id": turn.agent_id})
    except TurnRefused as exc:
        retry = {"Retry-After": str(round(exc.retry_after))} if exc.retry_after else None
        return error_response(exc.status, exc.message, exc.code, headers=retry)
    except ClientGone:
        return web.Response(status=499)


def _complete_chat(events, call: OpenAICall, ident, created, fingerprint) -> dict:
    return chat_completion_body(
        events,
        ident=ident,
        created=created,
        fingerprint=fingerprint,
        logprobs=call.chat.params.logprobs is not None,
        legacy_functions=call.legacy_functions,
    )


def _complete_text(events, call: OpenAICall, ident, created, fingerprint) -> dict:
    logprobs = call.chat.params.logprobs is not None
    return completion_body(events, ident=ident, created=created, fingerprint=fingerprint, logprobs=logprobs)


def _chat_chunks(server, call: OpenAICall, ident, created) -> ChatChunks:
    return ChatChunks(
        ident,
        created,
        server.loaded.name,
        server.loaded.tag,
        include_usage=call.include_usage,
        logprobs=call.chat.params.logprobs is not None,
        legacy_functions=call.legacy_functions,
    )


def _text_chunks(server, call: OpenAICall, ident, created) -> CompletionChunks:
    return CompletionChunks(
        ident,
        created,
        server.loaded.name,
        server.loaded.tag,
        include_usage=call.include_usage,
        logprobs=call.chat.params.logprobs is not None,
    )


async def _stream(request, turn, chunks: ChatChunks | CompletionChunks) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Agent-Id": turn.agent_id,
        }
    )
    await response.prepare(request)
    try:
        start = chunks.start()
        if start:
            await response.write(start)
        async for event in turn.events():
            line = chunks.event(event)
            if line:
                await response.write(line)
        await response.write(chunks.end(turn.done))
        await response.write_eof()
    except (ConnectionResetError, ConnectionError, ClientGone):
        turn.cancel()
    return response


async def models(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    data = [{"id": server.loaded.name, "object": "model", "created": int(server.started_wall), "owned_by": "greenroom"}]
    return json_response({"object": "list", "data": data})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
