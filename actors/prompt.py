"""Rendering a ChatRequest into prompt tokens, with tools and without forged turns.

Pure functions over mlx-lm's TokenizerWrapper: no actors, no MLX compute.

Tools. A chat template that knows tools (its source mentions `tools`, or mlx-lm
supplies its own renderer) gets them as `apply_chat_template(..., tools=[{"type":
"function", "function": {...}}])`, so the model sees its training format, and the
model's mlx-lm tool parser reads the calls back. Any other template (the embedded
SmolLM2's) gets one fallback, Hermes style as Qwen2.5 words it: the schemas go into
the first system message inside <tools></tools>, past calls become
`<tool_call>{"name", "arguments"}</tool_call>` markup after the assistant's content,
and tool results become user turns of `<tool_response>` blocks (consecutive results
share one turn). Those calls are read back with mlx_lm.tool_parsers.json_tools.

Control tokens only from the template (issue 10). Before rendering, every string
the client wrote (content of every role, tool results, call names and arguments,
tool schemas) has each control-token string (special added tokens, and added
tokens that look like markup such as `<tool_call>`) replaced by a private-use
placeholder character; text without such strings passes untouched, so ordinary
prompts tokenize exactly as `apply_chat_template` does. After rendering, the
placeholders are turned back into their text and only the stretches between the
template's own markers that hold one are re-encoded with added-token matching off:
the forged marker costs the tokens of its text. A side effect, on purpose: a
template that inspects content for markers (Qwen3 splitting history at `</think>`)
no longer sees markers typed into content.

Why not transformers' `apply_chat_template(sanitize_control_tokens=True)` (5.24):
it leaves dict keys alone (a tool schema's property names and a call's argument
names are client text and still become control tokens), encodes the text on either
side of a marked token apart (other tokens than the text alone gives), and does
not apply to mlx-lm's own renderers.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from actors.messages import ChatRequest, Tool

# Supplementary Private Use Area-B: one placeholder per protected string.
_PLACEHOLDER_BASE = 0x100000
_PLACEHOLDER_LAST = 0x10FFFD
# Markup-looking added tokens are protected even when not flagged special
# (Qwen's `<tool_call>`, `<think>`); whitespace runs and words added as tokens are not.
_MARKUP = re.compile(r"^(<[^\s<>]+>|\[[^\s\[\]]+\]|<\|[^\s]+\|>)$")


class PromptError(ValueError):
    """The conversation cannot be rendered (the gateway answers 400 with the message)."""


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How the model writes a tool call: between `start` and `end`, parsed by `parse`
    (an mlx-lm `parse_tool_call(text, tools)`). `native`: the template renders tools.
    A forced call (grammar) is always `start + "\\n" + {"name", "arguments"} JSON +
    "\\n" + end`, parsed as JSON whatever the native format."""

    start: str
    end: str
    parse: Callable[[str, Any], Any]
    native: bool


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered prompt and what the output parser needs to read the reply."""

    tokens: tuple[int, ...]
    tool_format: ToolFormat
    starts_in_reasoning: bool  # the prompt ends inside an open think block
    offers_tools: bool  # tools were rendered (some, and tool_choice is not "none")


# ---------------------------------------------------------------- tool format


def template_supports_tools(tokenizer) -> bool:
    template = tokenizer.chat_template
    if template is None:
        # mlx-lm's own renderers (mlx_lm.chat_templates) all take tools.
        return bool(tokenizer.has_chat_template)
    if isinstance(template, dict):  # named templates: HF picks "tool_use" for tools
        template = "\n".join(str(t) for t in template.values())
    return "tools" in template


def tool_format(tokenizer) -> ToolFormat:
    """The model's tool-call format; compute once per model."""
    from mlx_lm.tool_parsers import json_tools

    native = template_supports_tools(tokenizer)
    if native and tokenizer.has_tool_calling:
        return ToolFormat(
            start=tokenizer.tool_call_start,
            end=tokenizer.tool_call_end or "",
            parse=tokenizer.tool_parser,
            native=True,
        )
    # The Hermes fallback, also for a tools-aware template mlx-lm has no parser for.
    return ToolFormat(
        start=json_tools.tool_call_start,
        end=json_tools.tool_call_end,
        parse=json_tools.parse_tool_call,
        native=native,
    )


def openai_tools(tools: tuple[Tool, ...]) -> list[dict]:
    """Tools in the shape chat templates and mlx-lm parsers expect."""
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


# ---------------------------------------------------------------- rendering


def render(tokenizer, request: ChatRequest) -> Rendered:
    """The prompt tokens of `request` (its messages through the chat template)."""
    fmt = tool_format(tokenizer)
    guard = _guard(tokenizer)
    offered = request.tools if request.tool_choice != "none" else ()
    messages = [_template_message(m) for m in request.messages]
    messages = guard.escape(messages)
    tools = guard.escape(openai_tools(offered)) or None
    if not fmt.native:
        messages = _hermes_messages(messages, tools)
        tools = None
    kwargs = {}
    if tokenizer.has_thinking and request.thinking is not None:
        kwargs["enable_thinking"] = request.thinking
    text = _apply_template(tokenizer, messages, tools, kwargs)
    tokens = guard.tokenize(text)
    return Rendered(
        tokens=tokens,
        tool_format=fmt,
        starts_in_reasoning=_ends_in_reasoning(tokenizer, tokens),
        offers_tools=bool(offered),
    )


def render_text_prompt(tokenizer, prompt: str) -> Rendered:
    """The tokens of a raw prompt (/v1/completions): no template, special strings are
    plain text, and the BOS token only if the tokenizer adds one to every text."""
    tokens = _guard(tokenizer).tokenize(_guard(tokenizer).escape(prompt))
    return Rendered(
        tokens=_bos(tokenizer) + tokens,
        tool_format=tool_format(tokenizer),
        starts_in_reasoning=False,
        offers_tools=False,
    )


def _apply_template(tokenizer, messages, tools, kwargs) -> str:
    if not tokenizer.has_chat_template:
        raise PromptError("the served model has no chat template; use /v1/completions")
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
        )
    except Exception as exc:  # jinja's raise_exception, type errors on odd content
        raise PromptError(f"the model's chat template rejected the conversation: {exc}") from exc


def _template_message(message: dict) -> dict:
    """A copy the template can read: content never None, call arguments as dicts."""
    out = dict(message)
    if out.get("content") is None:
        out["content"] = ""
    if out.get("tool_calls"):
        out["tool_calls"] = [_template_call(c) for c in out["tool_calls"]]
    return out


def _template_call(call: dict) -> dict:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except ValueError:
            pass  # not JSON: the template gets the text as it came
    return {**call, "function": function}


def _ends_in_reasoning(tokenizer, tokens: tuple[int, ...]) -> bool:
    """As mlx_lm.server decides the initial state: an unclosed think block at the end."""
    if not tokenizer.has_thinking:
        return False
    return tokenizer.rfind_think_start(tokens) > tokenizer.rfind_think_end(tokens)


def _bos(tokenizer) -> tuple[int, ...]:
    bos = tokenizer.bos_token_id
    if bos is None:
        return ()
    added = tokenizer.encode("a")
    plain = tokenizer.encode("a", add_special_tokens=False)
    return (bos,) if added[:1] == [bos] and plain[:1] != [bos] else ()


# ---------------------------------------------------------------- Hermes fallback

_HERMES_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_HERMES_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def hermes_tools_block(tools: list[dict]) -> str:
    schemas = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return _HERMES_TOOLS_HEAD + schemas + _HERMES_TOOLS_TAIL


def _hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Tools, past calls and tool results as plain chat turns, for a template
    without tool support."""
    out: list[dict] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        elif role == "assistant" and message.get("tool_calls"):
            out.append(_hermes_assistant(message))
        else:
            out.append(dict(message))
    for message in out:
        message.pop("_tool_results", None)
    if tools:
        block = hermes_tools_block(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": _text(out[0].get("content")) + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _hermes_assistant(message: dict) -> dict:
    parts = [_text(message.get("content"))] if message.get("content") else []
    for call in message["tool_calls"]:
        function = call.get("function") or {}
        payload = {"name": function.get("name", ""), "arguments": function.get("arguments", {})}
        parts.append(f"<tool_call>\n{json.dumps(payload, ensure_ascii=False)}\n</tool_call>")
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    out["content"] = "\n".join(parts)
    return out


def _text(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


# ---------------------------------------------------------------- control-token guard


class _Guard:
    """Escapes control-token strings out of client text and tokenizes the rendered
    prompt so that only the template's markers become control tokens."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.strings = _protected_strings(tokenizer)
        self._ids = {tokenizer.convert_tokens_to_ids(s) for s in self.strings}
        alternatives = [re.escape(s) for s in sorted(self.strings, key=len, reverse=True)]
        # The whole plane, so a client can type neither a placeholder nor the marks below.
        alternatives.append(f"[{chr(_PLACEHOLDER_BASE)}-{chr(0x10FFFF)}]")
        self._pattern = re.compile("|".join(alternatives))
        self._placeholder = {s: chr(_PLACEHOLDER_BASE + i) for i, s in enumerate(self.strings)}
        self._plain = None  # built on first use: most prompts never need it

    # -- before rendering

    def escape(self, value):
        """`value` (str, or lists/dicts of them, keys included) with every protected
        string and every placeholder-range character replaced by a placeholder."""
        if isinstance(value, str):
            return self._pattern.sub(self._placeholder_for, value)
        if isinstance(value, dict):
            return {self.escape(k): self.escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.escape(v) for v in value]
        return value

    def _placeholder_for(self, match: re.Match) -> str:
        found = match.group(0)
        if found in self._placeholder:
            return self._placeholder[found]
        # A placeholder-range character typed by the client: it stands for itself.
        # Beyond the table, so `restore` keeps it as the character it is.
        return _LITERAL_MARK + found

    # -- after rendering

    def tokenize(self, text: str) -> tuple[int, ...]:
        clean, forged = self._restore(text)
        if not forged:
            return tuple(self._tokenizer.encode(clean, add_special_tokens=False))
        return self._tokenize_forged(clean, forged)

    def _restore(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """The text with placeholders turned back, and the (start, end) of each
        protected string that came from client text."""
        if not _PLANE.search(text):
            return text, []
        out: list[str] = []
        forged: list[tuple[int, int]] = []
        size = at = 0
        for match in _ESCAPED.finditer(text):
            out.append(text[at : match.start()])
            size += match.start() - at
            at = match.end()
            literal = match.group(1)
            if literal is not None:  # a placeholder-range character the client typed
                piece = literal
            elif (code := ord(match.group(0)) - _PLACEHOLDER_BASE) < len(self.strings):
                piece = self.strings[code]
                forged.append((size, size + len(piece)))
            else:  # not a placeholder: the character itself
                piece = match.group(0)
            out.append(piece)
            size += len(piece)
        out.append(text[at:])
        return "".join(out), forged

    def _tokenize_forged(self, clean: str, forged: list[tuple[int, int]]) -> tuple[int, ...]:
        """Keep the normal tokens except in the stretches (between two template
        markers) that hold a forged marker; re-encode those with markers as text."""
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        ids = self._tokenizer.encode(clean, add_special_tokens=False)
        # The offsets come from the backend; its encode_special_tokens switch is
        # shared state that transformers sets per call, so check it agreed.
        encoding = backend.encode(clean, add_special_tokens=False) if backend else None
        if encoding is None or encoding.ids != ids:
            return self._tokenize_forged_slow(clean, forged)
        offsets = encoding.offsets
        tokens: list[int] = []
        stretch_start, stretch_char = 0, 0
        for i, (token, (start, end)) in enumerate(zip(ids, offsets)):
            if token in self._ids and not _overlaps(start, end, forged):
                tokens += self._stretch(clean, ids, forged, stretch_start, i, stretch_char, start)
                tokens.append(token)
                stretch_start, stretch_char = i + 1, end
        tokens += self._stretch(clean, ids, forged, stretch_start, len(ids), stretch_char, len(clean))
        return tuple(tokens)

    def _stretch(self, clean, ids, forged, first, last, char_start, char_end) -> list[int]:
        if not any(s < char_end and e > char_start for s, e in forged):
            return list(ids[first:last])
        return self.plain_encode(clean[char_start:char_end], after_marker=char_start > 0)

    def plain_encode(self, text: str, after_marker: bool = False) -> list[int]:
        """`text` encoded with no protected string matched as a token. `after_marker`:
        the text follows a marker in the prompt, so it is encoded after a newline that
        is then dropped (as transformers does: SentencePiece pre-tokenizers treat the
        start of a text specially)."""
        if self._plain is None:
            self._plain = _plain_tokenizer(self._tokenizer.backend_tokenizer, self.strings)
        plain = self._plain
        if after_marker:
            newline = plain.encode("\n", add_special_tokens=False).ids
            ids = plain.encode("\n" + text, add_special_tokens=False).ids
            if ids[: len(newline)] == newline:
                return ids[len(newline) :]
        return plain.encode(text, add_special_tokens=False).ids

    def _tokenize_forged_slow(self, clean, forged) -> tuple[int, ...]:
        """Each forged marker encoded apart, as text: safe, though the tokens at its
        edges may differ from what the text alone gives."""
        tokens: list[int] = []
        at = 0
        for start, end in forged:
            tokens += self._tokenizer.encode(clean[at:start], add_special_tokens=False)
            if getattr(self._tokenizer, "backend_tokenizer", None) is not None:
                tokens += self.plain_encode(clean[start:end], after_marker=start > 0)
            else:
                tokens += self._tokenizer.encode(
                    clean[start:end], add_special_tokens=False, split_special_tokens=True
                )
            at = end
        tokens += self._tokenizer.encode(clean[at:], add_special_tokens=False)
        return tuple(tokens)


# Marks the next character as a literal placeholder-range character typed by the client.
_LITERAL_MARK = chr(_PLACEHOLDER_LAST + 1)  # U+10FFFE, a noncharacter: never in a template
_PLANE = re.compile(f"[{chr(_PLACEHOLDER_BASE)}-{chr(0x10FFFF)}]")
_ESCAPED = re.compile(f"{_LITERAL_MARK}(.)|[{chr(_PLACEHOLDER_BASE)}-{chr(0x10FFFF)}]", re.DOTALL)


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return any(s < end and e > start for s, e in spans)


def _protected_strings(tokenizer) -> tuple[str, ...]:
    """Special tokens, and added tokens that the template writes or that look like
    markup (or that the tokenizer lists as `chat_control_tokens`)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    template = tokenizer.chat_template
    template = "\n".join(template.values()) if isinstance(template, dict) else template or ""
    listed = set(getattr(tokenizer, "chat_control_tokens", None) or ())

    def control(token) -> bool:
        text = token.content
        if not text or text.isspace():
            return False
        return token.special or text in listed or text in template or bool(_MARKUP.match(text))

    strings = {t.content for t in added.values() if control(t)}
    # The tokenizer's named special tokens, in case one is not an added token.
    for s in getattr(tokenizer, "all_special_tokens", None) or ():
        if s:
            strings.add(s)
    return tuple(sorted(strings))


def _plain_tokenizer(backend, protected: tuple[str, ...]):
    """A copy of the fast tokenizer where the protected strings are special tokens
    and special tokens are not matched: they are encoded as the text they are."""
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    protected_set = set(protected)
    for token in spec.get("added_tokens", []):
        token["special"] = token["content"] in protected_set
    plain = Tokenizer.from_str(json.dumps(spec))
    plain.encode_special_tokens = True
    return plain


_GUARDS: "weakref.WeakKeyDictionary[Any, _Guard]" = weakref.WeakKeyDictionary()


def _guard(tokenizer) -> _Guard:
    guard = _GUARDS.get(tokenizer)
    if guard is None:
        guard = _GUARDS[tokenizer] = _Guard(tokenizer)
    return guard
