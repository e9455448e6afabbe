"""SchedulerActor: the batching policy (who joins, who leaves, when to step).

Sessions submit turns; the scheduler keeps a FIFO of waiting turns and a set of
running ones. Its step loop builds one StepPlan per tick (cancellations leave,
waiting turns join up to `max_batch`), asks the model actor to execute it, and
routes each generated token to the turn's sink. Joins and leaves only happen
between steps; mlx-lm's BatchGenerator splits long prefills into chunks that
interleave with everyone's decode, so one agent's long prompt costs the others
about one chunk per step rather than the whole prefill.

Fairness: admission is strictly first come, first served, and every running
turn is bounded by its max_tokens, so a waiting turn is admitted within a
bounded number of steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from actors.messages import (
    AbortAll,
    CancelTurn,
    Crash,
    ExecuteStep,
    SeqInsert,
    SequenceEnded,
    StepPlan,
    StepResult,
    SubmitTurn,
    TokenOut,
    TurnStatus,
)
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


@dataclass(slots=True)
class _Running:
    turn: SubmitTurn
    submitted: float
    first_token_at: float | None = None
    cancel_requested: bool = False
    abort_reason: str | None = None  # set when the server, not the client, ends the turn
    generated: int = 0


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
        step_timeout: float = 120.0,
        registry: Registry | None = None,
        name: str = "scheduler",
    ):
        super().__init__(name, mailbox_size=1024)
        self.model = model
        self.max_batch = max_batch
        self.step_timeout = step_timeout
        self.metrics = SchedulerMetrics(registry or Registry(), max_batch)
        self.waiting: deque[tuple[SubmitTurn, float]] = deque()
        self.running: dict[int, _Running] = {}
        self.admitting = True
        self.steps = 0
        self._wakeup = asyncio.Event()

    async def on_start(self) -> None:
        if self.model.actor.alive:
            # After a scheduler restart the engine may still hold the old batch.
            dropped = await self.model.ask(AbortAll("scheduler restarted"), timeout=30)
            if dropped:
                log.warning("dropped %d sequences of the previous scheduler", dropped)
        self.spawn(self._step_loop())

    async def on_stop(self) -> None:
        # Turns still here never reach the model again: end them so no client hangs.
        for turn, _ in self.waiting:
            _end(turn, TurnStatus.FINISHED_ABORTED, turn.cache, turn.cached, "scheduler stopped")
        for run in self.running.values():
            _end(run.turn, TurnStatus.FINISHED_ERROR, None, (), "scheduler stopped mid-turn")
        self.waiting.clear()
        self.running.clear()

    async def handle(self, message: Any) -> Any:
        match message:
            case SubmitTurn():
                self.waiting.append((message, time.perf_counter()))
            case CancelTurn(turn_id=turn_id):
                self._cancel(turn_id)
            case AbortAll(reason=reason):
                self._abort_all(reason)
            case SetAdmission(open=is_open):
                self.admitting = is_open
            case Crash(reason=reason):
                raise RuntimeError(f"crash requested: {reason}")
            case GetSchedulerStats():
                return SchedulerStats(len(self.running), len(self.waiting), self.admitting, self.steps)
            case _:
                raise TypeError(f"scheduler cannot handle {type(message).__name__}")
        self._update_gauges()
        self._wakeup.set()
        return None

    def _cancel(self, turn_id: int) -> None:
        if turn_id in self.running:
            self.running[turn_id].cancel_requested = True
            return
        for item in self.waiting:
            turn = item[0]
            if turn.turn_id == turn_id:
                self.waiting.remove(item)
                _end(turn, TurnStatus.FINISHED_ABORTED, turn.cache, turn.cached)
                return

    def _abort_all(self, reason: str) -> None:
        while self.waiting:
            turn, _ = self.waiting.popleft()
            _end(turn, TurnStatus.FINISHED_ABORTED, turn.cache, turn.cached, reason)
        for run in self.running.values():
            run.cancel_requested = True
            run.abort_reason = reason

    # ------------------------------------------------------------ the loop

    def _has_work(self) -> bool:
        return bool(self.running) or (self.admitting and bool(self.waiting))

    async def _step_loop(self) -> None:
        while True:
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
            plan = self._plan()
            try:
                result = await self.model.ask(ExecuteStep(plan), timeout=self.step_timeout)
            except Exception as exc:  # model crashed or timed out: fail the batch, keep serving
                log.error("model step failed: %s: %s", type(exc).__name__, exc)
                self._fail_running(f"model failed: {type(exc).__name__}: {exc}")
                await asyncio.sleep(_MODEL_WAIT_S)
                continue
            self.steps += 1
            self._route(result)

    def _plan(self) -> StepPlan:
        removes = tuple(t for t, r in self.running.items() if r.cancel_requested)
        slots = self.max_batch - (len(self.running) - len(removes))
        inserts = []
        now = time.perf_counter()
        while self.admitting and self.waiting and slots > 0:
            turn, submitted = self.waiting.popleft()
            self.metrics.queue_wait.observe(now - submitted)
            self.running[turn.turn_id] = _Running(turn, submitted)
            inserts.append(
                SeqInsert(turn.turn_id, turn.suffix, turn.cache, turn.cached, turn.params, turn.max_tokens)
            )
            slots -= 1
        for turn_id in removes:
            # Stop asking again; the engine's SeqEnd hands the cache back.
            self.running[turn_id].cancel_requested = False
        return StepPlan(inserts=tuple(inserts), removes=removes)

    def _route(self, result: StepResult) -> None:
        self.metrics.observe_step(result, len(self.running))
        now = time.perf_counter()
        for turn_id, token in result.tokens:
            run = self.running.get(turn_id)
            if run is None:
                continue
            if run.first_token_at is None:
                run.first_token_at = now
                self.metrics.ttft.observe(now - run.submitted)
            run.generated += 1
            run.turn.sink.put_nowait(TokenOut(token))
        for end in result.ended:
            run = self.running.pop(end.turn_id, None)
            if run is not None:
                self.metrics.finished.inc()
                _end(run.turn, end.status, end.cache, end.tokens, run.abort_reason)
        self._update_gauges()

    def _fail_running(self, reason: str) -> None:
        # The batch's caches died with the step; sessions fall back to their saved state.
        for run in self.running.values():
            _end(run.turn, TurnStatus.FINISHED_ERROR, None, (), reason)
        self.running.clear()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))


def _end(turn: SubmitTurn, status: TurnStatus, cache, tokens, error: str | None = None) -> None:
    turn.sink.put_nowait(SequenceEnded(status, cache, tuple(tokens), error))
