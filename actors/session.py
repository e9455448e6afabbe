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
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class SaveNow:
    """Write the cache to disk now unless it is already there (shutdown, swap).
    Reply: True when the disk holds the session's current cache (or it has none)."""


class SessionActor(Actor):
    # on_stop saves the cache (hibernation, shutdown): a big cache takes a while to
    # write; the pool's ChildSpec gives the same budget.
    stop_timeout = 30.0

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
        # Tokens of the KV slice lent to the batch during a turn (the session's own
        # `cache` is None meanwhile): it still occupies memory, so it still counts.
        self._lent_tokens = 0
        # Write-behind: the tokens whose cache is known to be on disk, and the one
        # writer task (a newer turn while it writes is coalesced into its next write).
        self._saved_tokens: tuple[int, ...] = ()
        self._dirty = False
        self._writer: asyncio.Task | None = None

    @property
    def cache_nbytes(self) -> int:
        """KV bytes this session keeps in memory (at rest, or lent to a running turn)."""
        if self.in_turn and self.cache is None:
            return self._lent_tokens * self.loaded.kv_bytes_per_token
        return len(self.tokens) * self.loaded.kv_bytes_per_token if self.cache else 0

    @property
    def saved(self) -> bool:
        """Whether the disk already holds everything this session's cache holds."""
        return not self.cache or self.tokens == self._saved_tokens

    async def on_start(self) -> None:
        await self._restore()

    async def _restore(self) -> None:
        """Load the last saved cache; on any failure the agent simply starts cold."""
        if self.persistence is None:
            return
        try:
            restored = await self.persistence.restore(self.agent_id)
        except Exception as exc:  # e.g. the model actor is restarting
            log.warning("could not restore %s, starting cold: %s: %s", self.agent_id, type(exc).__name__, exc)
            return
        if restored is not None:
            self.cache, self.tokens = restored
            self._saved_tokens = self.tokens

    async def on_stop(self) -> None:
        # The write-behind task (if any) was cancelled with the actor; its file write,
        # once started, completes on the I/O thread. Save what is not on disk yet.
        await self._save_now()

    async def _save_now(self) -> bool:
        if self.persistence is None or self.saved:
            return True
        cache, tokens = self.cache, self.tokens
        if await self.persistence.save_now(self.agent_id, cache, tokens):
            self._saved_tokens = tokens
            return True
        return False

    def _save_later(self) -> None:
        """Write-behind after a turn: off the loop, coalesced, one writer at a time."""
        if self.persistence is None or self.saved:
            return
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = self.spawn(self._write_behind())

    async def _write_behind(self) -> None:
        while self._dirty:
            self._dirty = False
            if self.cache is None:
                return  # lent to a turn: the turn's end schedules the next write
            await self._save_now()  # captures cache and tokens before its first await

    async def handle(self, message: Any) -> Any:
        match message:
            case ChatTurn():
                self.in_turn = True
                try:
                    await self._turn(message)
                finally:
                    self.in_turn = False
                    self._lent_tokens = 0
                    self.last_used = time.time()
            case SaveNow():
                return await self._save_now()
            case _:
                raise TypeError(f"session cannot handle {type(message).__name__}")

    # ------------------------------------------------------------ a turn

    async def _turn(self, turn: ChatTurn) -> None:
        tokenizer = self.loaded.tokenizer
        try:
            prompt = await asyncio.to_thread(
                tokenizer.apply_chat_template, list(turn.request.messages), add_generation_prompt=True
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
                    prompt_tokens=len(prompt),
                    limit=limit,
                )
            )
            return
        max_tokens = min(turn.request.params.max_tokens or self.default_max_tokens, limit - len(prompt))

        cached = common_prefix_len(self.tokens, prompt) if self.cache else 0
        if cached == len(prompt):
            cached -= 1  # the model must see at least one token to produce logits
        kept, kept_tokens = self.cache, self.tokens
        cache = kept if cached > 0 else None  # nothing in common: the batch starts a fresh slice
        if cache is not None:
            for layer in cache:
                layer.trim(layer.offset - cached)
            kept, kept_tokens = cache, tuple(prompt[:cached])
        # The slice now belongs to the batch until SequenceEnded gives it back.
        self.cache, self.tokens = None, ()
        self._lent_tokens = len(prompt)

        turn_id = next(_turn_ids)
        submit = SubmitTurn(
            turn_id=turn_id,
            agent_id=self.agent_id,
            suffix=tuple(prompt[cached:]),
            cache=cache,
            cached=tuple(prompt[:cached]),
            params=turn.request.params,
            max_tokens=max_tokens,
            sink=turn.inbox,
        )
        try:
            self.scheduler.tell(submit)
        except ActorError as exc:
            self.cache, self.tokens = kept, kept_tokens
            turn.events.put_nowait(TurnRejected(503, f"server busy: {exc}", "server_busy"))
            return
        ended = await self._stream(turn, submit)
        self.cache, self.tokens = ended.cache, ended.tokens
        if not ended.cache:
            # The batch's copy died with a failed model step: fall back to the last save.
            self.cache, self.tokens = None, ()
            await self._restore()
        self.turns += 1
        self._save_later()

    async def _stream(self, turn: ChatTurn, submit: SubmitTurn) -> SequenceEnded:
        turn_id = submit.turn_id
        tokenizer = self.loaded.tokenizer
        eos = tokenizer.eos_token_ids
        detok = copy.copy(tokenizer.detokenizer)  # shares the token map, own state
        detok.reset()
        stops = StopMatcher(turn.request.params.stop)
        generated = 0
        stopped_by_string = False
        while True:
            event = await turn.inbox.get()
            match event:
                case TokenOut(token=token):
                    generated += 1
                    self._lent_tokens += 1
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
                # Ended by the server (drain deadline, shutdown) rather than the client.
                finish_reason="abort" if status is TurnStatus.FINISHED_ABORTED and ended.error else _FINISH_REASON[status],
                prompt_tokens=cached + len(submit.suffix),
                completion_tokens=generated,
                cached_tokens=cached,
                prefilled_tokens=max(0, len(ended.tokens) - generated - cached),
                model=self.loaded.name,
                error=ended.error,
            )
        )
        return ended
