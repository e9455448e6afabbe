"""A turn's events -> OpenAI response bodies and SSE chunks.

The session emits TextDelta, ReasoningDelta and ToolCallEvent, then TurnDone.
Non-streaming, `chat_completion_body` / `completion_body` fold the whole list
into one body; streaming, `ChatChunks` / `CompletionChunks` turn each event into
the `data: ...` lines OpenAI's clients read. Both are pure: no I/O, no server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from actors.messages import ReasoningDelta, TextDelta, TokenLogprob, ToolCallEvent, TurnDone

DONE_LINE = b"data: [DONE]\n\n"


def sse(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def error_line(done: TurnDone) -> bytes:
    """An error after the stream began: the status line is long gone, so it goes in the stream."""
    message = done.error or "generation failed"
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": "server_error"}})


def usage_dict(done: TurnDone) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
        # greenroom extension: prompt tokens that actually went through the model.
        "prefilled_tokens": done.prefilled_tokens,
    }


def finish_reason(done: TurnDone, called: bool, legacy_functions: bool) -> str:
    """Agents loop on "tool_calls": a reply that made calls says so, whatever ended it cleanly."""
    if called and done.finish_reason in ("stop", "tool_calls"):
        return "function_call" if legacy_functions else "tool_calls"
    return done.finish_reason


# ---------------------------------------------------------------- logprobs


def _alternative(top: tuple[str, float, tuple[int, ...]]) -> dict:
    token, logprob, raw = top
    return {"token": token, "logprob": logprob, "bytes": list(raw)}


def chat_logprob(lp: TokenLogprob) -> dict:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.bytes),
        "top_logprobs": [_alternative(t) for t in lp.top],
    }


def chat_logprobs(items: Iterable[TokenLogprob]) -> dict:
    return {"content": [chat_logprob(lp) for lp in items], "refusal": None}


def completion_logprobs(items: Iterable[TokenLogprob], offset: int = 0) -> dict:
    """The legacy /v1/completions shape; `offset` is where the first token starts in the text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in items:
        out["tokens"].append(lp.token)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({token: logprob for token, logprob, _ in lp.top})
        out["text_offset"].append(offset)
        offset += len(lp.token)
    return out


# ---------------------------------------------------------------- one reply, folded


@dataclass(slots=True)
class Folded:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[ToolCallEvent] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: TurnDone | None = None


def fold(events: Iterable) -> Folded:
    folded = Folded()
    for event in events:
        match event:
            case TextDelta(text=text, logprobs=lps):
                folded.text.append(text)
                folded.logprobs.extend(lps)
            case ReasoningDelta(text=text):
                folded.reasoning.append(text)
            case ToolCallEvent():
                folded.calls.append(event)
            case TurnDone():
                folded.done = event
    if folded.done is None:
        raise ValueError("a turn's events end with TurnDone")
    return folded


def _message(folded: Folded, legacy_functions: bool) -> dict:
    text = "".join(folded.text)
    calls = sorted(folded.calls, key=lambda c: c.index)
    # OpenAI sends null content when the reply is only tool calls.
    message = {"role": "assistant", "content": None if calls and not text else text}
    if folded.reasoning:
        message["reasoning_content"] = "".join(folded.reasoning)
    if calls and legacy_functions:
        message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
    elif calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
    return message


def chat_completion_body(
    events: Iterable, *, ident: str, created: int, fingerprint: str, logprobs: bool, legacy_functions: bool = False
) -> dict:
    folded = fold(events)
    done = folded.done
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": done.model,
        "choices": [
            {
                "index": 0,
                "message": _message(folded, legacy_functions),
                "finish_reason": finish_reason(done, bool(folded.calls), legacy_functions),
                "logprobs": chat_logprobs(folded.logprobs) if logprobs else None,
            }
        ],
        "usage": usage_dict(done),
        "system_fingerprint": fingerprint,
    }


def completion_body(events: Iterable, *, ident: str, created: int, fingerprint: str, logprobs: bool) -> dict:
    folded = fold(events)
    done = folded.done
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": done.model,
        "choices": [
            {
                "index": 0,
                "text": "".join(folded.text),
                "finish_reason": done.finish_reason,
                "logprobs": completion_logprobs(folded.logprobs) if logprobs else None,
            }
        ],
        "usage": usage_dict(done),
        "system_fingerprint": fingerprint,
    }


# ---------------------------------------------------------------- one reply, streamed


@dataclass(slots=True)
class ChatChunks:
    """The SSE lines of one streamed chat reply: start(), event() per event, end(done)."""

    ident: str
    created: int
    model: str
    fingerprint: str
    include_usage: bool = False
    logprobs: bool = False
    legacy_functions: bool = False
    called: bool = False

    def chunk(self, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> bytes:
        body = {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
        }
        if self.include_usage:
            body["usage"] = None  # only the last chunk carries usage (OpenAI's convention)
        return sse(body)

    def start(self) -> bytes:
        return self.chunk({"role": "assistant", "content": ""})

    def event(self, event) -> bytes | None:
        match event:
            case TextDelta(text=text, logprobs=lps):
                if not text and not lps:
                    return None
                return self.chunk({"content": text}, logprobs=chat_logprobs(lps) if self.logprobs else None)
            case ReasoningDelta(text=text):
                return self.chunk({"reasoning_content": text}) if text else None
            case ToolCallEvent():
                return self.tool_call(event)
        return None

    def tool_call(self, call: ToolCallEvent) -> bytes | None:
        if self.legacy_functions:
            if self.called:
                return None  # the deprecated form carries one call per reply
            self.called = True
            return self.chunk({"function_call": {"name": call.name, "arguments": call.arguments}})
        self.called = True
        item = {
            "index": call.index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        return self.chunk({"tool_calls": [item]})

    def end(self, done: TurnDone) -> bytes:
        if done.finish_reason == "error":
            return error_line(done) + DONE_LINE
        lines = self.chunk({}, finish_reason(done, self.called, self.legacy_functions))
        if self.include_usage:
            lines += sse(self.usage_body(done))
        return lines + DONE_LINE

    def usage_body(self, done: TurnDone) -> dict:
        return {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [],
            "usage": usage_dict(done),
        }


@dataclass(slots=True)
class CompletionChunks:
    """The SSE lines of one streamed /v1/completions reply: event() per event, end(done)."""

    ident: str
    created: int
    model: str
    fingerprint: str
    include_usage: bool = False
    logprobs: bool = False
    offset: int = 0  # characters of text sent so far (the legacy logprobs' text_offset)

    def body(self, choices: list, usage: dict | None = None) -> dict:
        body = {
            "id": self.ident,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return body

    def choice(self, text: str, finish: str | None = None, logprobs: dict | None = None) -> list:
        return [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]

    def start(self) -> bytes | None:
        return None  # a completion stream has no role chunk

    def event(self, event) -> bytes | None:
        if not isinstance(event, TextDelta) or not (event.text or event.logprobs):
            return None
        logprobs = completion_logprobs(event.logprobs, self.offset) if self.logprobs else None
        self.offset += len(event.text)
        return sse(self.body(self.choice(event.text, logprobs=logprobs)))

    def end(self, done: TurnDone) -> bytes:
        if done.finish_reason == "error":
            return error_line(done) + DONE_LINE
        lines = sse(self.body(self.choice("", done.finish_reason)))
        if self.include_usage:
            lines += sse(self.body([], usage_dict(done)))
        return lines + DONE_LINE
