"""1,000 short requests from 50 agents: the server's memory stays flat. RSS is sampled
as the requests complete and a least-squares line fitted over the samples after a
warm-up (each agent's branches fill up to --branches in the first few hundred), less
the KV bytes the server keeps on purpose (/health's pool.resident_bytes); that slope,
in bytes per request, is bounded, and the raw RSS slope reported beside it."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.stress.client import Tally, chat, health, http_session, report, rss_bytes, scaled, slope, user

pytestmark = pytest.mark.stress

# A leak of this much per request is a leak: 1,000 requests would keep 50 MiB more.
MAX_SLOPE = float(os.environ.get("GREENROOM_STRESS_MAX_SLOPE", str(48 * 1024)))
QUESTIONS = ("What is 2+2?", "Name a fruit.", "Say yes.", "Pick a number.", "Name a planet.", "Say no.")


async def test_rss_stays_flat_over_a_thousand_short_requests(start_server):
    total, agents = scaled(1000, floor=100), 50
    warmup = total // 4
    sample_every = max(1, total // 50)
    srv = start_server("--max-batch", "16")
    pid = srv.proc.pid
    tally = Tally("rss")
    samples: list[tuple[int, int, int]] = []  # (requests done, RSS, resident KV bytes)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(total):
        queue.put_nowait(n)

    async def worker(http):
        while not queue.empty():
            n = queue.get_nowait()
            agent = f"steady-{n % agents}"
            question = QUESTIONS[(n // agents) % len(QUESTIONS)]
            tally.add(await chat(http, srv.url, user(f"{agent}: {question}"), agent, max_tokens=2, temperature=0))
            done = tally.counts["tried"]
            if done % sample_every == 0:
                _, data = await health(http, srv.url)
                samples.append((done, rss_bytes(pid), data["pool"]["resident_bytes"]))

    baseline = rss_bytes(pid)
    async with http_session() as http:
        await asyncio.gather(*(worker(http) for _ in range(16)))
    fitted = [sample for sample in samples if sample[0] > warmup]
    xs = [n for n, _, _ in fitted]
    raw = slope(xs, [rss for _, rss, _ in fitted])
    # The agents' KV caches (up to --branches each) are kept on purpose: what grows
    # beyond them is what would leak.
    net = slope(xs, [rss - kv for _, rss, kv in fitted])
    report(
        "rss",
        requests=total,
        agents=agents,
        **tally.figures(),
        rss_start_mb=baseline / 2**20,
        rss_after_warmup_mb=fitted[0][1] / 2**20,
        rss_end_mb=samples[-1][1] / 2**20,
        kv_end_mb=samples[-1][2] / 2**20,
        samples=len(fitted),
        slope_bytes_per_request=raw,
        slope_less_kv_bytes_per_request=net,
    )
    assert tally.hangs == 0 and tally.bad == 0, tally.problems()
    assert tally.counts["ok"] == total, tally.problems()
    assert net < MAX_SLOPE, f"RSS less the KV caches grows {net / 1024:.1f} KiB per request"
