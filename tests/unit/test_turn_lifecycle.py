"""Every path that ends a turn gives its client a final event, with the scheduler and a
fake model (no MLX): cancellations, a failed step, a timed-out step, a scheduler stop,
and a client that reads too slowly."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from actors.messages import (
    AbortAll,
    ChatRequest,
    ExecuteStep,
    SamplingParams,
    SeqEnd,
    StepResult,
    TextDelta,
    TokenOut,
    TurnDone,
    TurnStatus,
)
from actors.scheduler import SchedulerActor, SubmitTurn
from actors.turn import BACKLOG_CHARS, Turn


class FakeModel:
    """Stands in for the model actor: each running sequence decodes one token a step
    (token 7) until it has `length` tokens; `step_s` is how long a step takes."""

    def __init__(self, step_s: float = 0.01, length: int = 1000):
        self.actor = SimpleNamespace(alive=True)
        self.step_s, self.length = step_s, length
        self.seqs: dict[int, int] = {}  # turn id -> tokens generated
        self.plans, self.aborts = [], 0
        self.fail_next = False

    async def ask(self, message, *, timeout):
        if isinstance(message, AbortAll):
            self.aborts += 1
            dropped, self.seqs = len(self.seqs), {}
            return dropped
        assert isinstance(message, ExecuteStep)
        plan = message.plan
        self.plans.append(plan)
        await asyncio.wait_for(asyncio.sleep(self.step_s), timeout)  # as ask's timeout would
        if self.fail_next:
            self.fail_next, self.seqs = False, {}
            raise RuntimeError("injected fault in the model step")
        ended = [SeqEnd(t, TurnStatus.FINISHED_ABORTED, ["kv"], (1,)) for t in plan.removes if self.seqs.pop(t, None) is not None]
        for ins in plan.inserts:
            self.seqs[ins.turn_id] = 0
        tokens = []
        for t in list(self.seqs):
            if t in plan.paused:
                continue
            self.seqs[t] += 1
            tokens.append((t, TokenOut(7)))
            if self.seqs[t] >= self.length:
                del self.seqs[t]
                ended.append(SeqEnd(t, TurnStatus.FINISHED_LENGTH, ["kv"], (1,)))
        return StepResult(tuple(tokens), tuple(ended), 0, len(tokens), self.step_s)


class Words:
    """A TurnOutput stand-in: every token is a 1,000-character word."""

    stopped, stop_sequence, has_tool_calls = False, None, False

    def add(self, out):
        return [TextDelta("x" * 1000)]

    def finish(self):
        return []


def make_turn(n_prompt: int = 4, max_tokens: int = 1000) -> Turn:
    turn = Turn(ChatRequest(), "agent")
    turn.prompt, turn.params, turn.max_tokens = tuple(range(1, n_prompt + 1)), SamplingParams(temperature=0.0), max_tokens
    return turn


async def drain(turn: Turn, timeout: float = 10.0) -> list:
    """Read the client's side until TurnDone (fails the test if it never comes)."""
    events = []
    async with asyncio.timeout(timeout):
        while not events or not isinstance(events[-1], TurnDone):
            events += await turn.next_events(0.05)
    return events


@pytest.fixture
async def scheduler():
    started = []

    async def start(model, **kw):
        sched = SchedulerActor(model, max_batch=kw.pop("max_batch", 4), **kw)
        task = asyncio.create_task(sched.run())
        started.append((sched, task))
        await asyncio.sleep(0.01)
        return sched

    yield start
    for sched, task in started:
        sched.stop()
        await asyncio.wait([task], timeout=5)


async def test_a_client_cancel_ends_running_and_waiting_turns(scheduler):
    sched = await scheduler(FakeModel(), max_batch=1)
    running, waiting = make_turn(), make_turn()
    assert await sched.ask(SubmitTurn(running), timeout=1)
    assert await sched.ask(SubmitTurn(waiting), timeout=1)
    await asyncio.sleep(0.1)
    waiting.cancel()
    running.cancel()
    for turn in (running, waiting):
        done = (await drain(turn))[-1]
        assert done.finish_reason == "cancelled"
    assert (await waiting.wait_ended()).cache is None  # it never had one: it brought none


async def test_a_failed_step_ends_the_batch_with_an_error_and_the_scheduler_serves_on(scheduler):
    model = FakeModel()
    sched = await scheduler(model)
    turn = make_turn()
    await sched.ask(SubmitTurn(turn), timeout=1)
    await asyncio.sleep(0.1)
    model.fail_next = True
    done = (await drain(turn))[-1]
    assert done.finish_reason == "error" and "injected fault" in done.error
    assert (await turn.wait_ended()).cache is None  # the session falls back to its saved cache
    after = make_turn(max_tokens=3)
    model.length = 3
    await sched.ask(SubmitTurn(after), timeout=1)
    assert (await drain(after))[-1].finish_reason == "length"


async def test_a_timed_out_step_fails_its_turns_and_the_model_drops_them_before_the_next_step(scheduler):
    model = FakeModel(step_s=0.5, length=3)
    sched = await scheduler(model, step_timeout=0.2)
    turn = make_turn()
    await sched.ask(SubmitTurn(turn), timeout=1)
    done = (await drain(turn))[-1]
    assert done.finish_reason == "error" and "longer than" in done.error
    # No ghost sequence: before any new step, the model was told to drop the old batch.
    model.step_s = 0.01
    after = make_turn()
    await sched.ask(SubmitTurn(after), timeout=1)
    assert (await drain(after))[-1].finish_reason == "length"
    assert model.aborts >= 2  # on start, and after the timeout
    assert model.plans[-1].inserts == () or model.plans[-1].inserts[0].turn_id == after.id


class AnswersAsTheStopLands(FakeModel):
    """The stop's cancel lands as the model's answer is ready: Python 3.11's
    asyncio.wait_for then returns the answer and drops the cancel (this hung CI once)."""

    async def ask(self, message, *, timeout):
        try:
            return await super().ask(message, timeout=timeout)
        except asyncio.CancelledError:
            return StepResult((), (), 0, 0, self.step_s)


@pytest.mark.parametrize("model", [FakeModel, AnswersAsTheStopLands])
async def test_stopping_the_scheduler_ends_every_turn_it_holds(scheduler, model):
    sched = await scheduler(model(), max_batch=1)
    running, waiting = make_turn(), make_turn()
    await sched.ask(SubmitTurn(running), timeout=1)
    await sched.ask(SubmitTurn(waiting), timeout=1)
    await asyncio.sleep(0.1)
    sched.stop()
    r, w = (await drain(running, 5))[-1], (await drain(waiting, 5))[-1]
    assert r.finish_reason == "error" and "restarted" in r.error
    assert w.finish_reason == "abort" and "retry" in w.error


async def test_a_slow_reader_pauses_its_turn_instead_of_piling_up_events(scheduler):
    model = FakeModel(length=10_000)
    sched = await scheduler(model)
    slow, fast = make_turn(), make_turn()
    slow.output = fast.output = Words()
    await sched.ask(SubmitTurn(slow), timeout=1)
    await sched.ask(SubmitTurn(fast), timeout=1)
    for _ in range(200):  # the fast client reads, the slow one does not
        await fast.next_events(0.01)
        if slow.backlogged:
            break
    await asyncio.sleep(0.3)
    assert slow.backlogged
    paused_at = model.seqs[slow.id]
    await asyncio.sleep(0.3)
    assert model.seqs[slow.id] == paused_at  # no more tokens while nobody reads them
    assert model.seqs[fast.id] > paused_at  # the others go on
    events = await slow.next_events(0.1)  # the reader catches up: one merged event
    assert len(events) == 1 and len(events[0].text) <= BACKLOG_CHARS + 1000
    await asyncio.sleep(0.3)
    assert model.seqs[slow.id] > paused_at  # and its turn resumes


async def test_finish_is_idempotent_and_the_final_event_comes_once():
    turn = make_turn()
    turn.finish(TurnStatus.FINISHED_LENGTH, ["kv"], (1, 2))
    turn.fail("late failure")
    turn.finish(TurnStatus.FINISHED_STOPPED, None, ())
    events = await drain(turn)
    assert [type(e) for e in events] == [TurnDone]
    assert events[0].finish_reason == "length"
    assert (await turn.wait_ended()).cache == ["kv"]
