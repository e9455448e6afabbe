"""The OpenAI HTTP layer without a server: request bodies -> ChatRequest (and
every 400), turn events -> response bodies and SSE chunks."""

from __future__ import annotations

import copy
import logging
import uuid

import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import completion_create_params as text_params
from openai.types.chat import ChatCompletionChunk
from openai.types.chat import completion_create_params as chat_params

from actors.messages import (
    OutputFormat,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    Tool,
    ToolCallEvent,
    TurnDone,
)
from gateway.openai_models import CHAT_REQUEST_MODEL, COMPLETION_REQUEST_MODEL
from gateway.openai_request import BadRequest, parse_chat_body, parse_completion_body
from gateway.openai_response import (
    ChatChunks,
    CompletionChunks,
    chat_completion_body,
    completion_body,
)

VOCAB = 1000
HI = [{"role": "user", "content": "hi"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def chat(**fields):
    return parse_chat_body({"model": "any", "messages": HI, **fields}, VOCAB)


def refused(parse, body) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse(body, VOCAB)
    return info.value


# ---------------------------------------------------------------- request -> ChatRequest


def test_every_sampling_field_reaches_the_sampling_params():
    call = chat(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"17": 5, "3": -100},
        max_tokens=99,
        max_completion_tokens=50,
        stop="END",
        seed=7,
        logprobs=True,
        top_logprobs=3,
    )
    assert call.chat.params == SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias=((3, -100.0), (17, 5.0)),
        max_tokens=50,  # max_completion_tokens wins over the deprecated max_tokens
        stop=("END",),
        seed=7,
        logprobs=3,
    )


def test_unset_sampling_fields_stay_unset_so_the_model_defaults_apply():
    call = chat()
    assert call.chat.params == SamplingParams()
    assert call.chat.params.temperature is None and call.chat.params.logprobs is None
    assert (call.stream, call.include_usage, call.user) == (False, False, None)


def test_small_sampling_details():
    assert chat(max_tokens=12).chat.params.max_tokens == 12
    assert chat(stop=["a", "b"]).chat.params.stop == ("a", "b")
    assert chat(top_k=-1).chat.params.top_k == 0  # vLLM's "off" is mlx-lm's 0
    assert chat(logprobs=True).chat.params.logprobs == 0  # the token's own logprob, no alternatives
    assert chat(logprobs=False).chat.params.logprobs is None
    call = chat(stream=True, stream_options={"include_usage": True}, user="agent-7")
    assert (call.stream, call.include_usage, call.user) == (True, True, "agent-7")


def test_messages_become_chat_template_messages():
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Use "}, {"type": "text", "text": "tools."}]},
        {"role": "user", "content": "Weather in Paris?", "name": "alice"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I should call the tool.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "name": "clock", "content": [{"type": "text", "text": "noon"}]},
        {"role": "assistant", "content": "Sunny at noon."},
    ]
    call = parse_chat_body({"messages": messages, "tools": [WEATHER, CLOCK]}, VOCAB)
    assert call.chat.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
            ],
            "reasoning_content": "I should call the tool.",
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "tool", "content": "noon", "tool_call_id": "call_2", "name": "clock"},
        {"role": "assistant", "content": "Sunny at noon."},
    )


def test_tools_and_tool_choice():
    call = chat(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert call.chat.tools == (Tool("get_weather", "Weather", WEATHER_SCHEMA), Tool("get_time", "", {}))
    assert call.chat.tools[0].parameters == WEATHER_SCHEMA
    assert (call.chat.tool_choice, call.chat.tool_name) == ("function", "get_time")
    assert call.chat.parallel_tool_calls is True
    for choice in ("auto", "none", "required"):
        plain = chat(tools=[WEATHER], tool_choice=choice).chat
        assert (plain.tool_choice, plain.tool_name) == (choice, None)
    assert chat(tools=[WEATHER]).chat.tool_choice == "auto"
    assert chat(tools=[WEATHER], parallel_tool_calls=False).chat.parallel_tool_calls is False
    # A function without parameters, or with {}, takes no arguments.
    bare = chat(tools=[{"type": "function", "function": {"name": "ping"}}, {"type": "function", "function": {"name": "pong", "parameters": {}}}])
    assert [t.parameters for t in bare.chat.tools] == [{"type": "object", "properties": {}}] * 2


def test_legacy_functions_become_tools():
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"role": "function", "name": "get_weather", "content": "rain"},
    ]
    call = parse_chat_body(
        {"messages": history, "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}}, VOCAB
    )
    assert call.legacy_functions
    assert call.chat.tools == (Tool("get_weather", "Weather", WEATHER_SCHEMA),)
    assert (call.chat.tool_choice, call.chat.tool_name, call.chat.parallel_tool_calls) == ("function", "get_weather", False)
    assistant, result = call.chat.messages[1], call.chat.messages[2]
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert result == {"role": "tool", "content": "rain", "tool_call_id": assistant["tool_calls"][0]["id"], "name": "get_weather"}
    assert parse_chat_body({"messages": HI, "functions": [WEATHER["function"]], "function_call": "none"}, VOCAB).chat.tool_choice == "none"


def test_response_format():
    assert chat(response_format={"type": "text"}).chat.output_format is None
    assert chat(response_format={"type": "json_object"}).chat.output_format == OutputFormat("json_object")
    spec = {"name": "weather", "schema": WEATHER_SCHEMA, "strict": True}
    fmt = chat(response_format={"type": "json_schema", "json_schema": spec}).chat.output_format
    assert fmt.kind == "json_schema" and fmt.schema == WEATHER_SCHEMA
    bare = chat(response_format={"type": "json_schema", "json_schema": {"name": "anything"}}).chat.output_format
    assert bare == OutputFormat("json_object")


def test_reasoning_hints_map_to_thinking():
    assert chat().chat.thinking is None
    assert chat(reasoning_effort="none").chat.thinking is False
    assert chat(reasoning_effort="high").chat.thinking is True
    assert chat(reasoning_effort="ultra-new-level").chat.thinking is None
    assert chat(reasoning_effort="high", chat_template_kwargs={"enable_thinking": False}).chat.thinking is False


def test_hint_fields_are_accepted_and_not_logged_as_unknown(caplog):
    hints = dict(
        user="u1",
        store=False,
        metadata={"k": "v"},
        service_tier="auto",
        prompt_cache_key="abc",
        prompt_cache_options={"ttl": "24h"},
        prompt_cache_retention="24h",
        reasoning_effort="low",
        safety_identifier="hash",
        verbosity="low",
        stream_options={"include_usage": False},
        modalities=["text"],
        n=1,
    )
    with caplog.at_level(logging.WARNING, logger="greenroom.gateway.openai"):
        call = chat(**hints)
    assert call.chat.messages == ({"role": "user", "content": "hi"},)
    assert "unknown" not in caplog.text


@pytest.mark.parametrize(
    "sdk_params, model",
    [(chat_params.CompletionCreateParamsBase, CHAT_REQUEST_MODEL), (text_params.CompletionCreateParamsBase, COMPLETION_REQUEST_MODEL)],
    ids=["chat", "completions"],
)
def test_every_field_the_official_sdk_sends_is_declared(sdk_params, model):
    """Each is either implemented, a hint, or a 400 naming it; none is an unknown field."""
    assert set(sdk_params.__annotations__) - set(model.model_fields) == set()


def test_an_unknown_field_is_accepted_and_logged_once(caplog):
    name = f"future_field_{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger="greenroom.gateway.openai"):
        first = chat(**{name: {"x": 1}})
        chat(**{name: 2})
    assert first.chat.messages == ({"role": "user", "content": "hi"},)
    assert caplog.text.count(name) == 1


CHAT_400 = [
    # Output-changing features that are not implemented.
    ({"n": 2}, "n"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    # Shapes and ranges.
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"seed": -1}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}, "response_format"),
    # Content the model cannot read.
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]}, "messages"),
    # Tools.
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
    (
        {"tools": [{"type": "function", "function": {"name": "big", "parameters": {"type": "object", "description": "x" * 70000}}}]},
        "tools",
    ),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
    ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions"),
    ({"functions": [WEATHER["function"]], "function_call": {"name": "nope"}}, "function_call"),
]


@pytest.mark.parametrize("fields, param", CHAT_400, ids=[f"{p}-{i}" for i, (_, p) in enumerate(CHAT_400)])
def test_chat_bad_input_is_a_400_naming_the_field(fields, param):
    error = refused(parse_chat_body, {"model": "any", "messages": HI, **fields})
    assert error.param == param
    assert str(error)


def tool_history(*later):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    return [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]}, *later]


def assistant_calling(arguments: str) -> dict:
    return {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": arguments}}]}


@pytest.mark.parametrize(
    "messages, words",
    [
        (tool_history({"role": "tool", "tool_call_id": "call_9", "content": "x"}), "call_9"),
        ([{"role": "tool", "tool_call_id": "call_1", "content": "x"}, *HI], "call_1"),
        ([*HI, {"role": "function", "name": "get_weather", "content": "x"}], "get_weather"),
        ([*HI, assistant_calling("{oops")], "JSON"),
        ([*HI, assistant_calling("[1]")], "object"),
        ([{"role": "tool", "content": "x"}], "tool_call_id"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image_url"),
    ],
)
def test_bad_conversations_are_400s_that_say_what_is_wrong(messages, words):
    error = refused(parse_chat_body, {"messages": messages, "tools": [WEATHER]})
    assert error.param == "messages"
    assert words in str(error)


def test_a_tool_result_answering_an_earlier_call_is_accepted():
    call = parse_chat_body({"messages": tool_history({"role": "tool", "tool_call_id": "call_1", "content": "hot"})}, VOCAB)
    assert call.chat.messages[-1]["tool_call_id"] == "call_1"


def test_an_invalid_schema_is_a_400_naming_where_it_is():
    bad = {"type": "object", "properties": {"a": {"type": "no-such-type"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": bad}}
    error = refused(parse_chat_body, {"messages": HI, "tools": [tool]})
    assert error.param == "tools" and "tools[0].parameters" in str(error)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}
    assert refused(parse_chat_body, {"messages": HI, "response_format": fmt}).param == "response_format"


def test_a_response_format_schema_need_not_be_an_object():
    schema = {"type": "array", "items": {"type": "integer"}}
    fmt = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": schema}}
    assert chat(response_format=fmt).chat.output_format == OutputFormat("json_schema", schema)


def test_a_schema_is_checked_once_not_on_every_request(monkeypatch):
    from gateway import openai_request

    checked = []
    real = openai_request.validate_schema
    monkeypatch.setattr(openai_request, "validate_schema", lambda schema, **kw: checked.append(kw) or real(schema, **kw))
    tool = {"type": "function", "function": {"name": "unique_tool", "parameters": {"type": "object", "properties": {"q": {"type": "string", "title": uuid.uuid4().hex}}}}}
    for _ in range(3):
        chat(tools=[tool])
    assert len(checked) == 1


def test_a_body_that_is_not_an_object_is_a_400():
    assert "object" in str(refused(parse_chat_body, [1, 2]))


def test_completion_requests():
    call = parse_completion_body({"model": "m", "prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0, "logprobs": 2}, VOCAB)
    assert call.chat.prompt == "def add(a, b):" and call.chat.messages == ()
    assert call.chat.params == SamplingParams(temperature=0.0, max_tokens=16, logprobs=2)
    assert parse_completion_body({"prompt": ["only one"]}, VOCAB).chat.prompt == "only one"
    assert parse_completion_body({"prompt": "x", "echo": False, "suffix": "", "best_of": 1, "n": 1}, VOCAB).chat.prompt == "x"
    streamed = parse_completion_body({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}, VOCAB)
    assert (streamed.stream, streamed.include_usage) == (True, True)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [""]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "suffix": "return a"}, "suffix"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({}, "prompt"),
    ],
)
def test_completion_bad_input_is_a_400_naming_the_field(fields, param):
    assert refused(parse_completion_body, fields).param == param


def test_the_request_models_give_a_json_schema():
    chat_schema = CHAT_REQUEST_MODEL.model_json_schema()
    assert {"messages", "tools", "tool_choice", "response_format", "logprobs"} <= set(chat_schema["properties"])
    assert "messages" in chat_schema["required"]
    completion_schema = COMPLETION_REQUEST_MODEL.model_json_schema()
    assert "prompt" in completion_schema["required"]


# ---------------------------------------------------------------- events -> responses


def done(reason="stop", **kw) -> TurnDone:
    fields = dict(prompt_tokens=20, completion_tokens=6, cached_tokens=8, prefilled_tokens=12, model="tiny")
    return TurnDone(reason, **{**fields, **kw})


def lp(token: str, logprob: float, *top: tuple[str, float]) -> TokenLogprob:
    return TokenLogprob(token, logprob, tuple(token.encode()), tuple((t, v, tuple(t.encode())) for t, v in top))


CALL_A = ToolCallEvent(0, "call_a", "get_weather", '{"city": "Paris"}')
CALL_B = ToolCallEvent(1, "call_b", "get_time", "{}")


def chat_body(events, **kw):
    return chat_completion_body(events, ident="chatcmpl-1", created=5, fingerprint="fp", logprobs=kw.pop("logprobs", False), **kw)


def test_a_text_reply_body():
    body = chat_body([TextDelta("Hello"), TextDelta(" there"), done("length")])
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello there"}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert (body["object"], body["model"], body["id"], body["system_fingerprint"]) == ("chat.completion", "tiny", "chatcmpl-1", "fp")
    assert body["usage"] == {
        "prompt_tokens": 20,
        "completion_tokens": 6,
        "total_tokens": 26,
        "prompt_tokens_details": {"cached_tokens": 8},
        "prefilled_tokens": 12,
    }


def test_a_tool_call_reply_body_has_null_content_and_finish_reason_tool_calls():
    body = chat_body([CALL_A, CALL_B, done("tool_calls")])
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    # A call ended by the model's own stop still reads as a tool-call turn.
    assert chat_body([TextDelta("Let me check."), CALL_A, done("stop")])["choices"][0]["finish_reason"] == "tool_calls"


def test_reasoning_is_kept_apart_from_the_content():
    body = chat_body([ReasoningDelta("Think"), ReasoningDelta("ing."), TextDelta("Answer"), done()])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Answer", "reasoning_content": "Thinking."}


def test_the_legacy_function_call_shape():
    body = chat_body([CALL_A, done("tool_calls")], legacy_functions=True)
    message = body["choices"][0]["message"]
    assert message["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert "tool_calls" not in message
    assert body["choices"][0]["finish_reason"] == "function_call"


def test_chat_logprobs_shape():
    events = [TextDelta("Hi", (lp("Hi", -0.1, ("Hi", -0.1), ("Hey", -2.5)),)), TextDelta("!", (lp("!", -0.3),)), done()]
    logprobs = chat_body(events, logprobs=True)["choices"][0]["logprobs"]
    assert logprobs["content"] == [
        {
            "token": "Hi",
            "logprob": -0.1,
            "bytes": [72, 105],
            "top_logprobs": [
                {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                {"token": "Hey", "logprob": -2.5, "bytes": [72, 101, 121]},
            ],
        },
        {"token": "!", "logprob": -0.3, "bytes": [33], "top_logprobs": []},
    ]


def sse_bodies(raw: bytes) -> list:
    lines = [line for line in raw.split(b"\n\n") if line]
    assert all(line.startswith(b"data: ") for line in lines)
    return [line[6:].decode() if line == b"data: [DONE]" else orjson.loads(line[6:]) for line in lines]


def stream_chat(events, **kw) -> list:
    chunks = ChatChunks("chatcmpl-1", 5, "tiny", "fp", **kw)
    raw = chunks.start()
    for event in events[:-1]:
        raw += chunks.event(event) or b""
    return sse_bodies(raw + chunks.end(events[-1]))


def test_a_streamed_reply_role_deltas_finish_usage_done():
    bodies = stream_chat([ReasoningDelta("hmm"), TextDelta("Hel"), TextDelta("lo"), done()], include_usage=True)
    assert bodies[-1] == "[DONE]"
    chunks = bodies[:-1]
    assert [c["choices"][0]["delta"] for c in chunks[:-2]] == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "hmm"},
        {"content": "Hel"},
        {"content": "lo"},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["id"] for c in chunks} == {"chatcmpl-1"}
    without_usage = stream_chat([TextDelta("x"), done()])
    assert all("usage" not in c for c in without_usage[:-1])


def test_streamed_tool_calls_assemble_into_the_non_streamed_calls():
    events = [TextDelta("Checking."), CALL_A, CALL_B, done("tool_calls")]
    bodies = stream_chat(events)
    deltas = [c["choices"][0]["delta"] for c in bodies[:-1]]
    assert deltas[2]["tool_calls"] == [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    state = ChatCompletionStreamState()
    for body in bodies[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate(body))
    streamed = state.get_final_completion().choices[0]
    whole = chat_body(events)["choices"][0]
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
        (c["id"], c["type"], c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]
    ]
    assert streamed.message.content == whole["message"]["content"] == "Checking."
    assert streamed.finish_reason == whole["finish_reason"] == "tool_calls"


def test_streamed_logprobs_and_legacy_function_call():
    bodies = stream_chat([TextDelta("Hi", (lp("Hi", -0.2),)), done()], logprobs=True)
    assert bodies[1]["choices"][0]["logprobs"]["content"][0]["token"] == "Hi"
    assert bodies[0]["choices"][0]["logprobs"] is None
    legacy = stream_chat([CALL_A, CALL_B, done("tool_calls")], legacy_functions=True)
    deltas = [c["choices"][0]["delta"] for c in legacy[:-1]]
    assert deltas[1] == {"function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert not any("tool_calls" in d for d in deltas)
    assert legacy[-2]["choices"][0]["finish_reason"] == "function_call"


def test_an_error_mid_stream_is_an_error_line_then_done():
    bodies = stream_chat([TextDelta("par"), done("error", error="model step failed")], include_usage=True)
    assert bodies[-2] == {"error": {"message": "model step failed", "type": "server_error", "param": None, "code": "server_error"}}
    assert bodies[-1] == "[DONE]"
    assert not any(isinstance(b, dict) and b.get("choices") and b["choices"][0]["finish_reason"] for b in bodies)


def test_a_completion_body_with_legacy_logprobs():
    events = [TextDelta("ab", (lp("a", -0.5, ("a", -0.5), ("b", -1.0)), lp("b", -0.25, ("b", -0.25)))), TextDelta("c", (lp("c", -1.5),)), done("length")]
    body = completion_body(events, ident="cmpl-1", created=5, fingerprint="fp", logprobs=True)
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("abc", "length")
    assert choice["logprobs"] == {
        "tokens": ["a", "b", "c"],
        "token_logprobs": [-0.5, -0.25, -1.5],
        "top_logprobs": [{"a": -0.5, "b": -1.0}, {"b": -0.25}, {}],
        "text_offset": [0, 1, 2],
    }
    assert body["usage"]["total_tokens"] == 26
    plain = completion_body(events, ident="cmpl-1", created=5, fingerprint="fp", logprobs=False)
    assert plain["choices"][0]["logprobs"] is None


def test_a_streamed_completion():
    chunks = CompletionChunks("cmpl-1", 5, "tiny", "fp", include_usage=True, logprobs=True)
    assert chunks.start() is None
    raw = b"".join(
        chunks.event(e) for e in [TextDelta("ab", (lp("a", -0.5), lp("b", -0.1))), TextDelta("c", (lp("c", -0.2),))]
    )
    bodies = sse_bodies(raw + chunks.end(done("stop")))
    assert bodies[-1] == "[DONE]"
    texts = [b["choices"][0]["text"] for b in bodies[:-2]]
    assert "".join(texts) == "abc" and texts[-1] == ""
    assert [b["choices"][0]["logprobs"]["text_offset"] for b in bodies[:2]] == [[0, 1], [2]]
    assert bodies[-3]["choices"][0]["finish_reason"] == "stop"
    assert bodies[-2]["choices"] == [] and bodies[-2]["usage"]["completion_tokens"] == 6
    assert {b["object"] for b in bodies[:-1]} == {"text_completion"}


def test_translation_does_not_mutate_the_body():
    body = {"messages": tool_history(), "tools": [copy.deepcopy(WEATHER)]}
    before = copy.deepcopy(body)
    parse_chat_body(body, VOCAB)
    assert body == before
