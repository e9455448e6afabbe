"""AgentSession: one actor per agent id, owning that agent's KV cache slice.

A turn (actors/turn.py): render the prompt and compile its grammar (off the
loop), find the longest common prefix with the tokens the cache holds, trim the
cache to it, lend it to the turn and hand the turn to the scheduler, which from
then on owns it and ends it. The turn's tokens go from the scheduler straight
to its client (detokenized and parsed in actors/turn_output.py); when it ends
its cache comes back here and a write-behind save to disk is scheduled. Turns
of one agent run one at a time (the mailbox orders them); different agents run
concurrently in the scheduler's batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from actors.branches import Branches
from actors.constraint import ConstraintError
from actors.messages import ChatRequest, TurnRejected
from actors.output import OutputParser
from actors.prefix_pool import PrefixPool
from actors.prompt import PromptError, Rendered, render, render_text_prompt, tool_format
from actors.scheduler import SubmitTurn
from actors.turn import Ended, Turn
from actors.turn_output import TurnOutput
from actors.sampling import resolve as resolve_sampling
from runtime.actor import Actor, ActorError, ActorStopped

log = logging.getLogger("greenroom.session")

# How long the scheduler may take to accept a turn (it only queues it).
SUBMIT_TIMEOUT_S = 10.0
# How often a session waiting for its turn's end checks that the scheduler lives.
OWNER_CHECK_S = 1.0


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
        prefixes: PrefixPool,
        scope: str = "",  # agents in one scope share cached prefixes
        persistence: Any = None,  # actors.pool.Persistence or None for ephemeral sessions
        io: Any = None,  # executor for copying KV (never the event loop)
        on_filed: Any = None,  # called when a turn's cache is filed (the pool checks its budget)
        default_max_tokens: int = 2048,
        max_branches: int = 4,
        mailbox_size: int = 16,
    ):
        super().__init__(f"session:{agent_id}", mailbox_size=mailbox_size)
        self.agent_id = agent_id
        self.scheduler = scheduler
        self.loaded = loaded
        self.persistence = persistence
        self.io = io
        self.on_filed = on_filed
        self.default_max_tokens = default_max_tokens
        self.branches = Branches(prefixes, scope, max_branches)
        self.last_used = time.time()
        self.turns = 0
        self.in_turn = False
        # Tokens of the running turn's own copy of its KV (in the batch): it occupies
        # memory too, so it counts against the budget while the turn runs.
        self._lent_tokens = 0
        # Write-behind: the version of the branches on disk, and the one writer task
        # (a newer turn while it writes is coalesced into its next write).
        self._version = 0
        self._saved_version = 0
        self._dirty = False
        self._writer: asyncio.Task | None = None

    @property
    def tokens(self) -> tuple[int, ...]:
        """The most recently used branch's tokens."""
        return self.branches.tokens

    @property
    def cache(self) -> bool:
        """Whether the session holds any cached branch."""
        return bool(self.branches.items)

    @property
    def cache_nbytes(self) -> int:
        """KV bytes this session alone keeps in memory: its branches' private tails and a
        running turn's copy. Pool blocks are counted once, by the pool."""
        return self.branches.nbytes + self._lent_tokens * self.loaded.kv_bytes_per_token

    @property
    def saved(self) -> bool:
        """Whether the disk already holds everything this session's branches hold."""
        return not self.cache or self._saved_version == self._version

    async def on_start(self) -> None:
        await self._restore()

    async def _restore(self) -> None:
        """Load the saved branches; on any failure the agent simply starts cold."""
        if self.persistence is None:
            return
        try:
            restored = await self.persistence.restore(self.agent_id, self.branches)
        except Exception as exc:
            log.warning("could not restore %s, starting cold: %s: %s", self.agent_id, type(exc).__name__, exc)
            return
        for branch in reversed(restored or []):
            self.branches.keep(branch)

    async def on_stop(self) -> None:
        # The write-behind task (if any) was cancelled with the actor; its file write,
        # once started, completes on the I/O thread. Save what is not on disk yet.
        try:
            await self._save_now()
        finally:
            self.branches.clear()  # the pool may drop their blocks now

    async def _save_now(self) -> bool:
        if self.persistence is None or self.saved:
            return True
        version, began = self._version, time.perf_counter()
        if await self.persistence.save_now(self.agent_id, tuple(self.branches.items)):
            log.debug("%s: saved in %.3fs", self.agent_id, time.perf_counter() - began)
            self._saved_version = max(self._saved_version, version)
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
            await self._save_now()  # captures the branches before its first await

    async def handle(self, message: Any) -> Any:
        match message:
            case Turn():
                self.in_turn = True
                try:
                    await self._turn(message)
                except Exception as exc:
                    # Whatever went wrong, the client gets its final event and the
                    # session serves on (its branches were never lent out).
                    log.exception("turn %d of %s failed", message.id, self.agent_id)
                    message.fail(f"internal error: {type(exc).__name__}: {exc}")
                finally:
                    self.in_turn = False
                    self._lent_tokens = 0
                    self.last_used = time.time()
            case SaveNow():
                return await self._save_now()
            case _:
                raise TypeError(f"session cannot handle {type(message).__name__}")

    # ------------------------------------------------------------ a turn

    async def _turn(self, turn: Turn) -> None:
        if turn.finished:
            return  # the client left while the turn waited in the mailbox
        began = time.perf_counter()
        try:
            prepared = await asyncio.to_thread(prepare_turn, self.loaded, turn.request)
        except (PromptError, ConstraintError) as exc:  # the client's messages, tools or schemas
            turn.reject(TurnRejected(400, str(exc)))
            return
        prompt = tuple(prepared.rendered.tokens)
        if not prompt:  # an empty completion prompt: nothing to prefill, nothing to condition on
            turn.reject(TurnRejected(400, "the prompt is empty"))
            return
        limit = self.loaded.context_length
        if len(prompt) >= limit:
            turn.reject(
                TurnRejected(
                    400,
                    f"the prompt is {len(prompt)} tokens; this model's context is {limit} tokens",
                    "context_length_exceeded",
                    prompt_tokens=len(prompt),
                    limit=limit,
                )
            )
            return
        params = resolve_sampling(turn.request.params, self.loaded.generation_defaults)
        start = self.branches.start_for(prompt)
        turn.pinned = start.pinned  # the scheduler may swap these for a longer shared prefix
        try:
            turn.prompt, turn.cached, turn.cache = prompt, prompt[: start.cached], start.pieces
            turn.keys = self.branches.keys(prompt)
            turn.scope = self.branches.scope
            turn.params = params
            turn.max_tokens = min(params.max_tokens or self.default_max_tokens, limit - len(prompt))
            turn.constraint = prepared.constraint
            turn.model_name = self.loaded.name
            turn.output = TurnOutput(self.loaded.tokenizer, params.stop, prepared.parser, params.logprobs is not None)
            self._lent_tokens = len(prompt)
            log.debug("%s: turn %d prepared in %.3fs: %d tokens, %d cached", self.agent_id, turn.id,
                      time.perf_counter() - began, len(prompt), start.cached)
            owner, reason = await self._submit(turn)
            if owner is None:
                turn.reject(TurnRejected(503, reason, "server_busy"))
                return
            ended = await self._wait(turn, owner)
        finally:
            self.branches.pool.release(turn.pinned)
            turn.pinned = ()
        self.turns += 1
        if ended.cache:
            self._lent_tokens = len(ended.tokens)
            began = time.perf_counter()
            branch = await self.branches.from_cache(ended.cache, ended.tokens, self.io)
            log.debug("%s: turn %d filed in %.3fs", self.agent_id, turn.id, time.perf_counter() - began)
            self.branches.keep(branch)
            self._lent_tokens = 0
            self._version += 1
            self._save_later()
            if self.on_filed is not None:
                self.on_filed()

    async def _submit(self, turn: Turn):
        """Hand the turn to the scheduler: (the scheduler actor that took it, None), or
        (None, why not). A scheduler that is restarting is waited for, within a bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SUBMIT_TIMEOUT_S
        while True:
            owner = self.scheduler.actor
            try:
                if await self.scheduler.ask(SubmitTurn(turn), timeout=max(0.1, deadline - loop.time())):
                    return owner, None
                return None, "the turn was cancelled before it started"
            except ActorStopped as exc:  # between incarnations: the ref rebinds when it is up
                if loop.time() >= deadline or turn.finished:
                    return None, f"server busy: {exc}"
                await asyncio.sleep(0.05)
            except ActorError as exc:  # too busy to answer, or its mailbox is full
                return None, f"server busy: {exc}"

    async def _wait(self, turn: Turn, owner) -> Ended:
        """The turn's end. Its scheduler ends it whatever happens; should that actor
        die without doing so, the turn is failed here, so nothing waits forever."""
        while True:
            try:
                async with asyncio.timeout(OWNER_CHECK_S):
                    return await turn.wait_ended()
            except TimeoutError:
                if not owner.alive:
                    turn.fail("the scheduler stopped mid-turn; retry the request")


@dataclass(frozen=True, slots=True)
class PreparedTurn:
    rendered: Rendered
    constraint: Any  # actors.constraint.Constraint or None
    parser: OutputParser | None  # None: plain text (/v1/completions)


def prepare_turn(loaded, request: ChatRequest) -> PreparedTurn:
    """Render the prompt, compile the grammar, set up the output parser. Blocking
    (tokenizing, llguidance): runs on a worker thread, never on the event loop."""
    tokenizer = loaded.tokenizer
    if request.prompt is not None:
        return PreparedTurn(render_text_prompt(tokenizer, request.prompt), None, None)
    fmt = tool_format(tokenizer)
    grammar = loaded.constraints.grammar_for(request, fmt.start, fmt.end)
    if grammar is not None and request.thinking is None and tokenizer.has_thinking:
        # A grammar starts at the first generated token: no thinking block first.
        request = replace(request, thinking=False)
    rendered = render(tokenizer, request)
    constraint = loaded.constraints.compile(grammar) if grammar is not None else None
    calls_forced = grammar is not None and bool(request.tools) and request.tool_choice != "none"
    parser = OutputParser(tokenizer, rendered, request.tools, forced_json=calls_forced)
    return PreparedTurn(rendered, constraint, parser)
