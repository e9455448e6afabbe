"""OpenAI request body -> the API-neutral actors.messages.ChatRequest.

    call = parse_chat_body(body, vocab_size)        # /v1/chat/completions
    call = parse_completion_body(body, vocab_size)  # /v1/completions

Both raise BadRequest (message, param) for anything the server would otherwise
have to guess at: shapes and ranges (gateway/openai_models.py), unsupported
output-changing fields, tool input that cannot be honoured. Unset sampling
fields stay None so that the served model's own defaults apply.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass

import orjson
from pydantic import BaseModel, ValidationError

from actors.constraint import ConstraintError, validate_schema
from actors.messages import ChatRequest, OutputFormat, SamplingParams, Tool
from gateway import openai_models as m

log = logging.getLogger("greenroom.gateway.openai")

MAX_SCHEMA_BYTES = 64 * 1024  # one tool's parameters or one response_format schema, as JSON
# Agents resend the same tools on every request and a schema takes ~5 ms to check
# (jsonschema is pure Python): verdicts are remembered, so only new schemas cost that.
SCHEMA_VERDICTS = 1024
THINKING_OFF_EFFORTS = {"none", "minimal"}
THINKING_ON_EFFORTS = {"low", "medium", "high", "xhigh"}


class BadRequest(Exception):
    """A 400 in OpenAI's error shape; `param` names the offending top-level field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class OpenAICall:
    """One validated request: what the session runs, and how to answer."""

    chat: ChatRequest
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    legacy_functions: bool = False  # the request used `functions`: answer with `function_call`


# ---------------------------------------------------------------- shapes


_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}  # union branches, not fields
_logged_unknown: set[str] = set()
MAX_LOGGED_UNKNOWN = 256  # names are the client's choice: the memory of them is bounded


def _where(loc: tuple) -> str:
    """('messages', 0, 'user', 'content', 'list[ContentPart]') -> 'messages[0].user.content'.

    Pydantic puts union branch names (type reprs) in the location; they are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _FIELD_NAME.match(part) and part not in _TYPE_NAMES and not path.endswith("." + part) and path != part:
            path += f".{part}" if path else part
    return path


def _validation_message(exc: ValidationError) -> BadRequest:
    errors = exc.errors(include_url=False)
    lines = []
    for error in errors[:3]:
        line = f"{_where(error['loc']) or 'body'}: {error['msg']}"
        value = error.get("input")
        if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 40):
            line += f", got {value!r}"
        if line not in lines:
            lines.append(line)
    first = errors[0]["loc"] if errors else ()
    param = first[0] if first and isinstance(first[0], str) else None
    return BadRequest("; ".join(lines), param)


def validate(model: type[BaseModel], body) -> BaseModel:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise _validation_message(exc) from None
    for name in request.model_extra or {}:
        if name not in _logged_unknown and len(_logged_unknown) < MAX_LOGGED_UNKNOWN:
            _logged_unknown.add(name)  # once per name: newer clients send it on every request
            log.warning("ignoring the unknown request field %r (logged once)", name)
    return request


def _unsupported(param: str, why: str) -> BadRequest:
    return BadRequest(f"'{param}' is not supported by this server: {why}", param)


# ---------------------------------------------------------------- sampling


def _stop(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > m.MAX_STOP or any(len(s) > m.MAX_STOP_LEN for s in stops):
        raise BadRequest(f"'stop': at most {m.MAX_STOP} strings of at most {m.MAX_STOP_LEN} characters", "stop")
    return tuple(s for s in stops if s)  # an empty stop string would end every reply at once


def _logit_bias(bias: dict[str, float] | None, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    if len(bias) > m.MAX_LOGIT_BIAS:
        raise BadRequest(f"'logit_bias' has {len(bias)} entries; at most {m.MAX_LOGIT_BIAS}", "logit_bias")
    pairs = []
    for key, value in bias.items():
        if not key.isdigit() or (vocab_size is not None and int(key) >= vocab_size):
            limit = f" below {vocab_size}" if vocab_size is not None else ""
            raise BadRequest(f"'logit_bias' key {key!r} is not a token id{limit}", "logit_bias")
        if not -100 <= value <= 100:
            raise BadRequest(f"'logit_bias' value for {key} must be between -100 and 100, got {value}", "logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(sorted(pairs))


def _sampling(req: m.SamplingFields, vocab_size: int | None, max_tokens: int | None, logprobs: int | None):
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=0 if req.top_k == -1 else req.top_k,  # vLLM spells "off" -1, mlx-lm 0
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        max_tokens=max_tokens,
        stop=_stop(req.stop),
        seed=req.seed,
        logprobs=logprobs,
    )


def _include_usage(req: m.SamplingFields) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# ---------------------------------------------------------------- messages


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise BadRequest(
                f"{where}.content[{j}]: '{part.type}' parts are not supported: the served model reads text only",
                "messages",
            )
        if part.text is None:
            raise BadRequest(f"{where}.content[{j}]: a text part needs 'text'", "messages")
        texts.append(part.text)
    return "".join(texts)


def _arguments(raw: str, where: str) -> dict:
    if not raw.strip():
        return {}  # some clients send "" for a call without arguments
    try:
        arguments = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{where}.arguments is not valid JSON: {exc}", "messages") from None
    if not isinstance(arguments, dict):
        raise BadRequest(f"{where}.arguments must be a JSON object", "messages")
    return arguments


def _call(call_id: str, function: m.FunctionCall, where: str) -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": function.name, "arguments": _arguments(function.arguments, f"{where}.function")},
    }


class _History:
    """Translates messages in order, remembering the calls a tool result may answer."""

    def __init__(self):
        self.call_names: dict[str, str] = {}  # id -> function name of every earlier call
        self.latest_by_name: dict[str, str] = {}  # function name -> id of its latest call

    def message(self, i: int, msg) -> dict:
        where = f"messages[{i}]"
        match msg:
            case m.SystemMessage() | m.UserMessage():
                role = "user" if isinstance(msg, m.UserMessage) else "system"
                return {"role": role, "content": _text(msg.content, where)}
            case m.AssistantMessage():
                return self.assistant(msg, where, i)
            case m.ToolMessage():
                if msg.tool_call_id not in self.call_names:
                    raise BadRequest(
                        f"{where}: tool_call_id {msg.tool_call_id!r} answers no earlier assistant tool call",
                        "messages",
                    )
                name = msg.name or self.call_names[msg.tool_call_id]
                return self.tool_result(msg.tool_call_id, name, _text(msg.content, where))
            case m.FunctionMessage():
                call_id = self.latest_by_name.get(msg.name)
                if call_id is None:
                    raise BadRequest(f"{where}: no earlier function_call of {msg.name!r}", "messages")
                return self.tool_result(call_id, msg.name, _text(msg.content, where))
        raise AssertionError(type(msg))

    def assistant(self, msg: m.AssistantMessage, where: str, i: int) -> dict:
        out = {"role": "assistant", "content": _text(msg.content, where)}
        calls = [_call(c.id, c.function, f"{where}.tool_calls[{j}]") for j, c in enumerate(msg.tool_calls or ())]
        if msg.function_call is not None:
            # The deprecated form has no id; one derived from the position keeps the prompt stable.
            calls.append(_call(f"call_{i}", msg.function_call, f"{where}.function_call"))
        if calls:
            out["tool_calls"] = calls
        for call in calls:
            self.call_names[call["id"]] = call["function"]["name"]
            self.latest_by_name[call["function"]["name"]] = call["id"]
        if msg.reasoning_content is not None:
            out["reasoning_content"] = msg.reasoning_content
        return out

    @staticmethod
    def tool_result(call_id: str, name: str, content: str) -> dict:
        return {"role": "tool", "content": content, "tool_call_id": call_id, "name": name}


def _messages(messages) -> tuple[dict, ...]:
    history = _History()
    return tuple(history.message(i, msg) for i, msg in enumerate(messages))


# ---------------------------------------------------------------- tools and formats


_verdicts: OrderedDict[tuple, str | None] = OrderedDict()  # (where, object_root, schema JSON) -> error


def _schema_error(schema: dict, where: str, object_root: bool, raw: bytes) -> str | None:
    key = (where, object_root, raw)
    if key in _verdicts:
        _verdicts.move_to_end(key)
        return _verdicts[key]
    try:
        validate_schema(schema, object_root=object_root, what=where)
        error = None
    except ConstraintError as exc:
        error = str(exc)
    _verdicts[key] = error
    if len(_verdicts) > SCHEMA_VERDICTS:
        _verdicts.popitem(last=False)
    return error


def check_schema(schema: dict, where: str, param: str, *, object_root: bool) -> None:
    """Bounded, valid, and compilable by llguidance: a schema that cannot constrain
    decoding is the client's 400 now, not a failed turn later."""
    raw = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    if len(raw) > MAX_SCHEMA_BYTES:
        raise BadRequest(f"{where} is larger than {MAX_SCHEMA_BYTES} bytes of JSON", param)
    error = _schema_error(schema, where, object_root, raw)
    if error is not None:
        raise BadRequest(error, param)


def _tool(function: m.FunctionDef, where: str, param: str) -> Tool:
    # {} or absent: a call without arguments.
    parameters = function.parameters or {"type": "object", "properties": {}}
    check_schema(parameters, f"{where}.parameters", param, object_root=True)
    return Tool(function.name, function.description or "", parameters)


def _tools(functions: list[m.FunctionDef], prefix: str, param: str) -> tuple[Tool, ...]:
    tools = tuple(_tool(f, f"{prefix}[{i}]", param) for i, f in enumerate(functions))
    names = [t.name for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadRequest(f"'{param}' names {duplicates} more than once", param)
    return tools


def _tool_choice(choice, tools: tuple[Tool, ...], param: str) -> tuple[str, str | None]:
    """(tool_choice, tool_name) as ChatRequest spells them."""
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice == "required" and not tools:
            raise BadRequest(f"'{param}' is \"required\" but the request has no tools", param)
        return choice, None
    name = choice.function.name if isinstance(choice, m.NamedToolChoice) else choice.name
    if name not in {t.name for t in tools}:
        raise BadRequest(f"'{param}' names {name!r}, which is not one of the request's tools", param)
    return "function", name


def _output_format(fmt) -> OutputFormat | None:
    match fmt:
        case None | m.TextFormat():
            return None
        case m.JsonObjectFormat():
            return OutputFormat("json_object")
        case m.JsonSchemaFormat(json_schema=spec):
            if spec.schema_ is None:
                return OutputFormat("json_object")
            check_schema(spec.schema_, "response_format.json_schema.schema", "response_format", object_root=False)
            return OutputFormat("json_schema", spec.schema_)
    raise AssertionError(type(fmt))


def _thinking(req: m.ChatCompletionRequest) -> bool | None:
    enable = (req.chat_template_kwargs or {}).get("enable_thinking")
    if isinstance(enable, bool):
        return enable
    effort = (req.reasoning_effort or "").lower()
    if effort in THINKING_OFF_EFFORTS:
        return False
    if effort in THINKING_ON_EFFORTS:
        return True
    return None  # unset or a value this server does not know: the template's default


# ---------------------------------------------------------------- the two endpoints


def _check_chat_supported(req: m.ChatCompletionRequest) -> None:
    if req.n is not None and req.n > 1:
        raise _unsupported("n", "one choice per request (send n requests)")
    if req.modalities and "audio" in req.modalities:
        raise _unsupported("modalities", "the served model answers in text only")
    for name in ("audio", "prediction", "web_search_options", "moderation"):
        if getattr(req, name) is not None:
            raise _unsupported(name, "this feature is not implemented")
    if req.tools is not None and req.functions is not None:
        raise BadRequest("send either 'tools' or the deprecated 'functions', not both", "functions")


def chat_request(req: m.ChatCompletionRequest, vocab_size: int | None) -> OpenAICall:
    _check_chat_supported(req)
    legacy = req.functions is not None
    if legacy:
        tools = _tools(req.functions, "functions", "functions")
        choice, name = _tool_choice(req.function_call, tools, "function_call")
    else:
        tools = _tools([t.function for t in req.tools or ()], "tools", "tools")
        choice, name = _tool_choice(req.tool_choice, tools, "tool_choice")
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    chat = ChatRequest(
        messages=_messages(req.messages),
        params=_sampling(req, vocab_size, max_tokens, logprobs),
        tools=tools,
        tool_choice=choice,
        tool_name=name,
        # The deprecated form returns one function_call per reply.
        parallel_tool_calls=False if legacy else req.parallel_tool_calls is not False,
        output_format=_output_format(req.response_format),
        thinking=_thinking(req),
    )
    return OpenAICall(chat, bool(req.stream), _include_usage(req), req.user, legacy)


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("'prompt' is empty", "prompt")
        return prompt
    if prompt and all(isinstance(p, str) for p in prompt):
        raise BadRequest(f"'prompt' holds {len(prompt)} prompts; send one per request", "prompt")
    if not prompt:
        raise BadRequest("'prompt' is empty", "prompt")
    raise BadRequest("'prompt' as token ids is not supported; send text", "prompt")


def completion_request(req: m.CompletionRequest, vocab_size: int | None) -> OpenAICall:
    if req.n is not None and req.n > 1:
        raise _unsupported("n", "one choice per request (send n requests)")
    if req.best_of is not None and req.best_of > 1:
        raise _unsupported("best_of", "one candidate per request")
    if req.echo:
        raise _unsupported("echo", "the reply never repeats the prompt")
    if req.suffix:
        raise _unsupported("suffix", "fill-in-the-middle is not implemented")
    chat = ChatRequest(prompt=_prompt(req.prompt), params=_sampling(req, vocab_size, req.max_tokens, req.logprobs))
    return OpenAICall(chat, bool(req.stream), _include_usage(req), req.user)


def parse_chat_body(body, vocab_size: int | None = None) -> OpenAICall:
    return chat_request(validate(m.ChatCompletionRequest, body), vocab_size)


def parse_completion_body(body, vocab_size: int | None = None) -> OpenAICall:
    return completion_request(validate(m.CompletionRequest, body), vocab_size)
