"""Constrained decoding with the embedded model's real tokenizer: random logits, seeded,
sampled under each constraint until it finishes, and the text checked the way a client
would check it (json.loads + jsonschema)."""

from __future__ import annotations

import json
import re

import actors  # noqa: F401  (OpenBLAS before mlx)
import jsonschema
import llguidance.numpy as llg_numpy
import mlx.core as mx
import numpy as np
import pytest

from actors import loading
from actors.constraint import (
    MAX_PARALLEL_CALLS,
    ConstraintCompiler,
    ConstraintError,
    apply_bitmask,
    fill_rows,
    grammar_for,
    validate_schema,
)
from actors.messages import ChatRequest, OutputFormat, Tool

START, END = "<tool_call>", "</tool_call>"
PADDING = 8  # the model's vocab dimension past the tokenizer's (padded embeddings)
SEEDS = range(6)

WEATHER = Tool(
    "get_weather",
    "Current weather in a city",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "unit": {"$ref": "#/$defs/unit"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
        "$defs": {"unit": {"enum": ["celsius", "fahrenheit"]}},
    },
)
SEARCH = Tool(
    "search",
    "Search the code",
    {
        "type": "object",
        "properties": {
            "query": {"type": "string", "maxLength": 40},
            "paths": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        },
        "required": ["query"],
        "additionalProperties": False,
    },
)
ANSWER = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 30},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "ok": {"type": "boolean"},
        "nested": {
            "type": "object",
            "properties": {"n": {"type": "integer"}},
            "required": ["n"],
            "additionalProperties": False,
        },
    },
    "required": ["title", "score", "ok", "nested"],
    "additionalProperties": False,
}
JSON_OBJECT = OutputFormat("json_object")
ARRAY = {"type": "array"}


def object_with(prop: dict) -> dict:
    return {"type": "object", "properties": {"a": prop}, "required": ["a"]}


@pytest.fixture(scope="module")
def tokenizer():
    _, meta = mx.load(str(loading.embedded_gguf_path()), return_metadata=True)
    return loading._gguf_tokenizer(meta)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return ConstraintCompiler(tokenizer)


@pytest.fixture(scope="module")
def closer_bias(tokenizer, compiler):
    """A nudge towards tokens that close strings and containers, so that random logits
    finish an open-ended JSON value in a few hundred tokens instead of thousands."""
    pieces = tokenizer._tokenizer.convert_ids_to_tokens(list(range(compiler.vocab_size)))
    bias = np.zeros(compiler.vocab_size + PADDING, dtype=np.float32)
    bias[[i for i, p in enumerate(pieces) if p and any(c in p for c in '"}]')]] = 2.0
    return bias


def sample(compiler, constraint, closer_bias, seed, *, max_tokens=1500):
    """Sample under `constraint` (row 1 of a batch of 2) until it finishes or EOS."""
    rng = np.random.default_rng(seed)
    bitmask = compiler.allocate_bitmask(2)
    tokens = []
    while not constraint.finished:
        assert len(tokens) < max_tokens, "the constraint never finished"
        fill_rows([(constraint, 1)], bitmask)
        noise = rng.standard_normal((2, closer_bias.size)).astype(np.float32)
        logits = apply_bitmask(mx.array(noise + closer_bias), bitmask, [1])
        token = int(mx.argmax(logits[1]).item())
        assert constraint.consume(token), constraint.error
        if token in compiler.eos_ids:
            break
        tokens.append(token)
    return tokens


def text_of(tokenizer, tokens):
    return tokenizer._tokenizer.decode(tokens, skip_special_tokens=False)


def generate(compiler, tokenizer, closer_bias, request, seed, **markers):
    grammar = compiler.grammar_for(request, markers.get("start", START), markers.get("end", END))
    return text_of(tokenizer, sample(compiler, compiler.compile(grammar), closer_bias, seed))


def assert_json_dumps_spacing(text):
    """Outside strings only json.dumps' separators: no whitespace runs."""
    skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    assert not re.search(r"\s", re.sub(r"[,:] ", "", skeleton)), text


def parse_calls(text):
    """The forced-call shape: START \\n JSON \\n END, joined by \\n."""
    bodies = re.fullmatch(rf"{START}\n(.*?)\n{END}(?:\n{START}\n(.*?)\n{END})*", text, re.S)
    assert bodies, f"not a tool-call block: {text!r}"
    pattern = rf"{re.escape(START)}\n(.*?)\n{re.escape(END)}"
    return [json.loads(body) for body in re.findall(pattern, text, re.S)]


def assert_valid_call(call, tools):
    assert set(call) == {"name", "arguments"}
    by_name = {t.name: t for t in tools}
    assert call["name"] in by_name
    jsonschema.validate(call["arguments"], by_name[call["name"]].parameters)


# ---------------------------------------------------------------- structured outputs


@pytest.mark.parametrize("seed", SEEDS)
def test_json_schema_output_validates(compiler, tokenizer, closer_bias, seed):
    request = ChatRequest(output_format=OutputFormat("json_schema", ANSWER))
    text = generate(compiler, tokenizer, closer_bias, request, seed)
    jsonschema.validate(json.loads(text), ANSWER)
    assert_json_dumps_spacing(text)


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_output_is_an_object(compiler, tokenizer, closer_bias, seed):
    request = ChatRequest(output_format=JSON_OBJECT)
    text = generate(compiler, tokenizer, closer_bias, request, seed)
    assert isinstance(json.loads(text), dict)
    assert_json_dumps_spacing(text)


def test_finished_output_allows_only_eos(compiler, tokenizer, closer_bias):
    request = ChatRequest(output_format=OutputFormat("json_schema", ANSWER))
    constraint = compiler.compile(compiler.grammar_for(request, START, END))
    sample(compiler, constraint, closer_bias, seed=0)
    assert constraint.finished and constraint.error is None
    bitmask = compiler.allocate_bitmask(1)
    constraint.fill(bitmask, 0)
    allowed = apply_bitmask(mx.zeros((1, compiler.vocab_size)), bitmask, [0])
    assert set(np.flatnonzero(np.isfinite(np.array(allowed[0])))) == set(compiler.eos_ids)


# ---------------------------------------------------------------- forced tool calls


def test_required_tool_call_is_one_valid_call_to_a_known_tool(compiler, tokenizer, closer_bias):
    tools = (WEATHER, SEARCH)
    request = ChatRequest(tools=tools, tool_choice="required", parallel_tool_calls=False)
    called = set()
    for seed in SEEDS:
        text = generate(compiler, tokenizer, closer_bias, request, seed)
        (call,) = parse_calls(text)
        assert text.startswith(f'{START}\n{{"name": "{call["name"]}", "arguments": {{')
        assert text.endswith(f"}}}}\n{END}")
        assert_valid_call(call, tools)
        called.add(call["name"])
    assert called == {"get_weather", "search"}, "the choice is over every tool"


def test_named_tool_choice_calls_only_that_tool(compiler, tokenizer, closer_bias):
    tools = (WEATHER, SEARCH)
    request = ChatRequest(tools=tools, tool_choice="function", tool_name="search")
    for seed in SEEDS:
        calls = parse_calls(generate(compiler, tokenizer, closer_bias, request, seed))
        assert calls and all(c["name"] == "search" for c in calls)
        for call in calls:
            assert_valid_call(call, tools)


def test_parallel_tool_calls_yield_one_or_more_calls(compiler, tokenizer, closer_bias):
    tools = (WEATHER, SEARCH)
    request = ChatRequest(tools=tools, tool_choice="required", parallel_tool_calls=True)
    counts = []
    for seed in SEEDS:
        calls = parse_calls(generate(compiler, tokenizer, closer_bias, request, seed))
        assert 1 <= len(calls) <= MAX_PARALLEL_CALLS
        for call in calls:
            assert_valid_call(call, tools)
        counts.append(len(calls))
    assert max(counts) > 1, counts


def test_forced_call_wins_over_output_format(compiler, tokenizer, closer_bias):
    request = ChatRequest(
        tools=(WEATHER,),
        tool_choice="required",
        parallel_tool_calls=False,
        output_format=OutputFormat("json_schema", ANSWER),
    )
    (call,) = parse_calls(generate(compiler, tokenizer, closer_bias, request, seed=1))
    assert_valid_call(call, (WEATHER,))


def test_auto_with_output_format_answers_in_format_or_calls(compiler, tokenizer, closer_bias):
    request = ChatRequest(
        tools=(WEATHER,), tool_choice="auto", output_format=OutputFormat("json_schema", ANSWER)
    )
    kinds = set()
    for seed in SEEDS:
        text = generate(compiler, tokenizer, closer_bias, request, seed)
        if text.startswith(START):
            for call in parse_calls(text):
                assert_valid_call(call, (WEATHER,))
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(text), ANSWER)
            kinds.add("answer")
    assert kinds == {"call", "answer"}


def test_single_token_markers_are_matched_as_that_token(compiler, tokenizer, closer_bias):
    assert compiler.special_token_id("<|im_start|>") == 1
    assert compiler.special_token_id(START) is None  # several tokens here: matched as text
    request = ChatRequest(tools=(SEARCH,), tool_choice="required", parallel_tool_calls=False)
    grammar = compiler.grammar_for(request, "<|im_start|>", "<file_sep>")
    tokens = sample(compiler, compiler.compile(grammar), closer_bias, seed=2)
    end_id = compiler.special_token_id("<file_sep>")
    assert tokens[0] == 1 and tokens[-1] == end_id
    body = text_of(tokenizer, tokens[1:-1])
    assert body.startswith("\n") and body.endswith("\n")
    assert_valid_call(json.loads(body), (SEARCH,))


def test_nothing_constrained_gives_no_grammar():
    tools = (WEATHER,)
    assert grammar_for(ChatRequest(), START, END) is None
    assert grammar_for(ChatRequest(tools=tools, tool_choice="auto"), START, END) is None
    assert grammar_for(ChatRequest(tools=tools, tool_choice="none"), START, END) is None
    with_format = ChatRequest(tools=tools, tool_choice="none", output_format=JSON_OBJECT)
    assert grammar_for(with_format, START, END) is not None


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "schema, words",
    [
        ([1, 2], "must be a JSON object"),
        ({"type": "array", "items": {"type": "string"}}, "object schema"),
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "properties/a/type"),
        ({"type": "object", "required": "a"}, "not a valid JSON Schema"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        (object_with({"type": "integer", "minimum": 5, "maximum": 1}), "unsatisfiable"),
        (object_with({"type": "string", "pattern": "(?=x)y"}), "look-around"),
    ],
)
def test_invalid_schemas_raise_constraint_error(schema, words):
    with pytest.raises(ConstraintError, match=re.escape(words)):
        validate_schema(schema)


def test_schema_keywords_llguidance_lacks_are_accepted():
    validate_schema({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}})
    validate_schema({"type": "array"}, object_root=False)


@pytest.mark.parametrize(
    "request_, words",
    [
        (ChatRequest(tool_choice="required"), "at least one tool"),
        (ChatRequest(tools=(WEATHER,), tool_choice="function", tool_name="nope"), "'nope'"),
        (ChatRequest(tools=(Tool("bad", parameters=ARRAY),), tool_choice="required"), "'bad'"),
        (ChatRequest(output_format=OutputFormat("json_schema", {"type": 3})), "response format"),
        (ChatRequest(tool_choice="sometimes"), "tool_choice"),
    ],
)
def test_bad_requests_raise_constraint_error(request_, words):
    with pytest.raises(ConstraintError, match=re.escape(words)):
        grammar_for(request_, START, END)


def test_uncompilable_grammar_raises_constraint_error(compiler):
    with pytest.raises(ConstraintError, match="unknown name"):
        compiler.compile("start: undefined_rule")


def test_disallowed_token_is_reported(compiler, tokenizer):
    grammar = compiler.grammar_for(ChatRequest(output_format=JSON_OBJECT), START, END)
    constraint = compiler.compile(grammar)
    (letter,) = tokenizer._tokenizer.encode("x", add_special_tokens=False)
    assert constraint.consume(letter) is False
    assert constraint.error and not constraint.finished


def test_sequences_with_one_grammar_do_not_share_state(compiler, tokenizer):
    grammar = compiler.grammar_for(ChatRequest(output_format=JSON_OBJECT), START, END)
    first, second = compiler.compile(grammar), compiler.compile(grammar)
    for token in tokenizer._tokenizer.encode("{}", add_special_tokens=False):
        assert first.consume(token)
    assert first.finished and not second.finished


# ---------------------------------------------------------------- masks


def test_fill_writes_only_its_own_row(compiler, tokenizer):
    request = ChatRequest(output_format=OutputFormat("json_schema", ANSWER))
    grammar = compiler.grammar_for(request, START, END)
    one, two = compiler.compile(grammar), compiler.compile(grammar)
    for token in tokenizer._tokenizer.encode('{"title": "', add_special_tokens=False):
        assert two.consume(token)
    sentinel = np.int32(0x5A5A5A5A)
    alone = np.full_like(compiler.allocate_bitmask(4), sentinel)
    one.fill(alone, 2)
    together = np.full_like(alone, sentinel)
    fill_rows([(one, 2), (two, 0)], together)
    assert (alone[[0, 1, 3]] == sentinel).all()
    assert (together[[1, 3]] == sentinel).all()
    assert np.array_equal(alone[2], together[2])
    assert not np.array_equal(together[0], together[2])  # different states, different masks


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_apply_bitmask_masks_constrained_rows_exactly(dtype):
    rng = np.random.default_rng(7)
    vocab = 1024  # a multiple of 32, as the embedded tokenizer's 49152
    words = rng.integers(-(2**31), 2**31, size=(4, (vocab + 31) // 32), dtype=np.int64)
    bitmask = words.astype(np.int32)
    logits = mx.array(rng.standard_normal((4, vocab + PADDING)).astype(np.float32)).astype(dtype)
    out = np.array(apply_bitmask(logits, bitmask, [1, 3]).astype(mx.float32))
    source = np.array(logits.astype(mx.float32))
    assert np.array_equal(out[[0, 2]].view(np.uint32), source[[0, 2]].view(np.uint32))
    expected = source[[1, 3]].copy()
    llg_numpy.apply_token_bitmask_inplace(expected, bitmask[[1, 3]])  # llguidance's reference
    expected[:, vocab:] = -np.inf  # padded columns are never allowed
    assert np.array_equal(out[[1, 3]], expected)
    assert apply_bitmask(logits, bitmask, []) is logits
