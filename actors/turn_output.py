"""From a turn's generated tokens to the events its client sees.

tokens -> streaming detokenizer -> stop strings (StopMatcher) -> content /
reasoning / tool-call split (actors/output.py OutputParser) -> TextDelta,
ReasoningDelta, ToolCallEvent. Logprobs of the tokens ride on the next TextDelta
that carries their text.
"""

from __future__ import annotations

import copy

from actors.messages import TextDelta, TokenLogprob, TokenOut
from actors.output import OutputParser


class StopMatcher:
    """Finds stop strings in streamed text, holding back a possible partial match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.hit: str | None = None  # the stop string found

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        text = self.held + text
        self.held = ""
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            at, self.hit = min(hits)
            return text[:at], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if s.startswith(text[-k:]):
                    keep = k
                    break
        if keep:
            self.held = text[-keep:]
            text = text[:-keep]
        return text, False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class TurnOutput:
    """One turn's output state. `add(token_out)` returns the events it completes and
    whether a stop string ended the turn; `finish()` returns the rest."""

    def __init__(self, tokenizer, stops: tuple[str, ...], parser: OutputParser | None, logprobs: bool):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_ids
        self.detok = copy.copy(tokenizer.detokenizer)  # shares the token map, own state
        self.detok.reset()
        self.stops = StopMatcher(stops)
        self.parser = parser  # None: plain text (/v1/completions)
        self.want_logprobs = logprobs
        self._logprobs: list[TokenLogprob] = []
        self.stopped = False  # by a stop string

    @property
    def stop_sequence(self) -> str | None:
        return self.stops.hit

    @property
    def has_tool_calls(self) -> bool:
        return self.parser is not None and self.parser.has_tool_calls

    def add(self, out: TokenOut) -> list:
        if self.stopped or out.token in self.eos:
            return []
        if self.want_logprobs and out.logprob is not None:
            self._logprobs.append(self._token_logprob(out))
        self.detok.add_token(out.token)
        text, hit = self.stops.feed(self.detok.last_segment)
        self.stopped = hit
        return self._parse(text)

    def finish(self) -> list:
        text = ""
        if not self.stopped:
            self.detok.finalize()
            text, _ = self.stops.feed(self.detok.last_segment)
            text += self.stops.flush()
        events = self._parse(text)
        if self.parser is not None:
            events += self._with_logprobs(self.parser.finish())
        if self._logprobs:
            events.append(TextDelta("", tuple(self._logprobs)))
            self._logprobs = []
        return events

    def _parse(self, text: str) -> list:
        if not text:
            return []
        events = self.parser.feed(text) if self.parser is not None else [TextDelta(text)]
        return self._with_logprobs(events)

    def _with_logprobs(self, events: list) -> list:
        if not self._logprobs:
            return events
        for i, event in enumerate(events):
            if isinstance(event, TextDelta):
                events[i] = TextDelta(event.text, tuple(self._logprobs))
                self._logprobs = []
                break
        return events

    def _token_logprob(self, out: TokenOut) -> TokenLogprob:
        def text(token: int) -> str:
            return self.tokenizer.decode([token])

        def entry(token: int, logprob: float):
            t = text(token)
            return (t, logprob, tuple(t.encode()))

        t = text(out.token)
        return TokenLogprob(t, out.logprob, tuple(t.encode()), tuple(entry(i, lp) for i, lp in out.top))
