"""Constrained decoding: forced tool calls and structured outputs, with llguidance.

Pure code (no actors, no HTTP). The engine uses it per sequence inside the running batch:

    compiler = ConstraintCompiler(loaded.tokenizer)          # once per loaded model
    grammar = compiler.grammar_for(request, start, end)      # None: unconstrained
    constraint = compiler.compile(grammar)                   # one per sequence
    bitmask = compiler.allocate_bitmask(batch_size)          # shared by the batch
    each step:  fill_rows([(constraint, row), ...], bitmask) # on a worker thread, while
                                                             #   MLX evaluates the forward pass
                logits = apply_bitmask(logits, bitmask, rows)
                ... sample ...; constraint.consume(token)
                constraint.finished -> end the sequence;  constraint.error -> end it with an error

Threading: `ConstraintCompiler.compile`, `Constraint.fill`, `fill_rows` and `consume` are
blocking CPU work (llguidance releases the GIL while it computes); never call them on the
asyncio event loop. The first `compile` (or `allocate_bitmask`, `warm_up`) builds the
tokenizer's token table, ~0.3 s once per model. A Constraint belongs to one sequence and
is used by one thread at a time; different Constraints may be filled concurrently.
`grammar_for` and `validate_schema` are cheap (no token table) but CPU-bound in the size
of the schemas.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import jsonschema
import llguidance
import llguidance.numpy as llg_numpy
import mlx.core as mx
import numpy as np

from actors.messages import ChatRequest, OutputFormat, Tool

# JSON is generated the way json.dumps writes it ({"a": 1, "b": [2, 3]}): what models see
# in tool-call examples, and no whitespace runs (llguidance's default allows unbounded ones).
# Lenient: keywords llguidance does not implement (uniqueItems, not, if/then, ...) are
# ignored instead of rejecting an otherwise valid schema that agents send in every request.
JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": True,
}
# A forced call with parallel_tool_calls may repeat; a model stuck repeating calls stops here.
MAX_PARALLEL_CALLS = 16
GRAMMAR_CACHE_SIZE = 64
TOOL_CHOICES = ("auto", "none", "required", "function")

_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class ConstraintError(ValueError):
    """A schema or grammar that cannot constrain decoding; the message is for the client."""


# ---------------------------------------------------------------- schemas


def validate_schema(schema: object, *, object_root: bool = True, what: str = "schema") -> None:
    """Raise ConstraintError unless `schema` is a valid JSON Schema llguidance can compile;
    with `object_root`, it must also describe an object (tool parameters)."""
    _check_schema(schema, object_root=object_root, what=what)
    grammar = llguidance.LLMatcher.grammar_from_lark(_lark_rule("start", _json_nonterminal(schema)))
    message = llguidance.LLMatcher.validate_grammar(grammar, None, limits=_LIMITS)
    if message:
        raise ConstraintError(f"{what} cannot be used for constrained decoding: {_short(message)}")


def _check_schema(schema: object, *, object_root: bool, what: str) -> None:
    if not isinstance(schema, dict):
        raise ConstraintError(f"{what} must be a JSON object, got {type(schema).__name__}")
    if object_root and not _is_object_schema(schema):
        raise ConstraintError(f'{what} must be an object schema ("type": "object")')
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        message = f"{what} is not a valid JSON Schema at {where}: {exc.message}"
        raise ConstraintError(message) from None


def _is_object_schema(schema: dict) -> bool:
    return schema.get("type") in ("object", ["object"])


def _short(message: str) -> str:
    """llguidance's error without its echo of our generated grammar (meaningless to a client)."""
    kept = []
    for line in message.splitlines():
        if re.match(r"\s*\d+ \| ", line):
            break
        kept.append(line.strip())
    text = " ".join(part for part in kept if part)
    return re.sub(r"^at \d+\(\d+\): ", "", text)


# ---------------------------------------------------------------- grammars


def grammar_for(
    request: ChatRequest,
    call_start: str,
    call_end: str,
    *,
    special_token_id: Callable[[str], int | None] | None = None,
) -> str | None:
    """The Lark grammar (llguidance dialect) constraining this turn's output, or None.

    tool_choice "required" / "function": `call_start "\\n" {"name": ..., "arguments": ...}
    "\\n" call_end`, repeated up to MAX_PARALLEL_CALLS times ("\\n" between calls) when
    parallel_tool_calls, then end of sequence; this wins over an output format (which
    applies to a later text answer). Otherwise an output format constrains the answer; with
    tools and tool_choice "auto" the answer may instead be tool calls. `special_token_id`
    maps a marker to its token id when the marker is one special/added token (see
    ConstraintCompiler.special_token_id); such a marker is matched as that token.
    Raises ConstraintError for an invalid schema, tool choice or tool name.
    """
    forced = _forced_tools(request)
    if forced:
        markers = _marker(call_start, special_token_id), _marker(call_end, special_token_id)
        return _calls_grammar(forced, request.parallel_tool_calls, *markers)
    if request.output_format is None:
        return None
    answer = _json_nonterminal(_format_schema(request.output_format))
    if request.tool_choice == "auto" and request.tools:
        markers = _marker(call_start, special_token_id), _marker(call_end, special_token_id)
        calls = _calls_grammar(request.tools, request.parallel_tool_calls, *markers, top="calls")
        return _lark_rule("start", "calls | answer") + calls + _lark_rule("answer", answer)
    return _lark_rule("start", answer)


def _forced_tools(request: ChatRequest) -> tuple[Tool, ...]:
    choice = request.tool_choice
    if choice not in TOOL_CHOICES:
        raise ConstraintError(f"unknown tool_choice {choice!r}; expected one of {TOOL_CHOICES}")
    if choice == "required":
        if not request.tools:
            raise ConstraintError('tool_choice "required" needs at least one tool')
        return request.tools
    if choice == "function":
        named = tuple(t for t in request.tools if t.name == request.tool_name)
        if not named:
            raise ConstraintError(f"tool_choice names {request.tool_name!r}, which is not in tools")
        return named[:1]
    return ()


def _format_schema(output_format: OutputFormat) -> dict:
    if output_format.kind == "json_object":
        return {"type": "object"}
    if output_format.kind == "json_schema":
        _check_schema(output_format.schema, object_root=False, what="the response format's schema")
        return output_format.schema
    raise ConstraintError(f"unknown output format {output_format.kind!r}")


def _calls_grammar(
    tools: Sequence[Tool], parallel: bool, start: str, end: str, *, top: str = "start"
) -> str:
    repeat = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    rules = [
        _lark_rule(top, "call" + repeat),
        _lark_rule("call", f'{start} "\\n" body "\\n" {end}'),
        _lark_rule("body", " | ".join(f"tool_{i}" for i in range(len(tools)))),
    ]
    for i, tool in enumerate(tools):
        what = f"the parameters of tool {tool.name!r}"
        _check_schema(tool.parameters, object_root=True, what=what)
        # The name is literal text and the arguments their own %json: a $ref inside the
        # parameters then resolves against the parameters, as the client wrote it.
        head = json.dumps(f'{{"name": {json.dumps(tool.name)}, "arguments": ')
        rules.append(_lark_rule(f"tool_{i}", f'{head} {_json_nonterminal(tool.parameters)} "}}"'))
    return "".join(rules)


def _json_nonterminal(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def _lark_rule(name: str, body: str) -> str:
    return f"{name}: {body}\n"


def _marker(text: str, special_token_id: Callable[[str], int | None] | None) -> str:
    if not text:
        raise ConstraintError("a tool-call marker is empty")
    token = special_token_id(text) if special_token_id else None
    return f"<[{token}]>" if token is not None else json.dumps(text)


# ---------------------------------------------------------------- per model


class ConstraintCompiler:
    """Compiles grammars for one loaded model's tokenizer (an mlx-lm TokenizerWrapper or
    a Hugging Face fast tokenizer). Build it once per model; it is cheap until first used:
    the token table (~0.3 s) is built lazily, on the first compile/allocate_bitmask/warm_up,
    off the event loop. Thread-safe."""

    def __init__(self, tokenizer, *, cache_size: int = GRAMMAR_CACHE_SIZE):
        self._hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self.eos_ids = _eos_ids(tokenizer, self._hf)
        self._cache_size = cache_size
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._table: llguidance.LLTokenizer | None = None

    def warm_up(self) -> None:
        """Build the token table now (blocking, ~0.3 s once)."""
        self._token_table()

    @property
    def vocab_size(self) -> int:
        return self._token_table().vocab_size

    def allocate_bitmask(self, batch_size: int) -> np.ndarray:
        """A (batch_size, ceil(vocab/32)) int32 bitmask, all tokens allowed."""
        return llg_numpy.allocate_token_bitmask(batch_size, self.vocab_size)

    def special_token_id(self, text: str) -> int | None:
        """The id of `text` when it is exactly one added/special token, else None."""
        ids = self._hf.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] in self._hf.added_tokens_decoder:
            return ids[0]
        return None

    def grammar_for(self, request: ChatRequest, call_start: str, call_end: str) -> str | None:
        """grammar_for() with this tokenizer's special-token markers."""
        return grammar_for(request, call_start, call_end, special_token_id=self.special_token_id)

    def compile(self, grammar: str) -> Constraint:
        """A fresh Constraint for one sequence. Blocking (cached grammars: a copy, ~µs;
        new ones: ms, more for big schemas). Raises ConstraintError if it cannot compile."""
        with self._lock:
            pristine = self._cache.get(grammar)
            if pristine is not None:
                self._cache.move_to_end(grammar)
        if pristine is None:
            pristine = self._build(grammar)
            with self._lock:
                self._cache[grammar] = pristine
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return Constraint(pristine.deep_copy(), self.eos_ids)

    def _build(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(
            self._token_table(), llguidance.LLMatcher.grammar_from_lark(grammar),
            log_level=0, limits=_LIMITS,
        )
        if matcher.is_error():
            raise ConstraintError(f"cannot compile the constraint: {_short(matcher.get_error())}")
        return matcher

    def _token_table(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._table is None:
                import llguidance.hf

                self._table = llguidance.hf.from_tokenizer(self._hf, eos_token=list(self.eos_ids))
            return self._table


def _eos_ids(tokenizer, hf) -> tuple[int, ...]:
    ids = getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id]
    return tuple(sorted(int(i) for i in ids if i is not None))


# ---------------------------------------------------------------- per sequence


class Constraint:
    """The grammar state of one sequence. Blocking methods; one thread at a time."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: tuple[int, ...]):
        self._matcher = matcher
        self.eos_ids = eos_ids

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into row `row` of `bitmask` (only that row).
        Once finished (or in error) only EOS is allowed."""
        llg_numpy.fill_next_token_bitmask(self._matcher, bitmask, row)

    def consume(self, token: int) -> bool:
        """Advance by the sampled token. False if it was not allowed: `error` says why,
        and the constraint stays in error (the engine should end the sequence)."""
        return self._matcher.consume_token(int(token))

    @property
    def finished(self) -> bool:
        """The output is complete: nothing but EOS may follow; end the sequence."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def accepting(self) -> bool:
        """The output so far is a complete answer (EOS allowed), though more may follow."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        return _short(self._matcher.get_error()) if self._matcher.is_error() else None


_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


def fill_rows(constraints: Sequence[tuple[Constraint, int]], bitmask: np.ndarray) -> None:
    """Fill the rows of several sequences at once, in parallel on llguidance's own threads
    with the GIL released: submit it to a thread pool while MLX evaluates the forward pass.
    Touches only the listed rows."""
    if not constraints:
        return
    llg_numpy.fill_next_token_bitmask_par(
        _shared_executor(), [(c._matcher, row) for c, row in constraints], bitmask
    )


def _shared_executor() -> llguidance.LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


# ---------------------------------------------------------------- logits


def apply_bitmask(logits: mx.array, bitmask: np.ndarray, rows: Sequence[int]) -> mx.array:
    """`logits` (B, V) with the disallowed tokens of `rows` set to -inf; other rows are
    returned bit-identical. Columns past the tokenizer's vocab (padded embeddings) are
    disallowed in constrained rows. Portable numpy unpacking + mx.where: llguidance's MLX
    kernel is Metal-only, and this costs well under a decode step on either backend."""
    if not len(rows):
        return logits
    batch, vocab = logits.shape
    keep = np.ones((batch, vocab), dtype=bool)
    keep[list(rows)] = allowed_tokens(bitmask, rows, vocab)
    return mx.where(mx.array(keep), logits, mx.array(float("-inf"), dtype=logits.dtype))


def allowed_tokens(bitmask: np.ndarray, rows: Sequence[int], vocab: int) -> np.ndarray:
    """(len(rows), vocab) bool: token t of row r allowed iff bit t%32 of word t//32 is set."""
    words = np.ascontiguousarray(bitmask[list(rows)], dtype="<i4")
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").astype(bool)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return np.pad(bits, ((0, 0), (0, vocab - bits.shape[1])))  # padded columns: disallowed
