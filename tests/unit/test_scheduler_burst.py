"""Agents that start together are prefilled together, even though their turns arrive apart."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from actors import scheduler
from actors.messages import ChatRequest, ExecuteStep, SamplingParams, StepResult
from actors.scheduler import SchedulerActor, SubmitTurn
from actors.turn import Turn


class FakeModel:
    """Stands in for the model actor's ref: records each step's plan, emits nothing."""

    def __init__(self):
        self.actor = SimpleNamespace(alive=True)
        self.plans = []

    async def ask(self, message, *, timeout):
        if isinstance(message, ExecuteStep):
            self.plans.append(message.plan)
            await asyncio.sleep(0.05)  # one model step
            return StepResult(tokens=(), ended=(), prefill_tokens=0, decode_tokens=0, seconds=0.05)
        return 0  # AbortAll on start: nothing to drop


def _turn(turn_id):
    turn = Turn(ChatRequest(), f"agent-{turn_id}")
    turn.prompt, turn.params, turn.max_tokens = (1, 2, 3), SamplingParams(temperature=0.0), 4
    return SubmitTurn(turn)


async def _first_step_inserts(gap_s: float) -> int:
    model = FakeModel()
    sched = SchedulerActor(model, max_batch=8)
    task = asyncio.create_task(sched.run())
    try:
        await asyncio.sleep(0.05)  # started, idle
        for turn_id in range(3):
            sched.tell(_turn(turn_id))
            await asyncio.sleep(gap_s)  # requests parsed and tokenized one after another
        for _ in range(100):
            if model.plans:
                break
            await asyncio.sleep(0.01)
        return len(model.plans[0].inserts)
    finally:
        sched.stop()
        await asyncio.wait([task], timeout=2)


async def test_a_burst_arriving_within_the_window_starts_in_one_step():
    assert await _first_step_inserts(gap_s=scheduler.BURST_WINDOW_S / 6) == 3


async def test_without_the_window_the_first_arrival_would_start_alone(monkeypatch):
    monkeypatch.setattr(scheduler, "BURST_WINDOW_S", 0.0)
    assert await _first_step_inserts(gap_s=0.005) == 1
