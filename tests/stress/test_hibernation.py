"""Hibernation churn: 50 agents take turns, interleaved, under a KV budget that holds
only a few of them, so sessions go to disk and come back all the time. Every reply
is a 200 and every agent's cache is found again on its next turn."""

from __future__ import annotations

import asyncio
import random
import re

import pytest

from tests.stress.client import Tally, chat, http_session, report, scaled, user, wait_idle

pytestmark = pytest.mark.stress

COLORS = ("red", "blue", "green", "yellow", "purple", "orange")


async def test_hibernation_churn_restores_every_saved_cache(start_server):
    agents, turns = scaled(50, floor=10), 3
    # ~2-5 MB of KV per agent here: a 12 MiB budget keeps a handful resident.
    srv = start_server("--cache-budget", "12M", "--max-batch", "8")
    histories = {f"churn-{i}": [] for i in range(agents)}
    tally, cold_followups = Tally("hibernation"), []
    gate = asyncio.Semaphore(10)
    rng = random.Random(7)

    async def turn(agent: str, k: int):
        history = histories[agent] + user(f"{agent}, turn {k}: name a {COLORS[k % len(COLORS)]} thing.")
        async with gate:
            outcome = await chat(http, srv.url, history, agent, max_tokens=6, temperature=0)
        tally.add(outcome)
        if outcome.kind == "ok":
            histories[agent] = history + [{"role": "assistant", "content": outcome.text}]
            if k > 0 and outcome.cached_tokens == 0:
                cold_followups.append(agent)

    async with http_session() as http:
        for k in range(turns):
            order = list(histories)
            rng.shuffle(order)
            await asyncio.gather(*(turn(agent, k) for agent in order))
        idle = await wait_idle(http, srv.url)
    log = srv.log()
    hibernated = len(re.findall(r"hibernated churn-", log))
    restored = len(re.findall(r"restored churn-\S+: [1-9]", log))
    report(
        "hibernation",
        agents=agents,
        turns_each=turns,
        **tally.figures(),
        hibernations=hibernated,
        restores=restored,
        cold_followups=len(cold_followups),
        hibernated_now=idle["pool"].get("hibernated_sessions"),
    )
    assert tally.hangs == 0 and tally.bad == 0, tally.problems()
    assert tally.counts["ok"] == agents * turns, tally.problems()  # every reply a 200
    assert hibernated > agents // 2, "the small budget should have sent most agents to disk"
    assert restored > 0
    assert cold_followups == [], f"agents whose saved cache was not found again: {cold_followups}"
