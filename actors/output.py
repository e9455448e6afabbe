"""Splitting a turn's generated text into content, reasoning and tool-call events.

mlx-lm's TextStateMachine finds the think and tool-call markers in the decoded text
(even split across chunks) and strips them; each complete call goes through the
model format's mlx-lm parser. Pure: feed it text, get events.

Contract (what a client sees):
- Text outside think blocks and calls is content (TextDelta), in order.
- Text inside a think block is reasoning (ReasoningDelta), never content. Whitespace
  at the edges of a think block is dropped, and so is whitespace between a think
  block or a call and the content next to it ("<think>\\nx\\n</think>\\n\\nAnswer"
  gives reasoning "x" and content "Answer").
- Each parsed call is a ToolCallEvent (index 0, 1, ... in the turn, id
  "call_<24 hex>", arguments a compact JSON object). Markup never reaches content,
  except: a call whose text does not parse (or has no name, or arguments that are
  not an object) is returned as content, markers included, rather than dropped, so
  the client sees what the model wrote. A call still open when the turn ends is
  parsed as it stands (as mlx_lm.server does); if that fails (the turn was cut off
  inside it), it is dropped: half a call is no use as text.
- Feeding the text in any chunks gives the same result as feeding it at once (the
  events' texts concatenate to the same strings, the calls are the same).
Stop strings are not handled here (actors/turn_output.py StopMatcher).
"""

from __future__ import annotations

import json
import secrets
from types import SimpleNamespace

from mlx_lm.generate import TextStateMachine, make_text_state_machine

from actors.messages import ReasoningDelta, TextDelta, Tool, ToolCallEvent
from actors.prompt import Rendered, openai_tools


class _Channel:
    """Text of one kind, streamed, with whitespace next to markup dropped: trailing
    whitespace is held until more text of the same block follows."""

    def __init__(self, event, strip_start: bool):
        self._event = event
        self._fresh = strip_start  # at the start of a block whose leading whitespace goes
        self._held = ""

    def add(self, text: str) -> list:
        text = self._held + text
        if self._fresh:
            text = text.lstrip()
        body = text.rstrip()
        self._held = text[len(body) :]
        if not body:
            return []
        self._fresh = False
        return [self._event(body)]

    def cut(self) -> tuple[str, bool]:
        """Markup follows: the block ends here, its trailing whitespace goes. Returns
        what `undo_cut` needs if the markup turns out to be text after all."""
        before = (self._held, self._fresh)
        self._held = ""
        self._fresh = True
        return before

    def undo_cut(self, before: tuple[str, bool]) -> None:
        self._held, self._fresh = before

    def end(self) -> list:
        held, self._held = self._held, ""
        return [self._event(held)] if held else []


class OutputParser:
    """Events of one turn's output. `tools`: the tools offered (calls are looked for
    only when the prompt offered some, or `forced_json`). `forced_json`: a grammar
    forces each call to `start + "\\n" + {"name", "arguments"} JSON + "\\n" + end`,
    so calls are parsed as JSON whatever the model's own format."""

    def __init__(
        self,
        tokenizer,
        rendered: Rendered,
        tools: tuple[Tool, ...] = (),
        forced_json: bool = False,
    ):
        from mlx_lm.tool_parsers import json_tools

        fmt = rendered.tool_format
        self._parse = json_tools.parse_tool_call if forced_json else fmt.parse
        self._start, self._end = fmt.start, fmt.end
        self._tools = openai_tools(tools) or None
        detect = forced_json or rendered.offers_tools
        machine = make_text_state_machine(_markers(tokenizer, fmt, detect))
        initial = tokenizer.response_initial_state or (
            "reasoning" if rendered.starts_in_reasoning else "normal"
        )
        self._state = machine.make_state(initial)
        self._where = initial
        self._content = _Channel(TextDelta, strip_start=False)
        self._reasoning = _Channel(ReasoningDelta, strip_start=True)
        self._call_text = ""
        self._calls = 0
        self._content_before_call = ("", False)  # restored if the call is only text

    @property
    def has_tool_calls(self) -> bool:
        """At least one call was returned: the turn's finish reason is "tool_calls"."""
        return self._calls > 0

    def feed(self, text: str) -> list:
        self._state, segments = TextStateMachine.split(self._state, text)
        return _merged(self._consume(segments))

    def finish(self) -> list:
        """The end of the turn: flush held text, parse a call left open."""
        self._state, rest, where = TextStateMachine.flush(self._state)
        events = self._consume([(where, rest)])
        if self._where == "tool":
            events += self._close_call(closed=False)
        events += self._content.end()
        return _merged(events)

    # ---------------------------------------------------------------- internals

    def _consume(self, segments) -> list:
        events: list = []
        for where, text in segments:
            if where != self._where:
                events += self._leave(self._where)
                self._where = where
            if where == "normal":
                events += self._content.add(text)
            elif where == "reasoning":
                events += self._reasoning.add(text)
            elif where == "tool":
                self._call_text += text
            # Other states of mlx-lm response formats (headers) carry no output.
        return events

    def _leave(self, where: str) -> list:
        if where == "normal":
            self._content_before_call = self._content.cut()
        elif where == "reasoning":
            self._reasoning.cut()
            self._content.cut()  # the answer after a think block starts fresh
        elif where == "tool":
            return self._close_call(closed=True)
        return []

    def _close_call(self, closed: bool) -> list:
        text, self._call_text = self._call_text, ""
        calls = self._parsed(text)
        if calls is None and not closed:
            # Cut off (max_tokens) inside a call: half a call is neither a call nor text
            # the client can use; the finish reason ("length") says what happened.
            self._content.undo_cut(self._content_before_call)
            return []
        if calls is None:
            raw = self._start + text + self._end
            self._content.undo_cut(self._content_before_call)
            return self._content.add(raw)
        events = []
        for name, arguments in calls:
            events.append(ToolCallEvent(self._calls, _call_id(), name, arguments))
            self._calls += 1
        self._content.cut()
        return events

    def _parsed(self, text: str) -> list[tuple[str, str]] | None:
        """(name, arguments JSON) of each call in `text`, or None if any is malformed."""
        try:
            parsed = self._parse(text, self._tools)
        except Exception:  # each mlx-lm parser fails in its own way on bad text
            return None
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = [_call(item) for item in items]
        if not calls or any(c is None for c in calls):
            return None
        return calls


def _call(item) -> tuple[str, str] | None:
    if not isinstance(item, dict):
        return None
    name = item.get("name")
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _markers(tokenizer, fmt, detect_calls: bool) -> SimpleNamespace:
    """What make_text_state_machine reads from a tokenizer, with the call markers of
    the format the prompt asked for (the Hermes fallback's may not be the tokenizer's)."""
    return SimpleNamespace(
        has_thinking=tokenizer.has_thinking,
        think_start=tokenizer.think_start,
        think_end=tokenizer.think_end,
        has_tool_calling=detect_calls,
        tool_call_start=fmt.start,
        tool_call_end=fmt.end,
        structural_markers=tokenizer.structural_markers,
        response_transitions=tokenizer.response_transitions,
    )


def _merged(events: list) -> list:
    """Adjacent deltas of one kind as one event."""
    out: list = []
    for event in events:
        last = out[-1] if out else None
        if type(event) in (TextDelta, ReasoningDelta) and type(last) is type(event):
            out[-1] = type(event)(last.text + event.text)
        else:
            out.append(event)
    return out
