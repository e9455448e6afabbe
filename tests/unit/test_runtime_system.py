"""The actor system: the root of the tree, its start, its shutdown and its failure."""

from __future__ import annotations

import asyncio

import pytest

from runtime.actor import Actor, ActorStopped
from runtime.supervision import ChildSpec, Escalation, Restart, RestartIntensity
from runtime.system import ActorSystem


class Recorder(Actor):
    """Logs "start X"/"stop X" into a shared list; "crash" raises; otherwise echoes."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(name)
        self.log = log

    async def on_start(self) -> None:
        self.log.append(f"start {self.name}")

    async def on_stop(self) -> None:
        self.log.append(f"stop {self.name}")

    async def handle(self, message: str) -> str:
        if message == "crash":
            raise ValueError(f"{self.name} crashed")
        return f"{self.name}: {message}"


def specs(log: list[str], *names: str, restart: Restart = Restart.PERMANENT) -> list[ChildSpec]:
    return [ChildSpec(name, lambda name=name: Recorder(name, log), restart) for name in names]


async def test_children_start_in_order_and_stop_in_reverse():
    log: list[str] = []
    async with ActorSystem(specs(log, "a", "b", "c")) as system:
        assert log == ["start a", "start b", "start c"]
        assert system.children() == ["a", "b", "c"]
        assert await system.ref("b").ask("hi", timeout=1) == "b: hi"
        log.clear()
    assert log == ["stop c", "stop b", "stop a"]
    assert system.failed is None
    assert await system.wait_failed() is None  # a clean shutdown is not a failure
    with pytest.raises(ActorStopped):
        system.ref("a").tell("hi")


async def test_escalation_is_reported_by_wait_failed_not_raised_out_of_the_block():
    log: list[str] = []
    system = ActorSystem(specs(log, "a", "b", "c"), intensity=RestartIntensity(max_restarts=1))
    async with system:
        system.ref("b").tell("crash")  # restarted (1 restart is allowed)
        async with asyncio.timeout(1):
            while log.count("start b") < 2:
                await asyncio.sleep(0.001)
        system.ref("b").tell("crash")  # a second restart within the period is one too many
        failure = await asyncio.wait_for(system.wait_failed(), 1)
        assert isinstance(failure, Escalation)
        assert "'b'" in str(failure) and "b crashed" in str(failure)
        assert isinstance(failure.__cause__, ValueError)
        assert system.failed is failure
        assert log[-2:] == ["stop c", "stop a"]  # the others, newest first
    # __aexit__ after a failure neither raises nor stops anything twice
    assert log.count("stop a") == 1 and log.count("stop c") == 1


async def test_a_child_failing_to_start_fails_the_enter():
    log: list[str] = []

    class Broken(Recorder):
        async def on_start(self) -> None:
            raise FileNotFoundError("model.safetensors")

    children = [*specs(log, "a"), ChildSpec("engine", lambda: Broken("engine", log)), *specs(log, "z")]
    with pytest.raises(Escalation, match="'engine' failed to start") as info:
        async with ActorSystem(children):
            pytest.fail("the body must not run")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert log == ["start a", "stop a"]


async def test_dynamic_children_through_the_system():
    log: list[str] = []
    async with ActorSystem(specs(log, "engine")) as system:
        [session] = specs(log, "session-1", restart=Restart.TRANSIENT)
        ref = await system.start_child(session)
        assert await ref.ask("hi", timeout=1) == "session-1: hi"
        assert system.ref("session-1") is ref
        await system.start_child(specs(log, "session-2", restart=Restart.TRANSIENT)[0])
        await system.stop_child("session-1")
        assert system.children() == ["engine", "session-2"]
        log.clear()
    assert log == ["stop session-2", "stop engine"]


async def test_shutdown_is_idempotent_and_refuses_new_work():
    log: list[str] = []
    async with ActorSystem(specs(log, "a", "b")) as system:
        await system.shutdown()
        await system.shutdown()
        assert log == ["start a", "start b", "stop b", "stop a"]
        with pytest.raises(ActorStopped):
            await system.ref("a").ask("hi", timeout=1)
        with pytest.raises(ActorStopped):
            await system.start_child(specs(log, "late")[0])
    assert log.count("stop a") == 1


async def test_an_error_in_the_block_propagates_unchanged_after_an_ordered_shutdown():
    log: list[str] = []
    with pytest.raises(KeyError, match="oops"):  # not an ExceptionGroup
        async with ActorSystem(specs(log, "a", "b")):
            raise KeyError("oops")
    assert log == ["start a", "start b", "stop b", "stop a"]


async def test_cancelling_the_owner_still_shuts_down_in_order():
    log: list[str] = []
    inside = asyncio.Event()

    async def serve() -> None:
        async with ActorSystem(specs(log, "a", "b", "c")):
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(serve())
    await asyncio.wait_for(inside.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert log[3:] == ["stop c", "stop b", "stop a"]


async def test_shutdown_gives_up_on_a_stuck_child_within_its_timeout():
    log: list[str] = []

    class Stuck(Recorder):
        async def handle(self, message: str) -> str:
            await asyncio.Event().wait()
            return ""

    children = [*specs(log, "a"), ChildSpec("stuck", lambda: Stuck("stuck", log))]
    async with ActorSystem(children) as system:
        system.ref("stuck").tell("hang")
        await asyncio.wait_for(system.shutdown(timeout=0.1), 1)  # not the spec's 10 s
    assert log == ["start a", "start stuck", "stop stuck", "stop a"]
