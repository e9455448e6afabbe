"""The actor: ask/tell, crashes, stop semantics, backpressure, owned tasks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from runtime.actor import Actor, ActorStopped, AskTimeout, MailboxFull


@dataclass(frozen=True, slots=True)
class Echo:
    text: str


@dataclass(frozen=True, slots=True)
class Boom:
    reason: str = "boom"


@dataclass(frozen=True, slots=True)
class Block:
    """Handled by waiting on the actor's gate: a handler that is busy until we say so."""


class Probe(Actor):
    """Echoes, raises on Boom, blocks on Block; records what it did."""

    def __init__(self, name: str = "probe", **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.handled: list[object] = []
        self.events: list[str] = []
        self.busy = asyncio.Event()  # set while a Block is being handled
        self.gate = asyncio.Event()  # opening it lets Block handlers finish

    async def on_start(self) -> None:
        self.events.append("start")

    async def on_stop(self) -> None:
        self.events.append("stop")

    async def handle(self, message: object) -> object:
        if isinstance(message, Block):
            self.busy.set()
            await self.gate.wait()
        self.handled.append(message)
        if isinstance(message, Boom):
            raise ValueError(message.reason)
        if isinstance(message, Echo):
            return message.text.upper()
        return None


@pytest.fixture
async def running():
    """Start actors in tasks; whatever a test leaves running is stopped afterwards."""
    started: list[tuple[Actor, asyncio.Task]] = []

    def start(actor: Actor) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(actor.run())
        started.append((actor, task))
        return task

    yield start
    for actor, task in started:
        actor.stop()
        if isinstance(actor, Probe):
            actor.gate.set()
        await asyncio.wait([task], timeout=1)
        assert task.done(), f"{actor!r} did not stop"
        if not task.cancelled():
            task.exception()  # retrieved: crashes are asserted by the tests themselves


async def test_ask_returns_the_handler_reply(running):
    actor = Probe()
    running(actor)
    assert await actor.ask(Echo("hi"), timeout=1) == "HI"
    assert await actor.ask(Echo("again"), timeout=1) == "AGAIN"


async def test_ask_timeout_raises_and_the_actor_serves_the_next_ask(running):
    actor = Probe()
    running(actor)
    with pytest.raises(AskTimeout) as info:
        await actor.ask(Block(), timeout=0.05)
    assert isinstance(info.value, TimeoutError)  # callers catching TimeoutError see it too
    assert "Block" in str(info.value)
    actor.gate.set()  # the handler finishes after its asker left: no crash
    assert await actor.ask(Echo("still here"), timeout=1) == "STILL HERE"
    assert actor.alive


async def test_a_timeout_raised_by_the_handler_is_not_an_ask_timeout(running):
    class Slow(Actor):
        async def handle(self, message):
            raise TimeoutError("upstream timed out")

    actor = Slow("slow")
    running(actor)
    with pytest.raises(TimeoutError, match="upstream") as info:
        await actor.ask("x", timeout=1)
    assert not isinstance(info.value, AskTimeout)


async def test_handler_error_goes_to_the_asker_and_the_actor_keeps_serving(running):
    actor = Probe()
    task = running(actor)
    with pytest.raises(ValueError, match="bad request"):
        await actor.ask(Boom("bad request"), timeout=1)
    assert await actor.ask(Echo("ok"), timeout=1) == "OK"
    assert not task.done()


async def test_told_message_error_crashes_the_actor_and_on_stop_runs():
    actor = Probe()
    actor.tell(Boom("told"))
    with pytest.raises(ValueError, match="told"):
        await asyncio.wait_for(actor.run(), 1)
    assert actor.events == ["start", "stop"]
    assert not actor.alive and actor.stopped
    with pytest.raises(ActorStopped):
        actor.tell(Echo("late"))
    with pytest.raises(ActorStopped):
        await actor.ask(Echo("late"), timeout=1)


async def test_asks_queued_behind_a_crash_fail_with_actor_stopped(running):
    actor = Probe()
    task = running(actor)
    actor.tell(Block())
    await actor.busy.wait()
    actor.tell(Boom())
    first = asyncio.ensure_future(actor.ask(Echo("a"), timeout=5))
    second = asyncio.ensure_future(actor.ask(Echo("b"), timeout=5))
    await asyncio.sleep(0)  # both asks are queued
    actor.gate.set()
    done, _ = await asyncio.wait([first, second, task], timeout=1)
    assert len(done) == 3, "queued asks must fail, not hang"
    for ask in (first, second):
        with pytest.raises(ActorStopped, match="before handling Echo"):
            ask.result()
        assert isinstance(ask.exception().__cause__, ValueError)
    assert isinstance(task.exception(), ValueError)
    assert Echo("a") not in actor.handled


async def test_stop_is_a_message_queued_work_first_later_work_refused(running):
    actor = Probe()
    actor.tell(Echo("1"))
    actor.tell(Echo("2"))
    reply = asyncio.ensure_future(actor.ask(Echo("3"), timeout=1))
    await asyncio.sleep(0)
    actor.stop()
    with pytest.raises(ActorStopped):
        actor.tell(Echo("after"))
    with pytest.raises(ActorStopped):
        await actor.ask(Echo("after"), timeout=1)
    await asyncio.wait_for(actor.run(), 1)  # returns normally
    assert await reply == "3"
    assert actor.handled == [Echo("1"), Echo("2"), Echo("3")]
    assert actor.events == ["start", "stop"]
    actor.stop()  # idempotent


async def test_full_mailbox_refuses_at_once_but_stop_still_gets_in(running):
    actor = Probe(mailbox_size=2)
    task = running(actor)
    actor.tell(Block())
    await actor.busy.wait()  # the handler is stuck; the mailbox is empty again
    actor.tell(Echo("1"))
    actor.tell(Echo("2"))
    assert actor.mailbox_depth == 2
    with pytest.raises(MailboxFull):
        actor.tell(Echo("3"))
    with pytest.raises(MailboxFull):
        await actor.ask(Echo("4"), timeout=1)  # refused, not waiting for room
    actor.stop()
    actor.gate.set()
    await asyncio.wait_for(task, 1)
    assert actor.handled == [Block(), Echo("1"), Echo("2")]
    assert actor.mailbox_depth == 0


async def test_ask_whose_caller_gave_up_is_skipped(running):
    actor = Probe()
    running(actor)
    actor.tell(Block())
    await actor.busy.wait()
    with pytest.raises(AskTimeout):
        await actor.ask(Echo("stale"), timeout=0.01)
    actor.gate.set()
    assert await actor.ask(Echo("fresh"), timeout=1) == "FRESH"
    assert Echo("stale") not in actor.handled


async def test_spawned_task_is_cancelled_when_the_actor_stops(running):
    cancelled = asyncio.Event()

    class Ticker(Probe):
        async def on_start(self) -> None:
            await super().on_start()
            self.ticker = self.spawn(self.tick())

        async def tick(self) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def on_stop(self) -> None:
            self.events.append(f"stop, ticker done={self.ticker.done()}")

    actor = Ticker()
    task = running(actor)
    await actor.wait_started()
    assert not actor.ticker.done()
    actor.stop()
    await asyncio.wait_for(task, 1)
    assert cancelled.is_set()
    assert actor.events == ["start", "stop, ticker done=True"]  # tasks go before on_stop


async def test_a_task_that_swallows_its_cancel_is_cancelled_again_and_the_actor_stops(running):
    # Python 3.11's asyncio.wait_for returns the result of an awaitable that completed
    # as the cancel came in, so a loop built on it goes on as if never cancelled.
    cancels = []

    class Stubborn(Probe):
        async def on_start(self) -> None:
            await super().on_start()
            self.spawn(self.loop())

        async def loop(self) -> None:
            while True:
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    cancels.append(len(cancels))
                    if len(cancels) == 1:
                        continue  # swallowed once, as wait_for can
                    raise

    actor = Stubborn()
    task = running(actor)
    await actor.wait_started()
    actor.stop()
    await asyncio.wait_for(task, 3)
    assert cancels == [0, 1] and actor.events == ["start", "stop"]


async def test_spawned_task_error_crashes_the_actor(running):
    class Fragile(Probe):
        async def handle(self, message):
            if message == "spawn a failure":
                self.spawn(self.fail())
                return "spawned"
            return await super().handle(message)

        async def fail(self) -> None:
            await self.busy.wait()
            raise RuntimeError("background failure")

    actor = Fragile()
    task = running(actor)
    assert await actor.ask("spawn a failure", timeout=1) == "spawned"
    pending = asyncio.ensure_future(actor.ask(Block(), timeout=5))  # sets busy, so fail() raises
    with pytest.raises(RuntimeError, match="background failure"):  # the error itself, no group
        await asyncio.wait_for(task, 1)
    with pytest.raises(ActorStopped, match="crashed"):
        await pending  # the ask being handled when the crash hit
    assert actor.events == ["start", "stop"]


async def test_cancelling_run_fails_queued_asks_and_still_runs_on_stop(running):
    actor = Probe()
    task = running(actor)
    actor.tell(Block())
    await actor.busy.wait()
    queued = asyncio.ensure_future(actor.ask(Echo("x"), timeout=5))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ActorStopped, match="cancelled before handling Echo"):
        await queued
    assert actor.events == ["start", "stop"]


async def test_on_stop_is_bounded_by_stop_timeout():
    class Stuck(Probe):
        stop_timeout = 0.05

        async def on_stop(self) -> None:
            await asyncio.Event().wait()

    actor = Stuck()
    actor.stop()
    await asyncio.wait_for(actor.run(), 1)
    assert actor.stopped


async def test_on_stop_is_skipped_when_on_start_failed():
    class BadStart(Probe):
        async def on_start(self) -> None:
            raise OSError("no model file")

    actor = BadStart()
    waiter = asyncio.ensure_future(actor.wait_started())
    with pytest.raises(OSError):
        await actor.run()
    with pytest.raises(ActorStopped):
        await waiter
    assert actor.events == []


async def test_run_twice_and_spawn_outside_run_are_refused():
    actor = Probe()

    async def nothing() -> None:
        pass

    with pytest.raises(RuntimeError):
        actor.spawn(nothing())
    actor.stop()
    await actor.run()
    with pytest.raises(RuntimeError):
        await actor.run()
    with pytest.raises(ActorStopped):
        actor.spawn(nothing())
    await actor.wait_stopped()
