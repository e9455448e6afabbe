"""SchedulerActor: the batching policy (who joins, who leaves, how much each prefills).

Sessions submit Turns (actors/turn.py); the scheduler holds each one from then
until it ends: a FIFO of waiting turns and a set of running ones. Its step loop
builds one StepPlan per tick (cancelled turns leave, waiting turns join up to
`max_batch`, prefilling turns get chunks planned by the prefill budget,
turns whose client reads too slowly are paused), asks the model actor to execute
it, and hands each generated token to its turn. Joins and leaves only happen
between steps; one agent's long prompt costs the others about one chunk of
compute per step rather than the whole prefill.

Whatever ends a turn here (done, cancel, abort, failed or timed-out step,
scheduler stop) finishes it, so its client always gets a final event.

Fairness: admission is strictly first come, first served, and every running
turn is bounded by its max_tokens, so a waiting turn is admitted within a
bounded number of steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from actors.messages import AbortAll, Crash, ExecuteStep, SeqInsert, StepPlan, StepResult, TurnStatus
from actors.branches import take
from actors.kvblocks import KVPieces
from actors.prefill_budget import PrefillBudget, Prefilling, rows_and_area
from actors.prefix_pool import BLOCK_TOKENS, PrefixPool
from actors.turn import Turn
from runtime.actor import Actor
from runtime.metrics import Registry

log = logging.getLogger("greenroom.scheduler")

_MODEL_WAIT_S = 0.1
# Agents that start together (a burst) reach the scheduler a few ms apart: each
# request is parsed, activated and tokenized in turn. When the model is idle the
# first step waits this long, so the burst prefills as one batch instead of the
# late-comers running a chunk behind (measured: two agents starting together got
# their first token after 12.3 s without it, 10.2 s with it). A lone request pays this once.
BURST_WINDOW_S = 0.03
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True, slots=True)
class SubmitTurn:
    """Take this turn (an ask: once it returns True, the scheduler owns the turn)."""

    turn: Turn


@dataclass(frozen=True, slots=True)
class GetSchedulerStats:
    """Reply: SchedulerStats."""


@dataclass(frozen=True, slots=True)
class SetAdmission:
    """Pause (drain) or resume admission of waiting turns."""

    open: bool


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    running: int
    waiting: int
    admitting: bool
    steps: int


class SchedulerMetrics:
    def __init__(self, registry: Registry, max_batch: int):
        r = registry
        self.running = r.gauge("greenroom_running_sequences", "Sequences in the running batch")
        self.waiting = r.gauge("greenroom_waiting_sequences", "Turns waiting for a batch slot")
        self.batch_size = r.histogram(
            "greenroom_batch_size", "Sequences per model step",
            tuple(float(b) for b in range(1, max_batch + 1)),
        )
        self.prefill_tokens = r.counter("greenroom_prefill_tokens_total", "Prompt tokens prefilled")
        self.decode_tokens = r.counter("greenroom_decode_tokens_total", "Tokens generated")
        self.step_seconds = r.counter("greenroom_step_seconds_total", "Time spent in model steps")
        self.prefill_tps = r.gauge("greenroom_prefill_tokens_per_second", "Prefill rate, last steps")
        self.decode_tps = r.gauge("greenroom_decode_tokens_per_second", "Decode rate, last steps")
        self.ttft = r.histogram(
            "greenroom_time_to_first_token_seconds", "Submit to first token", _LATENCY_BUCKETS
        )
        self.queue_wait = r.histogram(
            "greenroom_queue_wait_seconds", "Submit to admission into the batch", _LATENCY_BUCKETS
        )
        self.finished = r.counter("greenroom_turns_finished_total", "Turns that ended")

    def observe_step(self, result: StepResult, batch: int) -> None:
        self.batch_size.observe(batch)
        self.prefill_tokens.inc(result.prefill_tokens)
        self.decode_tokens.inc(result.decode_tokens)
        self.step_seconds.inc(result.seconds)
        if result.seconds > 0:
            # Exponential smoothing over roughly the last ten steps.
            for gauge, n in ((self.prefill_tps, result.prefill_tokens), (self.decode_tps, result.decode_tokens)):
                gauge.set(0.9 * gauge.value + 0.1 * n / result.seconds)


class SchedulerActor(Actor):
    def __init__(
        self,
        model: Any,  # ActorRef of the model actor
        *,
        max_batch: int = 8,
        prefill_chunk: int = 256,
        step_timeout: float = 120.0,
        registry: Registry | None = None,
        prefixes: PrefixPool | None = None,
        name: str = "scheduler",
    ):
        super().__init__(name, mailbox_size=1024)
        self.model = model
        self.prefixes = prefixes
        self.max_batch = max_batch
        self.budget = PrefillBudget(prefill_chunk)
        self._planned_prefill: tuple[float, float] | None = None  # (rows, area) for the fit
        self.step_timeout = step_timeout
        self.metrics = SchedulerMetrics(registry or Registry(), max_batch)
        self.waiting: deque[Turn] = deque()
        self.running: dict[int, Turn] = {}
        self.admitting = True
        self.steps = 0
        self._wakeup = asyncio.Event()
        # After a step timed out, the model thread may still be in it: no new step
        # until the model confirms it dropped that batch.
        self._model_dirty = False

    async def on_start(self) -> None:
        if self.model.actor.alive:
            # After a scheduler restart the engine may still hold the old batch.
            try:
                dropped = await self.model.ask(AbortAll("scheduler restarted"), timeout=self.step_timeout)
            except Exception as exc:
                log.warning("could not clear the model's batch: %s: %s", type(exc).__name__, exc)
                self._model_dirty = True
            else:
                if dropped:
                    log.warning("dropped %d sequences of the previous scheduler", dropped)
        self.spawn(self._step_loop())

    async def on_stop(self) -> None:
        # Turns still here never reach the model again: end them so no client hangs.
        # (A session's branches are never lent to a turn: nothing is lost at rest.)
        for turn in self.waiting:
            turn.cancel("the scheduler restarted; retry the request")
            turn.finish(TurnStatus.FINISHED_ABORTED, None, ())
        for turn in self.running.values():
            turn.fail("the scheduler restarted mid-turn; retry the request")
        self.waiting.clear()
        self.running.clear()

    async def handle(self, message: Any) -> Any:
        match message:
            case SubmitTurn(turn=turn):
                if turn.finished:
                    return False
                turn.submitted = time.perf_counter()
                turn.on_cancel = self._wakeup.set
                self.waiting.append(turn)
                reply = True
            case AbortAll(reason=reason):
                self._abort_all(reason)
                reply = None
            case SetAdmission(open=is_open):
                self.admitting = is_open
                reply = None
            case Crash(reason=reason):
                raise RuntimeError(f"crash requested: {reason}")
            case GetSchedulerStats():
                return SchedulerStats(len(self.running), len(self.waiting), self.admitting, self.steps)
            case _:
                raise TypeError(f"scheduler cannot handle {type(message).__name__}")
        self._update_gauges()
        self._wakeup.set()
        return reply

    def _abort_all(self, reason: str) -> None:
        for turn in [*self.waiting, *self.running.values()]:
            turn.cancel(reason)
        self._sweep_waiting()

    def _sweep_waiting(self) -> None:
        """Waiting turns that were cancelled end now, with their cache back."""
        if not any(t.cancel_requested or t.finished for t in self.waiting):
            return
        keep = deque()
        for turn in self.waiting:
            if turn.cancel_requested or turn.finished:
                turn.finish(TurnStatus.FINISHED_ABORTED, None, ())
            else:
                keep.append(turn)
        self.waiting = keep
        self._update_gauges()

    # ------------------------------------------------------------ the loop

    def _has_work(self) -> bool:
        return bool(self.running) or (self.admitting and bool(self.waiting))

    async def _step_loop(self) -> None:
        while True:
            _still_cancellable()  # a stop's cancel swallowed by an await below ends the loop here
            self._sweep_waiting()
            if not self._has_work():
                self._wakeup.clear()
                await self._wakeup.wait()
                if not self.running:
                    await asyncio.sleep(BURST_WINDOW_S)
                continue
            if not self.model.actor.alive:
                # The model actor is restarting (reloading): waiting turns wait for it.
                await asyncio.sleep(_MODEL_WAIT_S)
                continue
            if self._model_dirty and not await self._clear_model():
                continue
            plan = self._plan()
            try:
                result = await self.model.ask(ExecuteStep(plan), timeout=self.step_timeout)
            except TimeoutError:  # AskTimeout: the step is still running on the model thread
                _still_cancellable()
                log.error("model step took longer than %.0fs; ending the batch", self.step_timeout)
                self._fail_running(f"the model step took longer than {self.step_timeout:.0f}s")
                self._model_dirty = True
                continue
            except Exception as exc:  # the step failed: the model dropped its batch and serves on
                _still_cancellable()
                log.error("model step failed: %s: %s", type(exc).__name__, exc)
                self._fail_running(f"model failed: {type(exc).__name__}: {exc}")
                await asyncio.sleep(_MODEL_WAIT_S)
                continue
            self.steps += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "step %d: %d joined, prefill %s, %d decoded, %d paused; %.3fs (prefill %.3fs)",
                    self.steps, len(plan.inserts), [n for _, n in plan.prefill], result.decode_tokens,
                    len(plan.paused), result.seconds, result.prefill_seconds,
                )
            self._route(result)

    async def _clear_model(self) -> bool:
        """After a timed-out step: wait (queued behind it) until the model drops that batch."""
        try:
            await self.model.ask(AbortAll("a step timed out"), timeout=self.step_timeout)
        except Exception as exc:
            log.warning("the model has not dropped the timed-out batch yet: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(_MODEL_WAIT_S)
            return False
        self._model_dirty = False
        return True

    def _plan(self) -> StepPlan:
        removes = tuple(t for t, turn in self.running.items() if turn.cancel_requested or turn.finished)
        slots = self.max_batch - (len(self.running) - len(removes))
        inserts = []
        now = time.perf_counter()
        passed = deque()  # turns that wait for another's prefill of their shared prefix
        while self.admitting and self.waiting and slots > 0:
            turn = self.waiting.popleft()
            if self._rides_later(turn):
                passed.append(turn)
                continue
            self._start_from_pool(turn)
            self.metrics.queue_wait.observe(now - turn.submitted)
            turn.start()
            turn.remaining, turn.offset = len(turn.suffix) - 1, len(turn.cached)
            turn.published = len(turn.cached) // BLOCK_TOKENS
            self.running[turn.id] = turn
            inserts.append(
                SeqInsert(turn.id, turn.suffix, turn.cache, turn.cached, turn.params, turn.max_tokens, turn.constraint)
            )
            turn.cache = None  # the batch owns its copy now
            slots -= 1
        self.waiting.extendleft(reversed(passed))
        leaving = set(removes)
        paused = tuple(t for t, turn in self.running.items() if t not in leaving and turn.backlogged)
        prefill = self._prefill_chunks(leaving)
        return StepPlan(
            inserts=tuple(inserts), removes=removes, prefill=prefill, paused=paused, publish=self._publish(leaving)
        )

    # ------------------------------------------------------------ shared prefixes

    def _rides_later(self, turn: Turn) -> bool:
        """Whether `turn` should wait because a running turn (same scope) is prefilling
        a prefix they share that the pool does not have yet: it then starts from the
        other's blocks instead of computing them again (agents that arrive together
        with one system prompt prefill it once)."""
        if self.prefixes is None or not turn.keys:
            return False
        have = max(len(self.prefixes.match(turn.keys)), len(turn.cached) // BLOCK_TOKENS)
        for other in self.running.values():
            if other.scope != turn.scope or other.remaining == 0 or other.cancel_requested:
                continue
            shared = _common(other.keys, turn.keys, limit=(len(other.prompt) - 1) // BLOCK_TOKENS)
            if shared > have and shared > other.published:
                return True
        return False

    def _start_from_pool(self, turn: Turn) -> None:
        """At admission, start from the pool's longest match if it beats what the
        session found (blocks published since the turn was prepared)."""
        if self.prefixes is None or not turn.keys:
            return
        blocks = self.prefixes.match(turn.keys)
        cached = min(BLOCK_TOKENS * len(blocks), len(turn.prompt) - 1)
        if cached <= len(turn.cached):
            return
        pinned = tuple(blocks[: -(-cached // BLOCK_TOKENS)])
        self.prefixes.acquire(pinned)
        self.prefixes.release(turn.pinned)
        turn.pinned = pinned
        turn.cache = KVPieces(take([(b.kv, BLOCK_TOKENS) for b in blocks], cached))
        turn.cached = turn.prompt[:cached]
        self.prefixes.hits += len(pinned)

    def _publish(self, leaving: set[int]) -> tuple[tuple[int, int, int], ...]:
        """Prompt blocks completed by this step's prefill that the pool lacks: the
        engine copies them out, so others can start from them at once."""
        if self.prefixes is None:
            return ()
        out = []
        for turn_id, turn in self.running.items():
            if turn_id in leaving:
                continue
            complete = min(turn.offset // BLOCK_TOKENS, len(turn.keys))
            first = turn.published
            while first < complete and turn.keys[first] in self.prefixes.blocks:
                first += 1
            if first < complete:
                out.append((turn_id, first * BLOCK_TOKENS, complete * BLOCK_TOKENS))
            turn.published = complete
        return tuple(out)

    def _prefill_chunks(self, leaving: set[int]) -> tuple[tuple[int, int], ...]:
        """How many prompt tokens each prefilling turn processes in this step: full
        chunks unless a big step would delay somebody, else a bounded step's worth,
        shortest remaining prompt first (actors/prefill_budget.py)."""
        staying = [turn for t, turn in self.running.items() if t not in leaving]
        prefilling = [turn for turn in staying if turn.remaining > 0]
        self._planned_prefill = None
        if not prefilling:
            return ()
        decoding = any(turn.remaining == 0 for turn in staying)
        seqs = [Prefilling(turn.offset, turn.remaining) for turn in prefilling]
        takes = self.budget.plan(seqs, decoding)
        self._planned_prefill = rows_and_area(seqs, takes)
        chunks = []
        for turn, take in zip(prefilling, takes):
            if take:
                turn.remaining -= take
                turn.offset += take
                turn.progressed()
                chunks.append((turn.id, take))
        return tuple(chunks)

    def _route(self, result: StepResult) -> None:
        self.metrics.observe_step(result, len(self.running))
        for turn_id, start, kv in result.published:
            turn = self.running.get(turn_id)
            if turn is not None and self.prefixes is not None:
                self.prefixes.add(turn.keys[start // BLOCK_TOKENS], kv)
        if self._planned_prefill is not None and result.prefill_tokens:
            self.budget.observe(*self._planned_prefill, result.prefill_seconds)
        for turn_id, out in result.tokens:
            turn = self.running.get(turn_id)
            if turn is None:
                continue
            if turn.first_token_at is None:
                self.metrics.ttft.observe(time.perf_counter() - turn.submitted)
            turn.add_token(out)
        for end in result.ended:
            turn = self.running.pop(end.turn_id, None)
            if turn is not None:
                self.metrics.finished.inc()
                turn.finish(end.status, end.cache, end.tokens)
        self._update_gauges()

    def _fail_running(self, reason: str) -> None:
        # The batch's caches died with the step; sessions fall back to their saved state.
        for turn in self.running.values():
            turn.fail(reason)
        self.running.clear()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))


def _common(a: list, b: list, limit: int) -> int:
    """How many leading items a and b share (at most `limit`)."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _still_cancellable() -> None:
    """Re-raise a cancellation that an await swallowed (asyncio.wait_for in Python 3.11
    can turn a cancel that races its timeout into TimeoutError, or into the result of
    what it waited for): the step loop must stop when its actor stops, not serve on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()
