"""The Anthropic Messages API layer without a model: request translation, agent
identity, events -> message bodies and SSE sequences, and the HTTP handlers
against a scripted session (refusals, pings while a prompt prefills, errors)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from types import SimpleNamespace

import anthropic
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from actors.cachestore import validate_agent_id
from actors.messages import (
    OutputFormat,
    ReasoningDelta,
    TextDelta,
    ToolCallEvent,
    TurnDone,
    TurnRejected,
)
from actors.supervisor import Admission
from gateway import anthropic as api
from gateway.anthropic_models import CountTokensRequest, MessagesRequest, Metadata
from gateway.anthropic_reply import Reply, ToolArgumentsError
from gateway.anthropic_translate import (
    BadRequest,
    agent_id_for,
    as_agent_id,
    to_chat_request,
    validation_message,
)
from gateway.app import SERVER

USER = {"role": "user", "content": "hello"}
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def chat_of(**fields):
    body = {"model": "claude-sonnet-5", "max_tokens": 100, "messages": [USER], **fields}
    return to_chat_request(MessagesRequest.model_validate(body))


def done(finish="stop", **kw):
    fields = dict(prompt_tokens=120, completion_tokens=7, cached_tokens=100, prefilled_tokens=20, model="m")
    return TurnDone(finish, **{**fields, **kw})


# ---------------------------------------------------------------- system prompt


def test_billing_block_is_dropped_and_the_rest_joined():
    system = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.a1f; cc_entrypoint=cli;"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Be brief."},
    ]
    chat = chat_of(system=system)
    assert chat.messages[0] == {"role": "system", "content": "You are Claude Code.\n\nBe brief."}
    changed = [{**system[0], "text": "x-anthropic-billing-header: cc_version=2.1.332.9be;"}, *system[1:]]
    assert chat_of(system=changed).messages == chat.messages


def test_system_string_and_no_system():
    assert chat_of(system="Be brief.").messages[0] == {"role": "system", "content": "Be brief."}
    assert chat_of().messages == ({"role": "user", "content": "hello"},)


def test_mid_conversation_system_is_folded_into_the_next_user_turn():
    messages = [
        USER,
        {"role": "assistant", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "The date changed."}]},
        {"role": "user", "content": [{"type": "text", "text": "what now?"}]},
    ]
    chat = chat_of(system="S", messages=messages)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user"]
    assert chat.messages[-1]["content"] == "The date changed.\n\nwhat now?"


def test_trailing_system_is_folded_into_the_previous_user_turn():
    messages = [USER, {"role": "assistant", "content": "hi"}, {"role": "system", "content": "Remember X."}]
    chat = chat_of(messages=messages)
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[0]["content"] == "hello\n\nRemember X."


def test_system_messages_without_any_user_turn_join_the_system_prompt():
    messages = [{"role": "system", "content": "Extra."}, {"role": "assistant", "content": "ok"}]
    chat = chat_of(system="Main.", messages=messages)
    assert chat.messages[0] == {"role": "system", "content": "Main.\n\nExtra."}


# ---------------------------------------------------------------- tools in history


def tool_round_trip(result_block):
    return [
        USER,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Need the weather.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {"role": "user", "content": [result_block, {"type": "text", "text": "and tomorrow?"}]},
    ]


def test_tool_use_and_tool_result_map_onto_tool_calls_and_tool_messages():
    result = {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 C, sunny"}
    chat = chat_of(messages=tool_round_trip(result), tools=[WEATHER])
    user, assistant, tool, follow_up = chat.messages
    assert assistant == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [{"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        "reasoning_content": "Need the weather.",
    }
    assert tool == {"role": "tool", "tool_call_id": "toolu_01", "content": "18 C, sunny", "name": "get_weather"}
    assert follow_up == {"role": "user", "content": "and tomorrow?"}


def test_tool_result_blocks_and_is_error():
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_01",
        "is_error": True,
        "content": [{"type": "text", "text": "city not found"}, {"type": "text", "text": "try again"}],
    }
    tool = chat_of(messages=tool_round_trip(result)).messages[2]
    assert tool["content"] == "Error: city not found\ntry again"


def test_image_in_a_tool_result_becomes_a_placeholder():
    result = {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "image", "source": {"type": "base64"}}]}
    tool = chat_of(messages=tool_round_trip(result)).messages[2]
    assert "image omitted" in tool["content"]


@pytest.mark.parametrize("kind", ["image", "document"])
def test_image_and_document_blocks_are_refused_by_name(kind):
    message = {"role": "user", "content": [{"type": kind, "source": {"type": "base64", "data": "AAAA"}}]}
    with pytest.raises(BadRequest, match=kind):
        chat_of(messages=[message])


def test_unknown_block_type_is_refused_by_name():
    message = {"role": "user", "content": [{"type": "search_result", "source": "x"}]}
    with pytest.raises(BadRequest, match="search_result"):
        chat_of(messages=[message])


# ---------------------------------------------------------------- tools, choices, formats


def test_tools_and_tool_choice():
    chat = chat_of(tools=[WEATHER])
    assert chat.tools[0].name == "get_weather"
    assert chat.tools[0].parameters == WEATHER["input_schema"]
    assert (chat.tool_choice, chat.tool_name, chat.parallel_tool_calls) == ("auto", None, True)
    cases = {
        "auto": ("auto", None),
        "any": ("required", None),
        "none": ("none", None),
        "tool": ("function", "get_weather"),
    }
    for kind, expected in cases.items():
        choice = {"type": kind, "name": "get_weather"} if kind == "tool" else {"type": kind}
        chat = chat_of(tools=[WEATHER], tool_choice=choice)
        assert (chat.tool_choice, chat.tool_name) == expected
    chat = chat_of(tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert chat.parallel_tool_calls is False


def test_deferred_tools_stay_out_of_the_prompt_unless_named():
    deferred = {**WEATHER, "name": "later", "defer_loading": True}
    assert [t.name for t in chat_of(tools=[WEATHER, deferred]).tools] == ["get_weather"]
    chat = chat_of(tools=[WEATHER, deferred], tool_choice={"type": "tool", "name": "later"})
    assert [t.name for t in chat.tools] == ["get_weather", "later"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tool_choice": {"type": "any"}}, "needs at least one tool"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "'nope'"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
    ],
)
def test_impossible_tool_requests_are_400(fields, message):
    with pytest.raises(BadRequest, match=message):
        chat_of(**fields)


def test_output_config_format_and_legacy_output_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_of(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert chat.output_format == OutputFormat("json_schema", schema)
    assert chat.output_format.schema == schema
    assert chat_of(output_format={"type": "json_schema", "schema": schema}).output_format.schema == schema
    assert chat_of().output_format is None


BAD_SCHEMA = {"type": "object", "properties": {"city": {"type": "strng"}}}


def test_schemas_that_cannot_constrain_decoding_are_400():
    with pytest.raises(BadRequest, match="output_config.format.schema"):
        chat_of(output_config={"format": {"type": "json_schema", "schema": BAD_SCHEMA}})
    broken = {**WEATHER, "input_schema": BAD_SCHEMA}
    with pytest.raises(BadRequest, match="tools.1.input_schema"):
        chat_of(tools=[WEATHER, broken], tool_choice={"type": "any"})
    with pytest.raises(BadRequest, match="tools.0.input_schema"):
        chat_of(tools=[{**broken, "name": "b"}], tool_choice={"type": "tool", "name": "b"})


def test_tool_schemas_are_not_compiled_when_no_call_is_forced():
    broken = {**WEATHER, "name": "b", "input_schema": BAD_SCHEMA}
    assert chat_of(tools=[broken]).tools[0].parameters == BAD_SCHEMA
    chat = chat_of(tools=[WEATHER, broken], tool_choice={"type": "tool", "name": "get_weather"})
    assert chat.tool_name == "get_weather"


@pytest.mark.parametrize(
    "fields, thinking, budget",
    [
        ({}, None, None),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, True, 2048),
        ({"thinking": {"type": "adaptive"}}, None, None),
        ({"thinking": {"type": "disabled"}}, False, None),
        ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, None, 1024),
        ({"output_config": {"effort": "high"}}, None, 16384),
        ({"output_config": {"effort": "max"}}, None, None),
        ({"thinking": {"type": "disabled"}, "output_config": {"effort": "high"}}, False, None),
        ({"thinking": {"type": "enabled", "budget_tokens": 3000}, "output_config": {"effort": "low"}}, True, 3000),
    ],
)
def test_thinking_and_effort(fields, thinking, budget):
    chat = chat_of(**fields)
    assert (chat.thinking, chat.thinking_budget) == (thinking, budget)


def test_sampling_is_unset_unless_the_request_sets_it():
    params = chat_of().params
    assert (params.temperature, params.top_p, params.top_k) == (None, None, None)
    assert params.max_tokens == 100 and params.stop == ()
    params = chat_of(temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["END"]).params
    assert (params.temperature, params.top_p, params.top_k, params.stop) == (0.2, 0.9, 40, ("END",))


def test_unknown_fields_and_ignored_features_are_accepted(caplog):
    caplog.set_level(logging.INFO, "greenroom.anthropic")
    fields = dict(
        cache_control={"type": "ephemeral"},
        context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
        container="c",
        mcp_servers=[],
        service_tier="auto",
        metadata={"user_id": "u", "extra": 1},
        a_field_from_2099={"x": 1},
    )
    body = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "messages": [USER], **fields})
    api.log_unknown_fields(body)
    api.log_unknown_fields(body)
    assert to_chat_request(body).messages == ({"role": "user", "content": "hello"},)
    assert caplog.text.count("a_field_from_2099") == 1


@pytest.mark.parametrize(
    "body, where",
    [
        ({"model": "m", "messages": [USER]}, "max_tokens"),
        ({"model": "m", "max_tokens": 0, "messages": [USER]}, "max_tokens"),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text: Field required"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "m", "max_tokens": 5, "messages": [USER], "tool_choice": {"type": "tool"}}, "tool_choice"),
        ({"model": "m", "max_tokens": 5, "messages": [USER], "thinking": {"type": "enabled"}}, "thinking"),
        ({"model": "m", "max_tokens": 5, "messages": [USER], "stop_sequences": ["a"] * 17}, "stop_sequences"),
    ],
)
def test_validation_errors_name_the_field(body, where):
    with pytest.raises(Exception) as info:
        MessagesRequest.model_validate(body)
    assert validation_message(info.value).startswith(where)


def test_count_tokens_request_needs_no_max_tokens():
    body = CountTokensRequest.model_validate({"model": "m", "messages": [USER]})
    assert to_chat_request(body).params.max_tokens is None


# ---------------------------------------------------------------- identity


def test_agent_id_sources_in_order():
    session = "2b6c3f1e-9d0a-4c47-8f5e-1a2b3c4d5e6f"
    user_id = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session})
    meta = Metadata(user_id=user_id)
    assert agent_id_for({"X-Agent-Id": "mine"}, meta) == "mine"
    assert agent_id_for({"X-Claude-Code-Session-Id": "abc-1"}, meta) == "abc-1"
    assert agent_id_for({}, meta) == session
    assert agent_id_for({}, Metadata(user_id="plain.user")) == "plain.user"
    old = f"user_{'a' * 64}_account_{session}_session_{session}"
    assert agent_id_for({}, Metadata(user_id=old)) == session
    assert agent_id_for({}, None) is None
    assert agent_id_for({}, Metadata()) is None


def test_invalid_ids_map_deterministically_onto_valid_ones():
    for raw in ("has spaces", "../../etc", "x" * 300, ".hidden", "é"):
        mapped = agent_id_for({"X-Claude-Code-Session-Id": raw}, None)
        assert validate_agent_id(mapped) == mapped
        assert mapped == as_agent_id(raw)
    assert as_agent_id("a b") != as_agent_id("a  b")
    assert agent_id_for({}, Metadata(user_id='{"session_id": "not valid!"}')) == as_agent_id("not valid!")


def test_an_invalid_explicit_agent_id_is_a_400():
    with pytest.raises(BadRequest, match="X-Agent-Id"):
        agent_id_for({"X-Agent-Id": "../etc"}, None)


# ---------------------------------------------------------------- events -> message and stream


def run_reply(events, finished):
    reply = Reply("claude-sonnet-5")
    stream = reply.start()
    for event in events:
        stream += reply.feed(event)
    stream += reply.finish(finished)
    return reply.message(finished), stream


def check_stream(stream) -> dict:
    """Stream invariants as a client relies on them; returns the message the stream builds."""
    names = [name for name, _ in stream]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    message = stream[0][1]["message"]
    assert message["content"] == []
    open_index, json_parts = None, {}
    for name, data in stream[1:-2]:
        assert data["type"] == name
        if name == "content_block_start":
            assert open_index is None, "a block started before the previous one stopped"
            assert data["index"] == len(message["content"])
            open_index = data["index"]
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            assert data["index"] == open_index
            block, delta = message["content"][open_index], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                assert not block["signature"], "thinking after its signature"
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                json_parts[open_index] = json_parts.get(open_index, "") + delta["partial_json"]
        elif name == "content_block_stop":
            assert data["index"] == open_index
            block = message["content"][open_index]
            if block["type"] == "thinking":
                assert block["signature"], "a thinking block closed without its signature"
            if block["type"] == "tool_use":
                block["input"] = json.loads(json_parts[open_index])
            open_index = None
    assert open_index is None, "a block was never closed"
    delta = stream[-2][1]
    message.update(delta["delta"])
    message["usage"] = {**message["usage"], **delta["usage"]}
    return message


def test_text_reply_body_and_stream():
    body, stream = run_reply([TextDelta("Hel"), TextDelta(""), TextDelta("lo")], done())
    assert body["content"] == [{"type": "text", "text": "Hello"}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["model"] == "claude-sonnet-5"
    assert re.fullmatch(r"msg_\w{24,}", body["id"])
    # Anthropic's meaning: input_tokens is the part of the 120-token prompt not read from the cache.
    assert body["usage"] == {
        "input_tokens": 20,
        "output_tokens": 7,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 0,
    }
    anthropic.types.Message.model_validate(body)
    assert check_stream(stream) == body


def test_thinking_text_and_tool_calls():
    events = [
        ReasoningDelta("I should "),
        ReasoningDelta("look it up."),
        TextDelta("Let me check."),
        ToolCallEvent(0, "call_1", "get_weather", '{"city": "Paris", "note": "' + "x" * 150 + '"}'),
        ToolCallEvent(1, "toolu_abc", "get_weather", "{}"),
    ]
    body, stream = run_reply(events, done("tool_calls"))
    assert [b["type"] for b in body["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    thinking, text, call, empty_call = body["content"]
    assert thinking["thinking"] == "I should look it up." and thinking["signature"]
    assert call["input"] == {"city": "Paris", "note": "x" * 150}
    assert re.fullmatch(r"toolu_\w+", call["id"]) and empty_call["id"] == "toolu_abc"
    assert empty_call["input"] == {}
    assert body["stop_reason"] == "tool_use"
    pieces = [d["delta"]["partial_json"] for n, d in stream if n == "content_block_delta" and d["index"] == 2]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == call["input"]
    anthropic.types.Message.model_validate(body)
    assert check_stream(stream) == body


def test_reasoning_after_text_opens_a_new_block_after_closing_the_text():
    body, stream = run_reply([TextDelta("a"), ReasoningDelta("b"), TextDelta("c")], done())
    assert [b["type"] for b in body["content"]] == ["text", "thinking", "text"]
    assert check_stream(stream) == body


@pytest.mark.parametrize(
    "finished, reason, sequence",
    [
        (done("length"), "max_tokens", None),
        (done("stop", stop_sequence="END"), "stop_sequence", "END"),
        (done("tool_calls"), "tool_use", None),
        (done("stop"), "end_turn", None),
    ],
)
def test_stop_reasons(finished, reason, sequence):
    body, stream = run_reply([TextDelta("x")], finished)
    assert (body["stop_reason"], body["stop_sequence"]) == (reason, sequence)
    assert stream[-2][1]["delta"] == {"stop_reason": reason, "stop_sequence": sequence}


def test_tool_arguments_that_are_not_an_object_are_an_error():
    with pytest.raises(ToolArgumentsError):
        Reply("m").feed(ToolCallEvent(0, "c", "f", "[1, 2]"))
    with pytest.raises(ToolArgumentsError):
        Reply("m").feed(ToolCallEvent(0, "c", "f", "{not json"))


# ---------------------------------------------------------------- HTTP, against a scripted session


class ScriptedSession:
    """Answers each Turn by running `script(turn)` (emits its events)."""

    def __init__(self, script, tasks):
        self.script, self.tasks, self.requests = script, tasks, []

    def tell(self, chat_turn):
        self.requests.append(chat_turn.request)
        self.tasks.append(asyncio.ensure_future(self.script(chat_turn)))


class ScriptedPool:
    def __init__(self, session):
        self.sess = session
        self.agents = []

    async def session(self, agent_id):
        self.agents.append(agent_id)
        return self.sess

    async def ephemeral(self):
        self.agents.append(None)
        return "ephemeral-1", self.sess

    async def release(self, agent_id):
        pass

    def want_room(self):
        pass


@contextlib.asynccontextmanager
async def scripted_app(script, *, max_body=1 << 20):
    tasks = []
    session = ScriptedSession(script, tasks)
    app = web.Application(client_max_size=max_body)
    app[SERVER] = SimpleNamespace(
        pool=ScriptedPool(session), admission=Admission(), loaded=SimpleNamespace(name="served", tokenizer=None),
        config=SimpleNamespace(drain_timeout=30.0, stall_timeout=600.0),
    )
    api.add_routes(app)
    try:
        async with TestClient(TestServer(app)) as client:
            yield client, session
    finally:
        for task in tasks:
            task.cancel()


def answer(*events, wait: asyncio.Event | None = None):
    async def script(chat_turn):
        if wait is not None:
            await wait.wait()
        for event in events:
            if isinstance(event, TurnRejected):
                chat_turn.reject(event)
            else:
                chat_turn.emit(event)

    return script


BODY = {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [USER]}
TOO_LONG = TurnRejected(400, "long", "context_length_exceeded", prompt_tokens=9000, limit=8192)


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for chunk in text.strip().split("\n\n"):
        name, data = chunk.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


async def test_non_streamed_reply_over_http():
    async with scripted_app(answer(TextDelta("Hi"), done())) as (client, session):
        resp = await client.post("/v1/messages?beta=true", json=BODY, headers={"X-Claude-Code-Session-Id": "s-1"})
        body = await resp.json()
    assert resp.status == 200, body
    assert body["model"] == "claude-haiku-4-5" and body["content"] == [{"type": "text", "text": "Hi"}]
    assert resp.headers["X-Agent-Id"] == "s-1"
    anthropic.types.Message.model_validate(body)


async def test_stream_pings_while_the_prompt_prefills():
    release = asyncio.Event()
    script = answer(TextDelta("Hi"), done(), wait=release)
    old = api.ACCEPT_WINDOW_S, api.PING_INTERVAL_S
    api.ACCEPT_WINDOW_S, api.PING_INTERVAL_S = 0.05, 0.05
    try:
        async with scripted_app(script) as (client, _):
            resp = await client.post("/v1/messages", json={**BODY, "stream": True})
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
            seen = b""
            # message_start and pings arrive while the session has produced nothing.
            while seen.count(b"event: ping") < 3:
                seen += await asyncio.wait_for(resp.content.readany(), 5)
            assert seen.startswith(b"event: message_start")
            release.set()
            stream = parse_sse((seen + await resp.content.read()).decode())
    finally:
        api.ACCEPT_WINDOW_S, api.PING_INTERVAL_S = old
    names = [n for n, _ in stream]
    assert names[:2] == ["message_start", "ping"] and names.count("ping") >= 3
    without_pings = [e for e in stream if e[0] != "ping"]
    message = check_stream(without_pings)
    assert message["content"] == [{"type": "text", "text": "Hi"}]
    assert message["usage"]["input_tokens"] == 20


async def test_prompt_too_long_is_a_400_in_anthropic_wording():
    for stream in (False, True):
        async with scripted_app(answer(TOO_LONG)) as (client, _):
            resp = await client.post("/v1/messages", json={**BODY, "stream": stream})
            body = await resp.json()
        assert resp.status == 400
        assert body == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "prompt is too long: 9000 tokens > 8192 maximum"},
        }


async def test_a_refusal_after_the_headers_is_an_error_event():
    release = asyncio.Event()
    old = api.ACCEPT_WINDOW_S
    api.ACCEPT_WINDOW_S = 0.01
    try:
        async with scripted_app(answer(TOO_LONG, wait=release)) as (client, _):
            resp = await client.post("/v1/messages", json={**BODY, "stream": True})
            assert resp.status == 200
            release.set()
            stream = parse_sse(await resp.text())
    finally:
        api.ACCEPT_WINDOW_S = old
    assert [n for n, _ in stream] == ["message_start", "ping", "error"]
    assert stream[-1][1]["error"]["message"] == "prompt is too long: 9000 tokens > 8192 maximum"


async def test_a_failure_mid_stream_is_an_error_event():
    failed = done("error", error="model step failed")
    async with scripted_app(answer(TextDelta("partial"), failed)) as (client, _):
        resp = await client.post("/v1/messages", json={**BODY, "stream": True})
        stream = parse_sse(await resp.text())
    assert stream[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "model step failed"}})
    async with scripted_app(answer(TextDelta("partial"), failed)) as (client, _):
        resp = await client.post("/v1/messages", json=BODY)
        assert resp.status == 500 and (await resp.json())["error"]["type"] == "api_error"


@pytest.mark.parametrize(
    "rejected, status, kind",
    [
        (TurnRejected(429, "too many queued turns", "rate_limit_exceeded"), 429, "rate_limit_error"),
        (TurnRejected(503, "server busy", "server_busy"), 529, "overloaded_error"),
        (TurnRejected(400, "template error"), 400, "invalid_request_error"),
    ],
)
async def test_refusals_map_onto_anthropic_statuses(rejected, status, kind):
    async with scripted_app(answer(rejected)) as (client, _):
        resp = await client.post("/v1/messages", json=BODY)
        body = await resp.json()
    assert (resp.status, body["type"], body["error"]["type"]) == (status, "error", kind)


@pytest.mark.parametrize(
    "payload, status, kind",
    [
        (b"{not json", 400, "invalid_request_error"),
        (b"[1]", 400, "invalid_request_error"),
        (orjson.dumps({**BODY, "max_tokens": None}), 400, "invalid_request_error"),
        (orjson.dumps({**BODY, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}), 400, "invalid_request_error"),
        (orjson.dumps({**BODY, "pad": "x" * 5000}), 413, "request_too_large"),
    ],
)
async def test_bad_bodies(payload, status, kind):
    async with scripted_app(answer(TextDelta("x"), done()), max_body=4096) as (client, session):
        resp = await client.post("/v1/messages", data=payload, headers={"Content-Type": "application/json"})
        body = await resp.json()
    assert (resp.status, body["error"]["type"]) == (status, kind), body
    assert session.requests == []


async def test_unknown_fields_betas_and_identity_reach_the_session():
    body = {**BODY, "context_management": {}, "brand_new": 1, "metadata": {"user_id": '{"session_id": "sess-9"}'}}
    headers = {"anthropic-beta": "made-up-2099-01-01,another-beta", "anthropic-version": "2023-06-01"}
    async with scripted_app(answer(TextDelta("x"), done())) as (client, session):
        resp = await client.post("/v1/messages", json=body, headers=headers)
        assert resp.status == 200, await resp.text()
    assert client.server.app[SERVER].pool.agents == ["sess-9"]


async def test_root_answers_get_and_head():
    async with scripted_app(answer()) as (client, _):
        assert (await client.get("/")).status == 200
        assert (await client.head("/")).status == 200


async def test_a_client_gone_during_prefill_cancels_the_turn():
    turns = []

    async def never_answers(chat_turn):
        turns.append(chat_turn)
        await asyncio.Event().wait()

    old = api.ACCEPT_WINDOW_S, api.PING_INTERVAL_S
    api.ACCEPT_WINDOW_S, api.PING_INTERVAL_S = 0.01, 0.05
    try:
        async with scripted_app(never_answers) as (client, _):
            resp = await client.post("/v1/messages", json={**BODY, "stream": True})
            assert (await resp.content.readany()).startswith(b"event: message_start")
            resp.close()
            for _ in range(100):
                if turns[0].cancel_requested:
                    break
                await asyncio.sleep(0.05)
    finally:
        api.ACCEPT_WINDOW_S, api.PING_INTERVAL_S = old
    assert turns[0].cancel_requested
