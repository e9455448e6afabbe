"""greenroom's turn events -> an Anthropic message, whole or streamed, without I/O.

    reply = Reply(requested_model)
    reply.start()             -> [("message_start", data)]
    reply.feed(event)         -> the stream events for a TextDelta / ReasoningDelta / ToolCallEvent
    reply.finish(turn_done)   -> closing block, message_delta, message_stop
    reply.message(turn_done)  -> the same message as one JSON body

Both paths build the same blocks, so a client's accumulated stream equals the
non-streamed reply. Thinking blocks come with an opaque signature (clients send
it back; greenroom ignores it); a tool call's input is streamed as
input_json_delta pieces that concatenate to its JSON.
"""

from __future__ import annotations

import hashlib
import re
import uuid

import orjson

from actors.messages import ReasoningDelta, TextDelta, ToolCallEvent, TurnDone

# Size of the partial_json pieces a tool call's input is streamed in.
JSON_PIECE_CHARS = 64


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _tool_use_id(engine_id: str) -> str:
    if re.fullmatch(r"toolu_[A-Za-z0-9_-]{1,200}", engine_id):
        return engine_id
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _signature(thinking: str) -> str:
    """Opaque, as Anthropic's: clients send it back and greenroom ignores it."""
    return "gr:" + hashlib.blake2b(thinking.encode(), digest_size=24).hexdigest()


def stop_reason(done: TurnDone, used_tools: bool) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    if done.finish_reason == "tool_calls" or used_tools:
        return "tool_use"
    if done.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def usage(done: TurnDone | None) -> dict:
    """Anthropic's meaning: the prompt is input_tokens + cache_read_input_tokens +
    cache_creation_input_tokens, and Claude Code adds the three up to judge how full
    its context is. cache_read is what came from the agent's cache; input_tokens the
    rest, which went through the model (greenroom caches it all as a side effect, so
    nothing is counted as a separate cache write). On a cold prompt input_tokens is
    the whole prompt, which is what count_tokens returns."""
    if done is None:  # message_start: the counts are known only when the turn ends
        return {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    return {
        "input_tokens": done.prompt_tokens - done.cached_tokens,
        "output_tokens": done.completion_tokens,
        "cache_read_input_tokens": done.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


class ToolArgumentsError(Exception):
    """The engine produced a tool call whose arguments are not a JSON object."""


def tool_input(call: ToolCallEvent) -> dict:
    try:
        value = orjson.loads(call.arguments or "{}")
    except orjson.JSONDecodeError as exc:
        raise ToolArgumentsError(f"tool call {call.name!r}: arguments are not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ToolArgumentsError(f"tool call {call.name!r}: arguments are not a JSON object")
    return value


Event = tuple[str, dict]


class Reply:
    """One assistant message built from a turn's events.

    feed()/finish() return the stream events Anthropic sends for them (every
    content_block_start closed, indices 0, 1, 2..., a thinking block closed
    before the next block starts); `content` and message() give the same
    message unstreamed.
    """

    def __init__(self, model: str, message_id: str | None = None):
        self.model = model
        self.id = message_id or new_message_id()
        self.content: list[dict] = []
        self._open: dict | None = None  # the block being streamed

    def start(self) -> list[Event]:
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(None),
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def feed(self, event) -> list[Event]:
        match event:
            case TextDelta(text=text) if text:
                return self._append("text", "text", "text_delta", text)
            case ReasoningDelta(text=text) if text:
                return self._append("thinking", "thinking", "thinking_delta", text)
            case ToolCallEvent():
                return self._tool_call(event)
        return []

    def finish(self, done: TurnDone) -> list[Event]:
        """The closing events of a turn that ended normally (stop, length, tool calls)."""
        events = self._close()
        used_tools = any(b["type"] == "tool_use" for b in self.content)
        delta = {"stop_reason": stop_reason(done, used_tools), "stop_sequence": done.stop_sequence}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage(done)}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def message(self, done: TurnDone) -> dict:
        self._close()
        used_tools = any(b["type"] == "tool_use" for b in self.content)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.content,
            "stop_reason": stop_reason(done, used_tools),
            "stop_sequence": done.stop_sequence,
            "usage": usage(done),
        }

    # ------------------------------------------------------------ blocks

    def _begin(self, block: dict, shown: dict) -> list[Event]:
        events = self._close()
        self.content.append(block)
        self._open = block
        index = len(self.content) - 1
        return events + [("content_block_start", {"type": "content_block_start", "index": index, "content_block": shown})]

    def _delta(self, delta: dict) -> Event:
        return ("content_block_delta", {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta})

    def _append(self, kind: str, field: str, delta_type: str, text: str) -> list[Event]:
        events = []
        if self._open is None or self._open["type"] != kind:
            empty = {"type": kind, field: ""} if kind == "text" else {"type": kind, field: "", "signature": ""}
            events = self._begin(dict(empty), dict(empty))
        self._open[field] += text
        return events + [self._delta({"type": delta_type, field: text})]

    def _tool_call(self, call: ToolCallEvent) -> list[Event]:
        value = tool_input(call)
        block = {"type": "tool_use", "id": _tool_use_id(call.id), "name": call.name, "input": value}
        events = self._begin(block, {**block, "input": {}})
        arguments = orjson.dumps(value).decode()
        for i in range(0, len(arguments), JSON_PIECE_CHARS):
            events.append(self._delta({"type": "input_json_delta", "partial_json": arguments[i : i + JSON_PIECE_CHARS]}))
        return events + self._close()  # a parsed call is complete: nothing more comes for it

    def _close(self) -> list[Event]:
        block, self._open = self._open, None
        if block is None:
            return []
        events = []
        if block["type"] == "thinking":
            block["signature"] = _signature(block["thinking"])
            events.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": len(self.content) - 1}))
        return events
