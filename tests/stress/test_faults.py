"""Restarts, swaps and faults while streams are in flight: `ctl restart scheduler`,
`ctl restart model`, an injected model-step fault, actor crashes, and `ctl swap` to a
tiny model and back. Every client gets a final event or a clean error (an error
event, a documented 5xx in OpenAI's shape), none hangs, and the server serves on."""

from __future__ import annotations

import asyncio

import pytest

from tests.stress.client import (
    HANG_S,
    Tally,
    chat,
    control,
    http_session,
    report,
    scaled,
    stream_chat,
    user,
    wait_idle,
)

pytestmark = pytest.mark.stress

STORY = "Tell me a long story about a dragon who learns to code, part {}."


async def disrupt(http, srv, name: str, command: tuple, streams: int, late: int = 0) -> tuple[Tally, dict]:
    """`streams` streams start, the command runs once one of them is decoding; `late`
    more requests arrive while it runs. (every client's tally, the command's answer)"""
    decoding = asyncio.Event()
    tasks = [
        asyncio.create_task(stream_chat(http, srv.url, user(STORY.format(i)), f"{name}-{i}", max_tokens=40,
                                        temperature=0.7, first_chunk=decoding))
        for i in range(streams)
    ]
    async with asyncio.timeout(HANG_S):
        await decoding.wait()
    cmd, args = command
    answer = asyncio.create_task(asyncio.to_thread(control, srv, cmd, **args))
    await asyncio.sleep(0.2)
    tasks += [
        asyncio.create_task(stream_chat(http, srv.url, user(f"Say hi, {name} {i}."), f"{name}-late-{i}", max_tokens=8, temperature=0))
        for i in range(late)
    ]
    tally = Tally(name)
    tally.extend(await asyncio.gather(*tasks))
    return tally, await answer


async def test_every_client_gets_a_final_event_through_restarts_swaps_and_faults(start_server, tiny_model):
    streams = scaled(12, floor=4)
    srv = start_server("--max-batch", "8", "--drain-timeout", "20", env={"GREENROOM_ENABLE_FAULTS": "1"})
    phases = [
        ("restart-scheduler", ("restart", {"actor": "scheduler"})),
        ("restart-model", ("restart", {"actor": "model"})),
        ("model-fault", ("fault", {"actor": "model"})),
        ("scheduler-crash", ("fault", {"actor": "scheduler-crash"})),
        ("model-crash", ("fault", {"actor": "model-crash"})),
        ("swap-tiny", ("swap", {"model": str(tiny_model), "drain_timeout": 3.0})),
        ("swap-back", ("swap", {"model": "default", "drain_timeout": 3.0})),
    ]
    tallies, after, answers = {}, {}, {}
    async with http_session() as http:
        for name, command in phases:
            tallies[name], answers[name] = await disrupt(http, srv, name, command, streams, late=3)
            idle = await wait_idle(http, srv.url)
            fresh = await chat(http, srv.url, user("Say hello."), f"fresh-{name}", max_tokens=4, temperature=0)
            after[name] = (idle.get("running"), idle.get("waiting"), fresh.kind, fresh.status)
            report(f"faults.{name}", **tallies[name].figures(), idle_after=after[name][:2], fresh_after=fresh.status,
                   command_ok=answers[name].get("ok"))
        final = await chat(http, srv.url, user("Say hello."), "fresh-final", max_tokens=4, temperature=0)
    total = Tally("faults")
    for tally in tallies.values():
        total.counts.update(tally.counts)
        total.statuses.update(tally.statuses)
        total.finishes.update(tally.finishes)
    report("faults", **total.figures(), server_alive=srv.proc.poll() is None)
    problems = {name: t.problems() for name, t in tallies.items() if t.hangs or t.bad}
    assert not problems, problems
    assert all(a == (0, 0, "ok", 200) for a in after.values()), after
    assert all(a.get("ok") for a in answers.values()), answers
    assert final.kind == "ok" and srv.proc.poll() is None
