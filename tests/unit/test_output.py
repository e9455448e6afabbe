"""Splitting generated text into content, reasoning and tool calls, whole or in chunks.

Real tokenizers: the embedded SmolLM2's (Hermes fallback, no thinking) and the
Qwen3-style test tokenizer (native <tool_call> JSON calls, <think> blocks).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

import mlx.core as mx
import pytest
from mlx_lm import tokenizer_utils

from actors import loading
from actors.messages import ChatRequest, ReasoningDelta, TextDelta, Tool, ToolCallEvent
from actors.output import OutputParser
from actors.prompt import render
from tests.e2e.models import write_tiny_qwen_tools

WEATHER = Tool(
    name="get_weather",
    description="Current weather of a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TOOLS = (WEATHER,)
USER = ({"role": "user", "content": "Weather in Paris and Rome?"},)

PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ROME = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


@pytest.fixture(scope="module")
def smol():
    _, meta = mx.load(str(loading.embedded_gguf_path()), return_metadata=True)
    return loading._gguf_tokenizer(meta)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tokenizer_utils.load(write_tiny_qwen_tools(tmp_path_factory.mktemp("qwen") / "tiny-qwen"))


@pytest.fixture(params=["smol", "qwen"])
def tok(request):
    return request.getfixturevalue(request.param)


def parser(tokenizer, tools=TOOLS, forced_json=False, rendered=None, **request):
    rendered = rendered or render(tokenizer, ChatRequest(messages=USER, tools=tools, **request))
    return OutputParser(tokenizer, rendered, tools, forced_json=forced_json)


def run(p: OutputParser, chunks) -> list:
    events = []
    for chunk in chunks:
        events += p.feed(chunk)
    return events + p.finish()


def assembled(events) -> tuple[str, str, list]:
    """What a client ends up with: content, reasoning, and (name, arguments) calls."""
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    calls = [(e.name, json.loads(e.arguments)) for e in events if isinstance(e, ToolCallEvent)]
    return content, reasoning, calls


def chunkings(text: str):
    """The text whole, one character at a time, and in random pieces."""
    yield [text]
    yield list(text)
    rng = random.Random(len(text))
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def parse_all_ways(make_parser, text: str):
    """The assembled result, checked to be the same for every chunking."""
    results = [assembled(run(make_parser(), chunks)) for chunks in chunkings(text)]
    assert all(r == results[0] for r in results[1:]), results
    return results[0]


# ---------------------------------------------------------------- content and calls


def test_text_only(tok):
    text = "Paris is sunny today.\n\n  Rome: cloudy, 18 C. <b>ok</b> 1 < 2 > 0  \n"
    content, reasoning, calls = parse_all_ways(lambda: parser(tok), text)
    assert (content, reasoning, calls) == (text, "", [])
    p = parser(tok)
    run(p, [text])
    assert not p.has_tool_calls


def test_text_then_a_call(tok):
    text = "Let me check.\n" + PARIS
    content, _, calls = parse_all_ways(lambda: parser(tok), text)
    assert content == "Let me check."
    assert calls == [("get_weather", {"city": "Paris"})]
    p = parser(tok)
    events = run(p, [text])
    assert p.has_tool_calls
    call = next(e for e in events if isinstance(e, ToolCallEvent))
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id) and call.index == 0
    assert call.arguments == '{"city":"Paris"}'  # compact JSON of an object
    # Text before the call is streamed before it.
    assert isinstance(events[0], TextDelta) and events[-1] is call


def test_two_calls(tok):
    text = PARIS + "\n" + ROME + "\n"
    content, _, calls = parse_all_ways(lambda: parser(tok), text)
    assert content == ""
    assert calls == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    events = [e for e in run(parser(tok), [text]) if isinstance(e, ToolCallEvent)]
    assert [e.index for e in events] == [0, 1] and events[0].id != events[1].id


def test_one_block_with_a_list_of_calls(qwen):
    text = '<tool_call>\n[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]\n</tool_call>'
    _, _, calls = parse_all_ways(lambda: parser(qwen), text)
    assert [c[1]["city"] for c in calls] == ["Paris", "Rome"]


def test_call_left_open_at_the_end_is_parsed(tok):
    text = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    content, _, calls = parse_all_ways(lambda: parser(tok), text)
    assert content == "Sure." and calls == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize(
    "call",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>',  # not an object
    ],
)
def test_malformed_call_is_returned_as_text(tok, call):
    text = "Trying. " + call
    p = parser(tok)
    content, _, calls = parse_all_ways(lambda: parser(tok), text)
    assert calls == [] and content == text
    run(p, [text])
    assert not p.has_tool_calls


def test_a_call_cut_off_by_max_tokens_is_dropped_not_shown(tok):
    """Half a call is no use to the client as text (Claude Code would show it)."""
    content, _, calls = parse_all_ways(lambda: parser(tok), 'Trying. <tool_call>\n{"name": "get_weather", "argu')
    assert (content, calls) == ("Trying. ", [])


def test_partial_marker_at_the_end_is_text(tok):
    content, _, calls = parse_all_ways(lambda: parser(tok), "Done <tool_ca")
    assert (content, calls) == ("Done <tool_ca", [])


def test_no_tools_offered_means_markup_is_text(tok):
    for make in (lambda: parser(tok, tools=()), lambda: parser(tok, tool_choice="none")):
        content, _, calls = parse_all_ways(make, "x " + PARIS)
        assert content == "x " + PARIS and calls == []


def test_forced_call_is_parsed_as_json_whatever_the_native_format(qwen):
    """A grammar-forced call is JSON between the markers; a model whose own parser
    reads another format (here qwen3_coder's XML) still gets it parsed."""
    from mlx_lm.tool_parsers import qwen3_coder

    rendered = render(qwen, ChatRequest(messages=USER, tools=TOOLS, tool_choice="required"))
    xml_format = dataclasses.replace(rendered.tool_format, parse=qwen3_coder.parse_tool_call)
    rendered = dataclasses.replace(rendered, tool_format=xml_format)
    forced = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    _, _, calls = parse_all_ways(lambda: parser(qwen, rendered=rendered, forced_json=True), forced)
    assert calls == [("get_weather", {"city": "Paris"})]
    # Without the flag the native XML parser cannot read it, and it stays text.
    _, _, calls = parse_all_ways(lambda: parser(qwen, rendered=rendered), forced)
    assert calls == []
    xml = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    _, _, calls = parse_all_ways(lambda: parser(qwen, rendered=rendered), xml)
    assert calls == [("get_weather", {"city": "Paris"})]


# ---------------------------------------------------------------- reasoning


def test_reasoning_then_answer(qwen):
    text = "<think>\nThe user wants weather.\nI will answer.\n</think>\n\nIt is sunny in Paris."
    content, reasoning, calls = parse_all_ways(lambda: parser(qwen), text)
    assert reasoning == "The user wants weather.\nI will answer."
    assert content == "It is sunny in Paris."
    assert calls == []


def test_reasoning_then_a_call(qwen):
    text = "<think>\nI need the weather tool.\n</think>\n\n" + PARIS
    content, reasoning, calls = parse_all_ways(lambda: parser(qwen), text)
    assert (content, reasoning) == ("", "I need the weather tool.")
    assert calls == [("get_weather", {"city": "Paris"})]


def test_prompt_that_opened_the_think_block(qwen):
    rendered = dataclasses.replace(
        render(qwen, ChatRequest(messages=USER, tools=TOOLS)), starts_in_reasoning=True
    )
    text = "Hmm, Paris.\n</think>\n\nSunny."
    content, reasoning, _ = parse_all_ways(lambda: parser(qwen, rendered=rendered), text)
    assert (content, reasoning) == ("Sunny.", "Hmm, Paris.")


def test_reasoning_cut_off_is_never_content(qwen):
    content, reasoning, _ = parse_all_ways(lambda: parser(qwen), "<think>\nStill thinking about <b")
    assert content == "" and reasoning == "Still thinking about <b"


def test_think_markers_are_text_for_a_model_without_thinking(smol):
    text = "<think>not a block</think> answer"
    content, reasoning, _ = parse_all_ways(lambda: parser(smol), text)
    assert (content, reasoning) == (text, "")
