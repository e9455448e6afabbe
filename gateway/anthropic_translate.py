"""An Anthropic Messages API request -> greenroom's API-neutral ChatRequest, without I/O.

    to_chat_request(MessagesRequest) -> actors.messages.ChatRequest (or BadRequest)
    agent_id_for(headers, metadata) -> agent id or None

(The way back, events -> message and stream, is gateway/anthropic_reply.py.)

Choices that are not Anthropic's own, documented here once:
- `system` blocks whose text starts with "x-anthropic-billing-header:" are dropped:
  Claude Code changes that block on every request and it would break cache reuse.
- `role: "system"` messages inside `messages` are folded into the next user turn
  (the previous one when none follows): many chat templates allow only one
  leading system message.
- A tool_result with is_error is rendered as "Error: " + its text.
- An image or document inside a tool_result becomes a placeholder line (the model
  cannot read it); one in a user turn is a 400, which names the block type.
- output_config.effort becomes a thinking budget: see EFFORT_BUDGET.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping

import orjson
from pydantic import ValidationError

from actors.cachestore import InvalidAgentId, validate_agent_id
from actors.constraint import ConstraintError, validate_schema
from actors.messages import ChatRequest, OutputFormat, SamplingParams, Tool
from gateway.anthropic_models import (
    BLOCK_TAGS,
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    JsonSchemaFormat,
    Message,
    Metadata,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)

log = logging.getLogger("greenroom.anthropic")

BILLING_PREFIX = "x-anthropic-billing-header:"
# Tokens of reasoning per effort level; None: no budget (the model thinks as long as it likes).
EFFORT_BUDGET = {"low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768, "max": None}
UNREADABLE_PLACEHOLDER = "[{kind} omitted: this model cannot read {kind}s]"
_MAX_LOGGED_FIELDS = 256
MAX_SCHEMA_BYTES = 64 * 1024  # one schema that constrains decoding, as JSON
SCHEMA_VERDICTS = 1024
_schema_verdicts: OrderedDict[tuple, str | None] = OrderedDict()  # (where, object_root, JSON) -> error
_logged_fields: set[str] = set()


class BadRequest(Exception):
    """Anything wrong with the request: a 400 invalid_request_error."""


# ---------------------------------------------------------------- request -> ChatRequest


def _json_path(loc: tuple) -> list:
    """pydantic's error location without its union bookkeeping: the member tried
    ("str", "list[...]") and a tagged union's tag right after a list index."""
    path = []
    for before, part in zip((None, *loc), loc):
        if isinstance(part, str) and ("[" in part or part in ("str", "dict")):
            continue
        if isinstance(before, int) and part in BLOCK_TAGS:
            continue
        path.append(part)
    return path


def validation_message(exc: ValidationError) -> str:
    """pydantic's errors as one line, naming fields the way the JSON spells them.

    For a union (content: str | [blocks]) only the deepest failure is kept: it is
    the one that says what is wrong ("messages.0.content.0.text: Field required").
    """
    deepest: dict[object, list[tuple[str, str]]] = {}
    for err in exc.errors():
        loc = _json_path(err["loc"])
        key = loc[0] if loc else ""
        path = ".".join(str(p) for p in loc)
        kept = deepest.setdefault(key, [])
        if not kept or path.count(".") > kept[0][0].count("."):
            kept[:] = [(path, err["msg"])]
        elif path.count(".") == kept[0][0].count("."):
            kept.append((path, err["msg"]))
    parts = [f"{path}: {msg}" if path else msg for group in deepest.values() for path, msg in group]
    return "; ".join(dict.fromkeys(parts[:5]))


def log_unknown_fields(body: CountTokensRequest) -> None:
    """Log each unknown top-level field name once: accepted, ignored, but visible."""
    for name in body.model_extra or {}:
        if name not in _logged_fields and len(_logged_fields) < _MAX_LOGGED_FIELDS:
            _logged_fields.add(name)
            log.info("ignoring unknown Anthropic request field %r", name)


def system_text(system) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "\n\n".join(b.text for b in system if not b.text.startswith(BILLING_PREFIX))


def _text_of(content) -> str:
    """The text of a system message inside `messages` (string or text blocks)."""
    if isinstance(content, str):
        return content
    texts = []
    for block in content:
        if not isinstance(block, TextBlock):
            raise BadRequest(f"a system message may hold only text blocks, not {block.type!r}")
        texts.append(block.text)
    return "\n\n".join(texts)


def _unreadable(block) -> BadRequest:
    return BadRequest(
        f"{block.type} content blocks are not supported: the served model cannot read {block.type}s"
    )


def _tool_result_text(block: ToolResultBlock) -> str:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for part in content:
            if isinstance(part, TextBlock):
                parts.append(part.text)
            elif isinstance(part, (ImageBlock, DocumentBlock)):
                # A refusal here would break the conversation for good: the block
                # stays in every later request's history.
                parts.append(UNREADABLE_PLACEHOLDER.format(kind=part.type))
            else:
                raise BadRequest(f"tool_result content blocks of type {part.type!r} are not supported")
        text = "\n".join(parts)
    return f"Error: {text}" if block.is_error else text


def _user_messages(content, before: list[str], after: list[str], tool_names: dict[str, str]) -> list[dict]:
    """A user turn: one `tool` message per tool_result, then the text (if any).

    Anthropic puts tool_result blocks first in a user turn; the tool messages go
    first here too so they follow the assistant's tool calls directly.
    """
    blocks = [TextBlock(type="text", text=content)] if isinstance(content, str) else content
    tools, texts = [], []
    for block in blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            tool = {"role": "tool", "tool_call_id": block.tool_use_id, "content": _tool_result_text(block)}
            if block.tool_use_id in tool_names:
                tool["name"] = tool_names[block.tool_use_id]
            tools.append(tool)
        elif isinstance(block, (ImageBlock, DocumentBlock)):
            raise _unreadable(block)
        else:
            raise BadRequest(f"content blocks of type {block.type!r} are not supported in a user message")
    text = "\n\n".join(before + texts + after)
    return tools + ([{"role": "user", "content": text}] if text or not tools else [])


def _assistant_message(content, tool_names: dict[str, str]) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, thoughts, calls = [], [], []
    for block in content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            thoughts.append(block.thinking)
        elif isinstance(block, RedactedThinkingBlock):
            continue  # encrypted by Anthropic: nothing a local model can read
        elif isinstance(block, ToolUseBlock):
            tool_names[block.id] = block.name
            calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.input}})
        elif isinstance(block, (ImageBlock, DocumentBlock)):
            raise _unreadable(block)
        else:
            raise BadRequest(f"content blocks of type {block.type!r} are not supported in an assistant message")
    # Our own replies split text only around thinking and tool calls: joined with
    # nothing, the text renders as the tokens the model generated.
    message = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    if thoughts:
        message["reasoning_content"] = "\n\n".join(thoughts)
    return message


def _fold_system_messages(messages: list[Message]) -> tuple[list[tuple[Message, list[str], list[str]]], list[str]]:
    """Pairs each user/assistant message with the system texts to put before/after
    its own text; returns the system texts left over (no user turn at all)."""
    out: list[tuple[Message, list[str], list[str]]] = []
    pending: list[str] = []
    for message in messages:
        if message.role == "system":
            text = _text_of(message.content)
            if text:
                pending.append(text)
            continue
        if message.role == "user" and pending:
            out.append((message, pending, []))
            pending = []
        else:
            out.append((message, [], []))
    if pending:
        for message, _before, after in reversed(out):
            if message.role == "user":
                after.extend(pending)
                return out, []
    return out, pending


def chat_messages(body: CountTokensRequest) -> tuple[dict, ...]:
    folded, leftover = _fold_system_messages(body.messages)
    system = "\n\n".join(t for t in [system_text(body.system), *leftover] if t)
    messages = [{"role": "system", "content": system}] if system else []
    tool_names: dict[str, str] = {}
    for message, before, after in folded:
        if message.role == "user":
            messages.extend(_user_messages(message.content, before, after, tool_names))
        else:
            messages.append(_assistant_message(message.content, tool_names))
    return tuple(messages)


def _tools(body: CountTokensRequest) -> tuple[Tool, ...]:
    tools = []
    named = getattr(body.tool_choice, "name", None)
    for tool in body.tools or ():
        if (tool.model_extra or {}).get("defer_loading") is True and tool.name != named:
            # Deferred tools stay out of the prompt until a tool search loads them (as
            # Anthropic does); Claude Code marks some so.
            continue
        if tool.type not in (None, "custom") or tool.input_schema is None:
            raise BadRequest(
                f"tool {tool.name!r} of type {tool.type!r} is not supported: greenroom serves "
                "client tools declared with an input_schema"
            )
        tools.append(Tool(tool.name, tool.description or "", tool.input_schema))
    return tuple(tools)


def _tool_choice(body: CountTokensRequest, tools: tuple[Tool, ...]) -> dict:
    choice = body.tool_choice
    if choice is None:
        return {}
    if choice.type in ("any", "tool") and not tools:
        raise BadRequest(f"tool_choice {choice.type!r} needs at least one tool in 'tools'")
    if choice.type == "tool" and choice.name not in {t.name for t in tools}:
        raise BadRequest(f"tool_choice names {choice.name!r}, which is not in 'tools'")
    kind = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}[choice.type]
    fields = {"tool_choice": kind, "tool_name": choice.name if kind == "function" else None}
    if choice.disable_parallel_tool_use:
        fields["parallel_tool_calls"] = False
    return fields


def _check_schema(schema: dict, where: str, *, object_root: bool) -> None:
    """Bounded, valid and compilable by llguidance: a schema that cannot constrain
    decoding is the client's 400 now, not a failed turn later. Verdicts are kept:
    an agent sends the same schemas on every turn."""
    raw = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    if len(raw) > MAX_SCHEMA_BYTES:
        raise BadRequest(f"{where} is larger than {MAX_SCHEMA_BYTES} bytes of JSON")
    key = (where, object_root, raw)
    if key not in _schema_verdicts:
        try:
            validate_schema(schema, object_root=object_root, what=where)
            _schema_verdicts[key] = None
        except ConstraintError as exc:
            _schema_verdicts[key] = str(exc)
        if len(_schema_verdicts) > SCHEMA_VERDICTS:
            _schema_verdicts.popitem(last=False)
    _schema_verdicts.move_to_end(key)
    if _schema_verdicts[key] is not None:
        raise BadRequest(_schema_verdicts[key])


def _output_format(body: CountTokensRequest) -> OutputFormat | None:
    fmt: JsonSchemaFormat | None = body.output_config.format if body.output_config else None
    where = "output_config.format.schema"
    if fmt is None and body.output_format is not None:
        fmt, where = body.output_format, "output_format.schema"
    if fmt is None:
        return None
    _check_schema(fmt.schema_, where, object_root=False)
    return OutputFormat("json_schema", fmt.schema_)


def _check_constrained_tools(body: CountTokensRequest, output: OutputFormat | None) -> None:
    """Tool schemas become grammars when a call is forced, or when an output format
    leaves the model a choice between calls and the answer; only then must
    llguidance compile them (Claude Code's everyday tools are parsed, not forced)."""
    choice = body.tool_choice.type if body.tool_choice else "auto"
    if choice == "none" or (choice == "auto" and output is None):
        return
    for i, tool in enumerate(body.tools or ()):
        if choice != "tool" or tool.name == body.tool_choice.name:
            _check_schema(tool.input_schema, f"tools.{i}.input_schema", object_root=True)


def _thinking(body: CountTokensRequest) -> dict:
    effort = body.output_config.effort if body.output_config else None
    budget = EFFORT_BUDGET[effort] if effort else None
    config = body.thinking
    if config is None:
        return {"thinking_budget": budget}
    if config.type == "disabled":
        return {"thinking": False}
    if config.type == "enabled":
        return {"thinking": True, "thinking_budget": config.budget_tokens}
    return {"thinking": None, "thinking_budget": budget}  # adaptive, between_tools: the template's default


def to_chat_request(body: CountTokensRequest) -> ChatRequest:
    """The API-neutral turn this request asks for. Raises BadRequest."""
    tools = _tools(body)
    output = _output_format(body)
    _check_constrained_tools(body, output)
    params = SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_tokens=getattr(body, "max_tokens", None),
        stop=tuple(body.stop_sequences or ()),
    )
    return ChatRequest(
        messages=chat_messages(body),
        params=params,
        tools=tools,
        output_format=output,
        **_tool_choice(body, tools),
        **_thinking(body),
    )


# ---------------------------------------------------------------- identity


_OLD_CC_USER_ID = re.compile(r"_session_([0-9A-Za-z-]{8,64})$")


def _session_in_user_id(user_id: str) -> str:
    """Claude Code's metadata.user_id: a JSON string holding session_id (current),
    or "user_<hash>_account_<uuid>_session_<uuid>" (older versions)."""
    if user_id.startswith("{"):
        try:
            value = orjson.loads(user_id)
        except orjson.JSONDecodeError:
            return user_id
        session = value.get("session_id") if isinstance(value, dict) else None
        return session if isinstance(session, str) and session else user_id
    match = _OLD_CC_USER_ID.search(user_id)
    return match.group(1) if match else user_id


def as_agent_id(value: str) -> str:
    """`value` if it is a valid agent id, else a stable valid id derived from it."""
    try:
        return validate_agent_id(value)
    except InvalidAgentId:
        return "cc-" + hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def agent_id_for(headers: Mapping[str, str], metadata: Metadata | None) -> str | None:
    """X-Agent-Id (must be valid: greenroom's own header), else Claude Code's session
    id (header, then metadata.user_id), mapped onto a valid id; None: ephemeral."""
    explicit = headers.get("X-Agent-Id")
    if explicit:
        try:
            return validate_agent_id(explicit)
        except InvalidAgentId as exc:
            raise BadRequest(f"X-Agent-Id: {exc}") from None
    session = headers.get("X-Claude-Code-Session-Id")
    if not session and metadata is not None and metadata.user_id:
        session = _session_in_user_id(metadata.user_id)
    return as_agent_id(session) if session else None
