"""OpenAI-compatible endpoints: /v1/chat/completions and /v1/models.

Validation happens here, before anything reaches an actor: a wrong shape, an
unknown role or an out-of-range value is a 400 in OpenAI's error shape.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import orjson
from aiohttp import web

from actors.cachestore import InvalidAgentId, validate_agent_id
from actors.messages import ChatRequest as InternalChat
from actors.messages import SamplingParams, TextDelta, TurnDone
from gateway.app import SERVER, error_response, json_response
from gateway.turns import ClientGone, TurnRefused, open_turn

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_MESSAGES = 4096
MAX_STOP = 4
MAX_STOP_LEN = 256
MAX_MAX_TOKENS = 1 << 20


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: tuple[dict, ...]
    params: SamplingParams
    stream: bool
    include_usage: bool
    user: str | None


def _number(body: dict, key: str, default, lo: float, hi: float, *, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}", key)
    if not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return value


def _content_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts", "messages")


def parse_chat_request(body) -> ChatRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"at most {MAX_MESSAGES} messages", "messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}", "messages")
        role = "system" if role == "developer" else role
        parsed.append({"role": role, "content": _content_text(m.get("content"), i)})
    n = _number(body, "n", 1, 1, 1, integer=True)
    del n  # only n=1 is served; the range check above says so
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_LEN for s in stop):
        raise BadRequest(f"at most {MAX_STOP} stop strings of {MAX_STOP_LEN} characters", "stop")
    max_tokens = _number(body, "max_completion_tokens", None, 1, MAX_MAX_TOKENS, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, 1, MAX_MAX_TOKENS, integer=True)
    params = SamplingParams(
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)),
        max_tokens=max_tokens,
        stop=stop,
        seed=_number(body, "seed", None, 0, 2**32 - 1, integer=True),
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("'stream_options.include_usage' must be a boolean", "stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("'user' must be a string", "user")
    return ChatRequest(tuple(parsed), params, stream, include_usage, user)


def agent_id_for(request: web.Request, chat_user: str | None) -> str | None:
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


def usage_dict(done: TurnDone) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
        # greenroom extension: prompt tokens that actually went through the model.
        "prefilled_tokens": done.prefilled_tokens,
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    try:
        chat = parse_chat_request(await read_json(request))
        agent_id = agent_id_for(request, chat.user)
    except BadRequest as exc:
        return error_response(400, str(exc), param=exc.param)
    internal = InternalChat(messages=chat.messages, params=chat.params)
    try:
        async with open_turn(request, server, internal, agent_id) as turn:
            await turn.first()
            ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            if chat.stream:
                return await _stream(request, server, chat, turn, ident, created)
            return await _complete(server, turn, ident, created)
    except TurnRefused as exc:
        return error_response(exc.status, exc.message, exc.code)
    except ClientGone:
        return web.Response(status=499)


async def _complete(server, turn, ident, created) -> web.Response:
    parts = []
    async for event in turn.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
    done = turn.done
    if done.finish_reason == "error":
        return error_response(500, done.error or "generation failed", "server_error")
    body = {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": done.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts)},
                "finish_reason": done.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_dict(done),
        "system_fingerprint": server.loaded.tag,
    }
    return json_response(body, headers={"X-Agent-Id": turn.agent_id})


async def _stream(request, server, chat, turn, ident, created):
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Agent-Id": turn.agent_id,
        }
    )
    await response.prepare(request)
    model = server.loaded.name

    def chunk(delta: dict, finish_reason=None, usage=None) -> bytes:
        body = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": server.loaded.tag,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
            if usage is None
            else [],
        }
        if usage is not None or chat.include_usage:
            body["usage"] = usage
        return b"data: " + orjson.dumps(body) + b"\n\n"

    try:
        await response.write(chunk({"role": "assistant", "content": ""}))
        async for event in turn.events():
            if isinstance(event, TextDelta):
                await response.write(chunk({"content": event.text}))
        done = turn.done
        if done.finish_reason == "error":
            err = {"error": {"message": done.error or "generation failed", "type": "server_error", "code": "server_error"}}
            await response.write(b"data: " + orjson.dumps(err) + b"\n\n")
        else:
            await response.write(chunk({}, done.finish_reason))
            if chat.include_usage:
                await response.write(chunk({}, usage=usage_dict(done)))
        await response.write(b"data: [DONE]\n\n")
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
    app.router.add_get("/v1/models", models)
