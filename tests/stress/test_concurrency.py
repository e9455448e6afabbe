"""32+ agents streaming at once, with clients that leave mid-stream, agents sending
overlapping turns and a slow reader: every turn ends, the server goes back to idle
(running and waiting 0), its memory back near where it was, and answers promptly."""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from tests.stress.client import (
    Tally,
    chat,
    health,
    http_session,
    report,
    rss_bytes,
    scaled,
    stream_chat,
    user,
    wait_idle,
)

pytestmark = pytest.mark.stress

TOPICS = ("the sea", "a lighthouse", "a robot", "a garden", "winter", "a train", "the moon", "a city")
# A fresh request on an idle server answers within this (a handful of tokens).
PROMPT_S = float(os.environ.get("GREENROOM_STRESS_PROMPT_S", "30"))
# RSS after the disrupted round may exceed the warm round's by at most this.
RSS_SLACK = int(os.environ.get("GREENROOM_STRESS_RSS_SLACK_MB", "200")) << 20


def kv_bytes(health: dict) -> int:
    """The KV cache bytes the server holds on purpose (the sessions' and the prefix pool's)."""
    return health["pool"]["resident_bytes"]


def prompt(i: int) -> list[dict]:
    return user(f"Agent {i}: write four short sentences about {TOPICS[i % len(TOPICS)]}.")


async def one_round(http, url: str, agents: int, rng: random.Random | None) -> tuple[list, dict]:
    """Every agent streams one turn at once. With `rng`, the round is disrupted: a
    quarter of the clients leave after a few chunks, three agents send a second,
    overlapping turn, and one client reads very slowly."""
    jobs, roles = [], {}
    for i in range(agents):
        agent, kw = f"crowd-{i}", {"max_tokens": 16}
        role = "plain"
        if rng is not None and i % 4 == 1:
            role, kw = "leaver", {"max_tokens": 64, "leave_after": rng.randint(1, 4)}
        elif rng is not None and i == agents - 1:
            role, kw = "slow", {"max_tokens": 24, "read_delay": 0.3}
        jobs.append(stream_chat(http, url, prompt(i), agent, temperature=0.7, **kw))
        roles[len(jobs) - 1] = role
        if rng is not None and i in (0, 2, 4):  # the same agent, a second turn at once
            jobs.append(stream_chat(http, url, prompt(i + 100), agent, temperature=0.7, max_tokens=16))
            roles[len(jobs) - 1] = "overlap"
    outcomes = await asyncio.gather(*jobs)
    by_role: dict[str, list] = {}
    for index, outcome in enumerate(outcomes):
        by_role.setdefault(roles[index], []).append(outcome)
    return outcomes, by_role


async def test_many_streaming_agents_with_leavers_overlaps_and_a_slow_reader(start_server):
    agents = scaled(32, floor=8)
    srv = start_server("--max-batch", "16")
    pid = srv.proc.pid
    async with http_session() as http:
        warm = Tally("warm")
        warm.extend((await one_round(http, srv.url, agents, None))[0])
        warm_idle = await wait_idle(http, srv.url)
        baseline = rss_bytes(pid)

        tally = Tally("concurrency")
        started = time.monotonic()
        outcomes, by_role = await one_round(http, srv.url, agents, random.Random(13))
        round_s = time.monotonic() - started
        tally.extend(outcomes)
        idle = await wait_idle(http, srv.url)
        after = rss_bytes(pid)

        t0 = time.monotonic()
        fresh = await chat(http, srv.url, user("Say hello."), "fresh-one", max_tokens=4, temperature=0)
        fresh_s = time.monotonic() - t0
        status, _ = await health(http, srv.url)

    slow = by_role["slow"][0]
    plain_s = sorted(o.seconds for o in by_role["plain"])
    report(
        "concurrency",
        agents=agents,
        requests=tally.counts["tried"],
        **tally.figures(),
        warm_round=warm.figures(),
        leavers=len(by_role.get("leaver", [])),
        overlapping=len(by_role.get("overlap", [])),
        slow_reader_s=slow.seconds,
        plain_median_s=plain_s[len(plain_s) // 2],
        round_s=round_s,
        running=idle.get("running"),
        waiting=idle.get("waiting"),
        rss_baseline_mb=baseline / 2**20,
        rss_after_mb=after / 2**20,
        kv_baseline_mb=kv_bytes(warm_idle) / 2**20,
        kv_after_mb=kv_bytes(idle) / 2**20,
        fresh_s=fresh_s,
    )
    assert warm.hangs == 0 and warm.bad == 0, warm.problems()
    assert tally.hangs == 0, tally.problems()
    assert tally.bad == 0, tally.problems()
    # Only the clients that left on purpose end without a reply; the others all finish.
    assert all(o.kind == "ok" for role, group in by_role.items() if role != "leaver" for o in group), tally.problems()
    assert all(o.error == "left on purpose" for o in by_role.get("leaver", []))
    assert slow.kind == "ok" and slow.finish in ("stop", "length")
    assert (idle.get("running"), idle.get("waiting")) == (0, 0), idle
    # The KV caches the agents keep are meant to stay; everything else must be back.
    growth = (after - kv_bytes(idle)) - (baseline - kv_bytes(warm_idle))
    assert growth < RSS_SLACK, f"RSS less resident KV grew {growth / 2**20:.0f} MiB over the warm round's"
    assert status == 200
    assert fresh.kind == "ok" and fresh_s < PROMPT_S, (fresh, fresh_s)
