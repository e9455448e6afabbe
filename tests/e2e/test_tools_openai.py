"""Coding agents on the OpenAI API: tools, structured outputs, logprobs and
/v1/completions, with the official `openai` SDK against the real server and
the embedded model (whose template has no tool support: the Hermes fallback)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest

pytestmark = pytest.mark.e2e

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 40}},
    "required": ["zone"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_PARAMS, "strict": True},
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "Current time in a time zone", "parameters": TIME_PARAMS, "strict": True},
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
GREEDY = dict(model="default", temperature=0)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def forced_weather_call(client, **extra):
    return client.chat.completions.create(
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        **GREEDY,
        **extra,
    )


def call_summary(tool_calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in tool_calls]


# ---------------------------------------------------------------- forced tool calls


def test_required_tool_choice_makes_one_call_whose_arguments_validate(client):
    reply = forced_weather_call(client)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content  # only a call: no text, and no call markup leaking as text
    calls = choice.message.tool_calls
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)


def test_a_streamed_required_call_assembles_into_the_non_streamed_call(client):
    whole = forced_weather_call(client).choices[0]
    with client.chat.completions.stream(
        messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=120, **GREEDY
    ) as stream:
        events = list(stream)
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert call_summary(final.message.tool_calls) == call_summary(whole.message.tool_calls)
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.name, e.parsed_arguments) for e in done] == call_summary(whole.message.tool_calls)
    # The raw deltas: every tool_calls item carries its index, and no content delta holds call markup.
    chunks = [e.chunk for e in events if e.type == "chunk"]
    items = [item for c in chunks if c.choices for item in c.choices[0].delta.tool_calls or ()]
    assert items and all(item.index == 0 for item in items)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_a_named_tool_choice_calls_that_function(client):
    # The question is about the weather; the named function is the other one.
    reply = client.chat.completions.create(
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=120,
        **GREEDY,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] and all(
        c.function.name == "get_time" for c in choice.message.tool_calls
    )
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), TIME_PARAMS)


def test_a_full_round_trip_call_result_then_a_text_answer(client):
    first = forced_weather_call(client).choices[0].message
    call = first.tool_calls[0]
    result = {"city": json.loads(call.function.arguments)["city"], "temperature": 18, "sky": "sunny"}
    messages = [
        *ASK_WEATHER,
        first,  # the SDK's own message object, as agents append it
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    answer = client.chat.completions.create(messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=60, **GREEDY)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert not choice.message.tool_calls
    assert choice.message.content and choice.message.content.strip()
    assert "<tool_call>" not in choice.message.content
    # The call and its result reached the prompt: it is longer than the question alone.
    alone = client.chat.completions.create(messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none", max_tokens=1, **GREEDY)
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens


# ---------------------------------------------------------------- structured outputs


def test_json_schema_output_validates(client):
    reply = client.chat.completions.create(
        messages=[{"role": "user", "content": "Invent a person with a name and an age."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        max_tokens=200,
        **GREEDY,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    age: int = pydantic.Field(ge=0, le=120)


def test_the_sdk_stream_helper_parses_a_structured_output(client):
    with client.chat.completions.stream(
        messages=[{"role": "user", "content": "Invent a person with a name and an age."}],
        response_format=Person,
        max_tokens=200,
        **GREEDY,
    ) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "stop"
    assert isinstance(final.message.parsed, Person)


def test_json_object_output_parses(client):
    reply = client.chat.completions.create(
        messages=[{"role": "user", "content": 'Reply with a JSON object that has the key "answer": what is 2 + 2?'}],
        response_format={"type": "json_object"},
        max_tokens=120,
        **GREEDY,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict)


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_consistent_with_the_sampled_tokens(client):
    ask = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    reply = client.chat.completions.create(messages=ask, max_tokens=20, logprobs=True, top_logprobs=3, **GREEDY)
    choice = reply.choices[0]
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    assert b"".join(bytes(t.bytes) for t in tokens).decode() == choice.message.content
    if choice.finish_reason == "length":
        assert len(tokens) == reply.usage.completion_tokens
    for t in tokens:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3
        assert all(alt.logprob <= 0 for alt in t.top_logprobs)
        # Greedy: the chosen token is the most likely one.
        assert t.logprob >= max(alt.logprob for alt in t.top_logprobs) - 1e-4
    streamed = client.chat.completions.create(
        messages=ask, max_tokens=20, logprobs=True, top_logprobs=3, stream=True, **GREEDY
    )
    streamed_tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or ()]
    assert [t.token for t in streamed_tokens] == [t.token for t in tokens]
    assert [t.logprob for t in streamed_tokens] == pytest.approx([t.logprob for t in tokens], abs=1e-4)


def test_no_logprobs_unless_asked(client):
    reply = client.chat.completions.create(messages=ASK_WEATHER, max_tokens=3, **GREEDY)
    assert reply.choices[0].logprobs is None


# ---------------------------------------------------------------- fields


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 2}, "n"),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "def reverse(s): return s[::-1]"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
    ],
)
def test_unsupported_output_changing_fields_are_400s_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(messages=ASK_WEATHER, max_tokens=3, **GREEDY, **extra)
    assert info.value.status_code == 400
    assert info.value.param == param


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"messages": [*ASK_WEATHER, {"role": "tool", "tool_call_id": "call_nowhere", "content": "18C"}]},
            "messages",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}, "messages"),
    ],
)
def test_tool_input_that_cannot_be_honoured_is_a_400(client, extra, param):
    body = {"messages": ASK_WEATHER, "max_tokens": 3, **GREEDY, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    assert info.value.param == param
    assert info.value.message


def test_an_unknown_field_is_accepted(client):
    reply = client.chat.completions.create(
        messages=ASK_WEATHER, max_tokens=3, extra_body={"a_field_from_the_future": {"x": 1}}, **GREEDY
    )
    assert reply.choices[0].message.content


def test_hint_fields_are_accepted(client):
    reply = client.chat.completions.create(
        messages=ASK_WEATHER,
        max_tokens=3,
        user="hinted-agent",
        store=False,
        metadata={"run": "e2e"},
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="s",
        **GREEDY,
    )
    assert reply.choices[0].message.content


# ---------------------------------------------------------------- /v1/completions

CODE_PROMPT = "def fibonacci(n):\n"


def test_completions_continue_the_raw_prompt(client):
    reply = client.completions.create(model="default", prompt=CODE_PROMPT, max_tokens=24, temperature=0, logprobs=2)
    assert reply.object == "text_completion"
    choice = reply.choices[0]
    assert choice.text
    assert choice.finish_reason in ("stop", "length")
    # The prompt went in as is: no chat template (whose system prompt alone is longer).
    assert reply.usage.prompt_tokens < 15
    assert 0 < reply.usage.completion_tokens <= 24
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_streamed_completions_match_the_non_streamed_reply(client):
    whole = client.completions.create(model="default", prompt=CODE_PROMPT, max_tokens=24, temperature=0)
    chunks = list(
        client.completions.create(
            model="default", prompt=CODE_PROMPT, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize(
    "extra, param",
    [({"suffix": "    return a"}, "suffix"), ({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"n": 2}, "n")],
)
def test_unsupported_completion_fields_are_400s_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="default", prompt=CODE_PROMPT, max_tokens=3, **extra)
    assert info.value.param == param


def test_a_model_with_native_tool_support_gets_its_own_format_and_parser(fresh_server, tmp_path):
    """A tiny model folder whose chat template supports tools (Qwen-style, `<tool_call>`
    added tokens), loaded through the real loader: the tools reach the model through
    that template (the prompt is what the template renders with them), and its calls
    come back through mlx-lm's parser for that format (json_tools)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.tool_parsers import json_tools

    from actors.messages import ChatRequest, Tool
    from actors.prompt import render, tool_format
    from tests.e2e.models import write_tiny_qwen_tools

    folder = write_tiny_qwen_tools(tmp_path / "qwen-tools")
    tokenizer = load_tokenizer(folder)
    fmt = tool_format(tokenizer)
    assert fmt.native and fmt.parse is json_tools.parse_tool_call and fmt.start == "<tool_call>"
    srv = fresh_server("--model", str(folder))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        max_tokens=60, **GREEDY,
    )
    # With a forced call the server renders without a thinking block (the grammar
    # starts at the first generated token).
    expected = render(tokenizer, ChatRequest(
        messages=tuple(ASK_WEATHER), thinking=False,
        tools=(Tool("get_weather", WEATHER["function"]["description"], WEATHER["function"]["parameters"]),)))
    assert reply.usage.prompt_tokens == len(expected.tokens)
    assert "<tools>" in tokenizer.decode(list(expected.tokens))  # the template's own tools section
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
