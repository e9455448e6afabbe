"""Supervision: restarts per spec, escalation, ordered start and stop, dynamic children."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from runtime.actor import Actor, ActorStopped
from runtime.supervision import (
    ActorRef,
    ChildSpec,
    Escalation,
    Restart,
    RestartIntensity,
    Supervisor,
)


class Worker(Actor):
    """Replies "<name>#<incarnation>: <msg>"; "crash" raises; "quit" stops itself.

    Every incarnation of every worker logs "start X"/"stop X" into one shared list.
    """

    def __init__(self, name: str, log: list[str], incarnation: int = 1) -> None:
        super().__init__(name)
        self.log = log
        self.incarnation = incarnation

    async def on_start(self) -> None:
        self.log.append(f"start {self.name}")

    async def on_stop(self) -> None:
        self.log.append(f"stop {self.name}")

    async def handle(self, message: str) -> str:
        if message == "crash":
            raise ValueError(f"{self.name} crashed")
        if message == "quit":
            self.stop()
        return f"{self.name}#{self.incarnation}: {message}"


def spec(name: str, log: list[str], restart: Restart = Restart.PERMANENT, **kwargs) -> ChildSpec:
    """A spec whose factory numbers the incarnations it builds."""
    count = 0

    def build() -> Worker:
        nonlocal count
        count += 1
        return Worker(name, log, count)

    return ChildSpec(name, build, restart, **kwargs)


class Running:
    """A supervisor whose run() is a task of the test, recording its on_restart calls."""

    def __init__(self, children, **kwargs) -> None:
        self.restarts: list[tuple[str, BaseException | None]] = []
        self.sup = Supervisor("sup", children, on_restart=self._on_restart, **kwargs)
        self.task = asyncio.get_running_loop().create_task(self.sup.run())

    def _on_restart(self, name: str, error: BaseException | None) -> None:
        self.restarts.append((name, error))

    async def next_restart(self, ref: ActorRef, old: Actor) -> None:
        """Wait until ``ref`` points at a started incarnation other than ``old``."""
        async with asyncio.timeout(1):
            while ref.actor is old:  # the ref is rebound once the new on_start is done
                await asyncio.sleep(0.001)
        assert ref.actor.alive


@pytest.fixture
async def supervise():
    made: list[Running] = []

    def make(children, **kwargs) -> Running:
        made.append(Running(children, **kwargs))
        return made[-1]

    yield make
    for running in made:
        running.sup.request_stop(1)
        await asyncio.wait([running.task], timeout=2)
        assert running.task.done(), "supervisor did not stop"
        if not running.task.cancelled():
            running.task.exception()


async def test_permanent_child_is_restarted_fresh_after_a_crash(supervise):
    log: list[str] = []
    running = supervise([spec("a", log)])
    await running.sup.wait_started()
    ref = running.sup.ref("a")
    first = ref.actor
    assert await ref.ask("hi", timeout=1) == "a#1: hi"
    ref.tell("crash")
    await running.next_restart(ref, first)
    assert log == ["start a", "stop a", "start a"]  # on_stop after the crash, on_start again
    assert await ref.ask("hi", timeout=1) == "a#2: hi"  # the same ref, a fresh instance
    [(name, error)] = running.restarts
    assert name == "a" and isinstance(error, ValueError)
    await running.sup.stop_child("a")
    assert ref.actor.stopped  # stop_child waited for the new incarnation, not the crashed one


async def test_an_ask_error_does_not_restart_the_child(supervise):
    log: list[str] = []
    running = supervise([spec("a", log)])
    await running.sup.wait_started()
    with pytest.raises(ValueError):
        await running.sup.ref("a").ask("crash", timeout=1)
    assert await running.sup.ref("a").ask("hi", timeout=1) == "a#1: hi"
    assert running.restarts == []


async def test_permanent_child_is_restarted_even_after_a_normal_stop(supervise):
    log: list[str] = []
    running = supervise([spec("a", log)])
    await running.sup.wait_started()
    ref = running.sup.ref("a")
    first = ref.actor
    ref.tell("quit")
    await running.next_restart(ref, first)
    assert running.restarts == [("a", None)]
    assert await ref.ask("hi", timeout=1) == "a#2: hi"


async def test_transient_child_is_restarted_after_a_crash_only(supervise):
    log: list[str] = []
    running = supervise([spec("t", log, Restart.TRANSIENT)])
    await running.sup.wait_started()
    ref = running.sup.ref("t")
    first = ref.actor
    ref.tell("crash")
    await running.next_restart(ref, first)
    assert await ref.ask("hi", timeout=1) == "t#2: hi"

    ref.tell("quit")
    await ref.actor.wait_stopped()
    await asyncio.sleep(0.02)  # room for a (wrong) restart to happen
    assert running.sup.children() == []
    with pytest.raises(KeyError):
        running.sup.ref("t")
    with pytest.raises(ActorStopped):
        ref.tell("hi")
    assert len(running.restarts) == 1


async def test_temporary_child_is_never_restarted(supervise):
    log: list[str] = []
    running = supervise([spec("tmp", log, Restart.TEMPORARY), spec("keep", log)])
    await running.sup.wait_started()
    ref = running.sup.ref("tmp")
    ref.tell("crash")
    await ref.actor.wait_stopped()
    await asyncio.sleep(0.02)  # room for a (wrong) restart to happen
    assert running.restarts == []
    assert running.sup.children() == ["keep"]
    with pytest.raises(ActorStopped):
        await ref.ask("hi", timeout=1)
    assert log.count("start tmp") == 1


async def test_between_a_crash_and_the_restart_the_ref_refuses_messages(supervise):
    gate = asyncio.Event()
    entered = asyncio.Event()

    class SlowRestart(Worker):
        async def on_start(self) -> None:
            await super().on_start()
            if self.incarnation > 1:
                entered.set()
                await gate.wait()

    count = 0

    def build() -> Worker:
        nonlocal count
        count += 1
        return SlowRestart("s", [], count)

    running = supervise([ChildSpec("s", build)])
    await running.sup.wait_started()
    ref = running.sup.ref("s")
    first = ref.actor
    ref.tell("crash")
    await asyncio.wait_for(entered.wait(), 1)  # the new incarnation is in on_start
    with pytest.raises(ActorStopped):
        ref.tell("hi")
    with pytest.raises(ActorStopped):
        await ref.ask("hi", timeout=1)
    gate.set()
    await running.next_restart(ref, first)
    assert await ref.ask("hi", timeout=1) == "s#2: hi"


async def test_escalation_when_restarts_exceed_the_intensity(supervise):
    log: list[str] = []
    built = 0

    class CrashOnStart(Worker):
        async def on_start(self) -> None:
            await super().on_start()
            self.tell("crash")  # crashes on its first message, every incarnation

    def build() -> Worker:
        nonlocal built
        built += 1
        return CrashOnStart("b", log, built)

    running = supervise(
        [spec("a", log), ChildSpec("b", build), spec("c", log)],
        intensity=RestartIntensity(max_restarts=2, period=5.0),
    )
    with pytest.raises(Escalation) as info:
        await asyncio.wait_for(running.task, 1)
    error = info.value
    assert "'b'" in str(error) and "b crashed" in str(error)
    assert isinstance(error.__cause__, ValueError)
    assert built == 3  # the first run plus max_restarts restarts, then it gives up
    assert len(running.restarts) == 2
    assert log[-2:] == ["stop c", "stop a"]  # the others, newest first
    with pytest.raises(ActorStopped):
        running.sup.ref("a").tell("hi")


async def test_restart_intensity_counts_within_the_period_only():
    limit = RestartIntensity(max_restarts=2, period=1.0)
    assert not limit.record(0.0)
    assert not limit.record(0.5)
    assert limit.record(0.9)  # a third restart within one second
    spaced = RestartIntensity(max_restarts=2, period=1.0)
    assert not any(spaced.record(t) for t in (0.0, 0.6, 1.2, 1.8, 2.4))


async def test_children_start_in_order_each_after_the_previous_on_start(supervise):
    log: list[str] = []

    class Dependent(Worker):
        """Relies on its predecessor being up: asks it from on_start."""

        def __init__(self, name: str, before: Callable[[], ActorRef]) -> None:
            super().__init__(name, log)
            self.before = before

        async def on_start(self) -> None:
            log.append(f"{self.name} sees " + await self.before().ask("ping", timeout=1))

    sups: list[Supervisor] = []  # filled before the supervisor's task gets to run
    running = supervise(
        [
            spec("a", log),
            ChildSpec("b", lambda: Dependent("b", lambda: sups[0].ref("a"))),
            ChildSpec("c", lambda: Dependent("c", lambda: sups[0].ref("b"))),
        ]
    )
    sups.append(running.sup)
    await running.sup.wait_started()
    assert log == ["start a", "b sees a#1: ping", "c sees b#1: ping"]
    assert running.sup.children() == ["a", "b", "c"]


async def test_stop_goes_in_reverse_start_order_and_a_restart_keeps_its_place(supervise):
    log: list[str] = []
    running = supervise([spec("a", log), spec("b", log), spec("c", log)])
    await running.sup.wait_started()
    ref = running.sup.ref("a")
    first = ref.actor
    ref.tell("crash")
    await running.next_restart(ref, first)
    log.clear()
    await asyncio.wait_for(running.sup.stop(), 1)
    assert log == ["stop c", "stop b", "stop a"]
    await running.task  # run() returned normally
    await running.sup.stop()  # idempotent


async def test_a_child_that_will_not_stop_is_cancelled_after_its_shutdown_timeout(supervise):
    log: list[str] = []

    class Stubborn(Worker):
        async def handle(self, message: str) -> str:
            await asyncio.Event().wait()  # never returns: stop() cannot get its turn
            return ""

    running = supervise(
        [spec("a", log), ChildSpec("s", lambda: Stubborn("s", log), shutdown_timeout=0.05)]
    )
    await running.sup.wait_started()
    running.sup.ref("s").tell("hang")
    await asyncio.wait_for(running.sup.stop(), 1)
    assert log == ["start a", "start s", "stop s", "stop a"]  # on_stop ran after the cancel


async def test_initial_start_failure_escalates_and_stops_the_started_ones(supervise):
    log: list[str] = []

    class BadStart(Worker):
        async def on_start(self) -> None:
            raise OSError("weights not found")

    running = supervise(
        [spec("a", log), spec("b", log), ChildSpec("bad", lambda: BadStart("bad", log)), spec("z", log)]
    )
    with pytest.raises(Escalation, match="'bad' failed to start") as info:
        await running.sup.wait_started()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(Escalation):
        await asyncio.wait_for(running.task, 1)
    assert log == ["start a", "start b", "stop b", "stop a"]


async def test_dynamic_children_start_after_and_stop_before_the_static_ones(supervise):
    log: list[str] = []
    running = supervise([spec("a", log)])
    sup = running.sup
    await sup.wait_started()
    ref = await sup.start_child(spec("agent-1", log))  # permanent, yet stop_child is final
    assert await ref.ask("hi", timeout=1) == "agent-1#1: hi"
    await sup.start_child(spec("agent-2", log, Restart.TRANSIENT))
    assert sup.children() == ["a", "agent-1", "agent-2"]
    with pytest.raises(ValueError, match="already"):
        await sup.start_child(spec("agent-1", log))

    await sup.stop_child("agent-1")
    assert log[-1] == "stop agent-1"
    assert sup.children() == ["a", "agent-2"]
    await asyncio.sleep(0.02)  # room for a (wrong) restart to happen
    assert log.count("start agent-1") == 1 and running.restarts == []
    with pytest.raises(ActorStopped):
        ref.tell("hi")
    with pytest.raises(KeyError):
        sup.ref("agent-1")
    with pytest.raises(KeyError):
        await sup.stop_child("agent-1")

    log.clear()
    await asyncio.wait_for(sup.stop(), 1)
    assert log == ["stop agent-2", "stop a"]
    with pytest.raises(ActorStopped):
        await sup.start_child(spec("late", log))


async def test_a_dynamic_child_that_fails_to_start_raises_to_the_caller(supervise):
    class BadStart(Worker):
        async def on_start(self) -> None:
            raise OSError("no such agent")

    running = supervise([])
    await running.sup.wait_started()
    with pytest.raises(OSError, match="no such agent"):
        await running.sup.start_child(ChildSpec("bad", lambda: BadStart("bad", [])))
    assert running.sup.children() == []
    assert not running.task.done()  # the supervisor itself is fine


async def test_a_failed_restart_counts_and_is_retried(supervise):
    log: list[str] = []
    built = 0

    class FlakyStart(Worker):
        async def on_start(self) -> None:
            await super().on_start()
            if self.incarnation == 2:
                raise ConnectionError("port still in use")

    def build() -> Worker:
        nonlocal built
        built += 1
        return FlakyStart("f", log, built)

    running = supervise([ChildSpec("f", build)])
    await running.sup.wait_started()
    ref = running.sup.ref("f")
    first = ref.actor
    ref.tell("crash")
    await running.next_restart(ref, first)
    assert await ref.ask("hi", timeout=1) == "f#3: hi"
    assert [type(error) for _, error in running.restarts] == [ValueError, ConnectionError]


async def test_cancelling_the_supervisor_still_stops_children_newest_first(supervise):
    log: list[str] = []
    running = supervise([spec("a", log), spec("b", log), spec("c", log)])
    await running.sup.wait_started()
    running.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running.task, 1)
    assert log[3:] == ["stop c", "stop b", "stop a"]


async def test_a_crash_noticed_during_shutdown_is_not_restarted(supervise):
    log: list[str] = []
    gate = asyncio.Event()
    entered = asyncio.Event()

    class SlowStart(Worker):
        async def on_start(self) -> None:
            entered.set()
            await gate.wait()
            await super().on_start()

    running = supervise([spec("a", log)])
    sup = running.sup
    await sup.wait_started()
    # Keep the supervisor busy starting a child while "a" crashes and a stop comes in.
    starting = asyncio.ensure_future(sup.start_child(ChildSpec("slow", lambda: SlowStart("slow", log))))
    await asyncio.wait_for(entered.wait(), 1)
    sup.ref("a").tell("crash")
    await sup.ref("a").actor.wait_stopped()
    sup.request_stop()
    gate.set()
    await asyncio.wait_for(sup.wait_stopped(), 1)
    await starting
    assert running.restarts == []
    assert log.count("start a") == 1
