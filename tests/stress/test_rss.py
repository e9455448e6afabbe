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

# Live MLX arrays beyond the KV caches: the precise check (flat: measured -22 KiB per
# request). The smallest array a turn could leak is bigger than this: one row of
# logits (196 KiB), a short request's KV (~1.8 MiB).
MAX_ARRAY_SLOPE = 16 * 1024
# The whole process less the KV: coarse, since malloc's arenas settle in steps of
# ~10 MB (measured 60-95 KiB per request over this window, levelling off over 1,500
# requests); a leaked KV cache per request would be 20x this.
MAX_SLOPE = float(os.environ.get("GREENROOM_STRESS_MAX_SLOPE", str(128 * 1024)))
QUESTIONS = ("What is 2+2?", "Name a fruit.", "Say yes.", "Pick a number.", "Name a planet.", "Say no.")


async def test_rss_stays_flat_over_a_thousand_short_requests(start_server):
    total, agents = scaled(1000, floor=100), 50
    # The agents' branches fill up in the first ~200 requests and malloc's arenas
    # settle by ~400: fit the line over what comes after.
    warmup = total * 2 // 5
    sample_every = max(1, total // 50)
    srv = start_server("--max-batch", "16")
    pid = srv.proc.pid
    tally = Tally("rss")
    samples: list[tuple[int, int, int, dict]] = []  # (requests done, RSS, resident KV bytes, MLX memory)
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
                samples.append((done, rss_bytes(pid), data["pool"]["resident_bytes"], data["memory"]))

    baseline = rss_bytes(pid)
    async with http_session() as http:
        await asyncio.gather(*(worker(http) for _ in range(16)))
    fitted = [sample for sample in samples if sample[0] > warmup]
    xs = [n for n, _, _, _ in fitted]
    raw = slope(xs, [rss for _, rss, _, _ in fitted])
    # The agents' KV caches (up to --branches each) are kept on purpose: what grows
    # beyond them is what would leak.
    net = slope(xs, [rss - kv for _, rss, kv, _ in fitted])
    # Live MLX arrays beyond the KV (a leaked array), and everything outside MLX
    # (Python objects, buffers): each should stay flat.
    arrays = slope(xs, [m["mlx_active_bytes"] - kv for _, _, kv, m in fitted])
    outside = slope(xs, [rss - m["mlx_active_bytes"] - m["mlx_cache_bytes"] for _, rss, _, m in fitted])
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
        mlx_active_end_mb=samples[-1][3]["mlx_active_bytes"] / 2**20,
        mlx_cache_end_mb=samples[-1][3]["mlx_cache_bytes"] / 2**20,
        slope_arrays_less_kv_bytes_per_request=arrays,
        slope_outside_mlx_bytes_per_request=outside,
    )
    assert tally.hangs == 0 and tally.bad == 0, tally.problems()
    assert tally.counts["ok"] == total, tally.problems()
    assert arrays < MAX_ARRAY_SLOPE, f"live MLX arrays beyond the KV grow {arrays / 1024:.1f} KiB per request"
    assert net < MAX_SLOPE, f"RSS less the KV caches grows {net / 1024:.1f} KiB per request"
