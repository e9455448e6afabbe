"""The Anthropic Messages API of the real server with the embedded model, through the
official `anthropic` SDK (and raw HTTP where the SDK hides the wire: pings)."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid

import anthropic
import jsonschema
import pytest

pytestmark = pytest.mark.e2e

MODEL = "claude-sonnet-5"  # any name is served by the loaded model and echoed back
# The current SDK has no temperature; older clients send it. Greedy makes replies comparable.
GREEDY = {"temperature": 0}
REVERSE = [{"role": "user", "content": "Write a Python function that reverses a string."}]
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
TOO_LONG = re.compile(r"prompt is too long: (\d+) tokens > (\d+) maximum")


def prompt_total(usage) -> int:
    """The whole prompt, as Anthropic reports it: the uncached part, plus what came from
    the cache, plus what was written to it (Claude Code sums them to size its context)."""
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=300)


def without_ids(message) -> dict:
    data = message.model_dump(exclude={"id"})
    for block in data["content"]:
        block.pop("id", None)
    return data


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for chunk in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# ---------------------------------------------------------------- text


def test_root_answers_get_and_head(server):
    assert server.request("GET", "/")[0] == 200
    with urllib.request.urlopen(urllib.request.Request(server.url + "/", method="HEAD"), timeout=30) as reply:
        assert reply.status == 200


def test_text_reply(client):
    reply = client.messages.create(model=MODEL, max_tokens=40, messages=REVERSE, extra_body=GREEDY)
    assert reply.model == MODEL
    assert re.fullmatch(r"msg_\w{24,}", reply.id)
    assert [b.type for b in reply.content] == ["text"]
    assert "def " in reply.content[0].text
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.stop_sequence is None
    assert reply.usage.input_tokens > 10
    assert 0 < reply.usage.output_tokens <= 40


def test_streamed_reply_equals_the_whole_one(client):
    params = dict(model=MODEL, max_tokens=40, messages=REVERSE, extra_body=GREEDY)
    whole = client.messages.create(**params)
    with client.messages.stream(**params) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert without_ids(streamed) == without_ids(whole)


def test_raw_stream_has_pings_and_closed_blocks(server):
    body = {"model": MODEL, "max_tokens": 20, "messages": REVERSE, "stream": True, **GREEDY}
    status, text = server.request("POST", "/v1/messages?beta=true", body)
    assert status == 200, text
    events = sse_events(text)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    starts = [d["index"] for n, d in events if n == "content_block_start"]
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert starts == stops == list(range(len(starts))) and starts
    assert events[-2][1]["usage"]["output_tokens"] > 0


def test_stop_sequence_ends_the_reply_before_it(client):
    whole = client.messages.create(model=MODEL, max_tokens=60, messages=REVERSE, extra_body=GREEDY)
    text = whole.content[0].text
    assert "def" in text
    reply = client.messages.create(model=MODEL, max_tokens=60, messages=REVERSE, stop_sequences=["def"], extra_body=GREEDY)
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "def"
    assert "".join(b.text for b in reply.content) == text[: text.index("def")]


def test_count_tokens_equals_input_tokens(client):
    params = dict(model=MODEL, system="You are terse.", messages=REVERSE)
    counted = client.messages.count_tokens(**params)
    reply = client.messages.create(max_tokens=3, extra_body=GREEDY, **params)
    assert counted.input_tokens == prompt_total(reply.usage) > 10
    assert reply.usage.input_tokens == prompt_total(reply.usage) - reply.usage.cache_read_input_tokens


def test_count_tokens_with_tools_equals_input_tokens(client):
    params = dict(model=MODEL, system="You are terse.", messages=ASK_WEATHER, tools=[WEATHER])
    counted = client.messages.count_tokens(**params)
    reply = client.messages.create(max_tokens=3, extra_body=GREEDY, **params)
    assert counted.input_tokens == prompt_total(reply.usage)
    assert counted.input_tokens > client.messages.count_tokens(model=MODEL, messages=ASK_WEATHER).input_tokens


# ---------------------------------------------------------------- structured output and tools


def test_output_config_format_output_validates(client):
    reply = client.messages.create(
        model=MODEL,
        max_tokens=120,
        messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}],
        output_config={"format": {"type": "json_schema", "schema": PERSON}},
        extra_body=GREEDY,
    )
    assert reply.stop_reason == "end_turn"
    jsonschema.validate(json.loads(reply.content[0].text), PERSON)


def forced_call(client, stream: bool):
    params = dict(
        model=MODEL,
        max_tokens=120,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        extra_body=GREEDY,
    )
    if not stream:
        return client.messages.create(**params)
    with client.messages.stream(**params) as events:
        return events.get_final_message()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_choice_any_gives_a_valid_tool_use(client, stream):
    reply = forced_call(client, stream)
    calls = [b for b in reply.content if b.type == "tool_use"]
    assert calls, reply.content
    for call in calls:
        assert call.name == "get_weather" and call.id.startswith("toolu_")
        jsonschema.validate(call.input, WEATHER["input_schema"])
    assert reply.stop_reason == "tool_use"


def test_streamed_tool_use_equals_the_whole_one(client):
    whole = without_ids(forced_call(client, False))
    assert "tool_use" in [block["type"] for block in whole["content"]]
    assert without_ids(forced_call(client, True)) == whole


@pytest.mark.parametrize("is_error", [False, True])
def test_tool_result_round_trip(client, is_error):
    call = {"type": "tool_use", "id": "toolu_0123456789abcdef", "name": "get_weather", "input": {"city": "Paris"}}
    result = {
        "type": "tool_result",
        "tool_use_id": call["id"],
        "content": "city not found" if is_error else [{"type": "text", "text": "18 degrees celsius, sunny"}],
        "is_error": is_error,
    }
    messages = [*ASK_WEATHER, {"role": "assistant", "content": [call]}, {"role": "user", "content": [result]}]
    reply = client.messages.create(model=MODEL, max_tokens=40, messages=messages, tools=[WEATHER], extra_body=GREEDY)
    assert reply.content and reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    counted = client.messages.count_tokens(model=MODEL, messages=messages, tools=[WEATHER])
    assert counted.input_tokens == prompt_total(reply.usage)


# ---------------------------------------------------------------- errors


def test_bad_bodies_are_400_invalid_request_error(client):
    bad = [
        dict(max_tokens=0, messages=REVERSE),
        dict(max_tokens=10, messages=[]),
        dict(max_tokens=10, messages=[{"role": "user", "content": [{"type": "text"}]}]),
        dict(max_tokens=10, messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]),
    ]
    for params in bad:
        with pytest.raises(anthropic.BadRequestError) as info:
            client.messages.create(model=MODEL, **params)
        assert info.value.body["type"] == "error"
        assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "image" in info.value.body["error"]["message"]


def test_unknown_paths_are_404(client):
    for path in ("/v1/messages/nothing-here", "/v1/nothing-here"):
        with pytest.raises(anthropic.NotFoundError):
            client.post(path, body={}, cast_to=object)
    with pytest.raises(anthropic.NotFoundError) as info:
        client.post("/v1/messages/nothing-here", body={}, cast_to=object)
    assert info.value.body["error"]["type"] == "not_found_error"


def test_oversized_body_is_413(client):
    huge = [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(model=MODEL, max_tokens=5, messages=huge)
    assert info.value.status_code == 413
    assert info.value.body["error"]["type"] == "request_too_large"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_prompt_too_long_is_400_in_anthropic_wording(client, stream):
    messages = [{"role": "user", "content": "word " * 20000}]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=5, messages=messages, stream=stream)
    error = info.value.body["error"]
    assert error["type"] == "invalid_request_error"
    found = TOO_LONG.fullmatch(error["message"])
    assert found, error["message"]
    assert int(found[1]) >= int(found[2]) > 0
    counted = client.messages.count_tokens(model=MODEL, messages=messages)
    assert counted.input_tokens == int(found[1])


def test_api_key_as_x_api_key_or_bearer(fresh_server, tmp_path):
    srv = fresh_server("--api-key", "sekrit", "--no-persist")
    wrong = anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        wrong.messages.create(model=MODEL, max_tokens=3, messages=REVERSE)
    assert info.value.body["error"]["type"] == "authentication_error"
    for right in (
        anthropic.Anthropic(base_url=srv.url, api_key="sekrit", max_retries=0),
        anthropic.Anthropic(base_url=srv.url, auth_token="sekrit", api_key=None, max_retries=0),
    ):
        assert right.messages.create(model=MODEL, max_tokens=3, messages=REVERSE, extra_body=GREEDY).content


# ---------------------------------------------------------------- what Claude Code sends


def test_unknown_fields_and_betas_are_accepted(client):
    reply = client.beta.messages.create(
        model=MODEL,
        max_tokens=5,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]}],
        betas=["made-up-feature-2099-01-01", "context-management-2025-06-27", "interleaved-thinking-2025-05-14"],
        thinking={"type": "adaptive"},
        extra_body={
            **GREEDY,
            "cache_control": {"type": "ephemeral"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "medium"},
            "container": None,
            "mcp_servers": [],
            "service_tier": "auto",
            "a_field_from_2099": {"nested": True},
        },
        extra_headers={"anthropic-version": "2099-01-01"},
    )
    assert reply.content and reply.model == MODEL


def test_request_without_sampling_uses_the_models_defaults(client):
    reply = client.messages.create(model=MODEL, max_tokens=8, messages=REVERSE)
    assert reply.usage.output_tokens > 0


INSTRUCTIONS = " ".join(
    f"Rule {i}: when the user asks about topic number {i}, answer briefly and cite the rule." for i in range(60)
)


def claude_code_request(session: str, messages: list, billing: str) -> dict:
    user_id = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session})
    return dict(
        model="claude-opus-4-1",
        max_tokens=16,
        system=[
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.332.{billing}; cc_entrypoint=sdk-cli;"},
            {"type": "text", "text": "You are Claude Code, a coding agent.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": INSTRUCTIONS, "cache_control": {"type": "ephemeral"}},
        ],
        messages=messages,
        metadata={"user_id": user_id},
        betas=["claude-code-20250219", "interleaved-thinking-2025-05-14", "context-management-2025-06-27"],
        extra_headers={"X-Claude-Code-Session-Id": session},
        extra_body={"thinking": {"type": "adaptive"}, "context_management": {"edits": []}, **GREEDY},
    )


def test_second_turn_of_a_claude_code_conversation_reads_the_cache(client):
    session = str(uuid.uuid4())
    first_user = {"role": "user", "content": [{"type": "text", "text": "What does rule 7 say?", "cache_control": {"type": "ephemeral"}}]}
    with client.beta.messages.stream(**claude_code_request(session, [first_user], "a1f")) as stream:
        first = stream.get_final_message()
    assert first.usage.cache_read_input_tokens == 0
    history = [
        first_user,
        {"role": "assistant", "content": [b.model_dump(include={"type", "text"}) for b in first.content]},
        {"role": "system", "content": "The user's working directory changed."},
        {"role": "user", "content": [{"type": "text", "text": "And rule 12?"}]},
    ]
    second_request = claude_code_request(session, history, "9be")  # the billing block changes every request
    with client.beta.messages.stream(**second_request) as stream:
        second = stream.get_final_message()
    usage = second.usage
    # Anthropic's meaning: the prompt is input + cache_read + cache_creation.
    assert usage.cache_read_input_tokens >= 0.9 * prompt_total(usage), usage
    counted = client.beta.messages.count_tokens(
        **{k: v for k, v in second_request.items() if k not in ("max_tokens", "metadata")}
    )
    assert counted.input_tokens == prompt_total(usage)
