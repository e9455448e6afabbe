"""AgentSession: one actor per agent id, owning that agent's KV cache slice.

A turn: render the chat template, tokenize (off the loop), find the longest
common prefix with the tokens the cache holds, trim the cache to it and submit
only the rest to the scheduler. Tokens come back one by one; the session
detokenizes them, applies stop strings and forwards text to the gateway. When
the sequence ends its cache slice comes back here and a write-behind save to
disk is scheduled. Turns of one agent run one at a time (the mailbox orders
them); different agents run concurrently in the scheduler's batch.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import time
from typing import Any

from actors.messages import (
    CancelRequested,
    CancelTurn,
    ChatTurn,
    SequenceEnded,
    SubmitTurn,
    TextDelta,
    TokenOut,
    TurnDone,
    TurnRejected,
    TurnStatus,
)
from runtime.actor import Actor, ActorError

log = logging.getLogger("greenroom.session")

_turn_ids = itertools.count(1)
_FINISH_REASON = {
    TurnStatus.FINISHED_STOPPED: "stop",
    TurnStatus.FINISHED_LENGTH: "length",
    TurnStatus.FINISHED_ABORTED: "cancelled",
    TurnStatus.FINISHED_ERROR: "error",
}


def common_prefix_len(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class StopMatcher:
    """Finds stop strings in streamed text, holding back a possible partial match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        text = self.held + text
        self.held = ""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return text[: min(hits)], True
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


class SessionActor(Actor):
    def __init__(
        self,
        agent_id: str,
        *,
        scheduler: Any,  # ActorRef
        loaded: Any,  # LoadedModel (tokenizer, tag, limits)
        persistence: Any = None,  # actors.pool.Persistence or None for ephemeral sessions
        default_max_tokens: int = 2048,
        mailbox_size: int = 16,
    ):
        super().__init__(f"session:{agent_id}", mailbox_size=mailbox_size)
        self.agent_id = agent_id
        self.scheduler = scheduler
        self.loaded = loaded
        self.persistence = persistence
        self.default_max_tokens = default_max_tokens
        self.cache: list | None = None
        self.tokens: tuple[int, ...] = ()
        self.last_used = time.time()
        self.turns = 0
        self.in_turn = False

    @property
    def cache_nbytes(self) -> int:
        return len(self.tokens) * self.loaded.kv_bytes_per_token if self.cache else 0

    async def on_start(self) -> None:
        if self.persistence is not None:
            restored = await self.persistence.restore(self.agent_id)
            if restored is not None:
                self.cache, self.tokens = restored

    async def on_stop(self) -> None:
        if self.persistence is not None and self.cache:
            await self.persistence.save_now(self.agent_id, self.cache, self.tokens)

    async def handle(self, message: Any) -> Any:
        match message:
            case ChatTurn():
                self.in_turn = True
                try:
                    await self._turn(message)
                finally:
                    self.in_turn = False
                    self.last_used = time.time()
            case _:
                raise TypeError(f"session cannot handle {type(message).__name__}")

    # ------------------------------------------------------------ a turn

    async def _turn(self, turn: ChatTurn) -> None:
        tokenizer = self.loaded.tokenizer
        try:
            prompt = await asyncio.to_thread(
                tokenizer.apply_chat_template, list(turn.messages), add_generation_prompt=True
            )
        except Exception as exc:  # template errors are the client's messages' fault
            turn.events.put_nowait(TurnRejected(400, f"could not apply the chat template: {exc}"))
            return
        limit = self.loaded.context_length
        if len(prompt) >= limit:
            turn.events.put_nowait(
                TurnRejected(
                    400,
                    f"the prompt is {len(prompt)} tokens; this model's context is {limit} tokens",
                    "context_length_exceeded",
                )
            )
            return
        max_tokens = min(turn.params.max_tokens or self.default_max_tokens, limit - len(prompt))

        cached = common_prefix_len(self.tokens, prompt) if self.cache else 0
        if cached == len(prompt):
            cached -= 1  # the model must see at least one token to produce logits
        cache = self.cache
        if cache is not None:
            for layer in cache:
                layer.trim(layer.offset - cached)
        # The slice now belongs to the batch until SequenceEnded gives it back.
        self.cache, self.tokens = None, ()

        turn_id = next(_turn_ids)
        submit = SubmitTurn(
            turn_id=turn_id,
            agent_id=self.agent_id,
            suffix=tuple(prompt[cached:]),
            cache=cache,
            cached=tuple(prompt[:cached]),
            params=turn.params,
            max_tokens=max_tokens,
            sink=turn.inbox,
        )
        try:
            self.scheduler.tell(submit)
        except ActorError as exc:
            self.cache, self.tokens = cache, tuple(prompt[:cached])
            turn.events.put_nowait(TurnRejected(503, f"server busy: {exc}", "server_busy"))
            return
        ended = await self._stream(turn, submit)
        self.cache, self.tokens = ended.cache, ended.tokens
        if not ended.cache:
            self.cache, self.tokens = None, ()
        self.turns += 1
        if self.persistence is not None and self.cache:
            self.persistence.save_later(self, self.cache, self.tokens)

    async def _stream(self, turn: ChatTurn, submit: SubmitTurn) -> SequenceEnded:
        turn_id = submit.turn_id
        tokenizer = self.loaded.tokenizer
        eos = tokenizer.eos_token_ids
        detok = copy.copy(tokenizer.detokenizer)  # shares the token map, own state
        detok.reset()
        stops = StopMatcher(turn.params.stop)
        generated = 0
        stopped_by_string = False
        while True:
            event = await turn.inbox.get()
            match event:
                case TokenOut(token=token):
                    generated += 1
                    if stopped_by_string or token in eos:
                        continue
                    detok.add_token(token)
                    text, hit = stops.feed(detok.last_segment)
                    if text:
                        turn.events.put_nowait(TextDelta(text))
                    if hit:
                        stopped_by_string = True
                        self.scheduler.tell(CancelTurn(turn_id))
                case CancelRequested():
                    self.scheduler.tell(CancelTurn(turn_id))
                case SequenceEnded() as ended:
                    break
        if not stopped_by_string:
            detok.finalize()
            text, _ = stops.feed(detok.last_segment)
            text += stops.flush()
            if text:
                turn.events.put_nowait(TextDelta(text))
        status = TurnStatus.FINISHED_STOPPED if stopped_by_string else ended.status
        cached = len(submit.cached)
        turn.events.put_nowait(
            TurnDone(
                finish_reason=_FINISH_REASON[status],
                prompt_tokens=cached + len(submit.suffix),
                completion_tokens=generated,
                cached_tokens=cached,
                prefilled_tokens=max(0, len(ended.tokens) - generated - cached),
                model=self.loaded.name,
                error=ended.error,
            )
        )
        return ended
