"""kill -9 of the server in the middle of a load, then a restart on the same cache
dir, 20 times: no file is ever torn or moved aside as .corrupt, every agent file
loads with all its blocks, and an agent whose save finished before the kill starts
its next turn from the disk (cached_tokens > 0)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

import pytest

from tests.stress.client import Tally, chat, http_session, report, scaled, user

pytestmark = pytest.mark.stress

# Long enough to fill a few 64-token blocks, unique from its first words (so an
# agent's cached tokens can only come from its own file, not a shared prefix).
SYSTEM = (
    "You are {agent}, the assistant of one developer. Answer in one short sentence. "
    "The developer works on a Python web server, writes tests with pytest, reviews "
    "pull requests every morning, keeps a changelog, and prefers small functions with "
    "clear names over comments. Never use lists. Never repeat the question. If you do "
    "not know something, say so plainly. Numbers are written as digits."
)


class StoreWarnings(logging.Handler):
    """Collects the block store's warnings (a discarded file, a cut branch)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def corrupt_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "kv").rglob("*") if p.name.endswith(".corrupt"))


def check_store(cache_dir: Path) -> tuple[set[str], list[str]]:
    """With the server dead: (agents whose file loads whole, problems found). Opening the
    store is what the next server start does anyway (sweep temp files, index headers)."""
    from actors.blockstore import BlockStore
    from actors.prefix_pool import BLOCK_TOKENS

    problems = [f"quarantined before open: {p.name}" for p in corrupt_files(cache_dir)]
    tags = [d for d in (cache_dir / "kv").iterdir() if d.is_dir()] if (cache_dir / "kv").is_dir() else []
    loadable: set[str] = set()
    warnings = StoreWarnings()
    logger = logging.getLogger("greenroom.blockstore")
    logger.addHandler(warnings)
    try:
        for tag_dir in tags:
            store = BlockStore(cache_dir / "kv", tag_dir.name, block_tokens=BLOCK_TOKENS)
            for agent in store.agents():
                saved = store.load_agent(agent)
                if saved is None or not saved.branches:
                    problems.append(f"{agent}: its file does not load")
                    continue
                keys = {k for b in saved.branches for k in b.block_keys}
                blocks = store.load_blocks(keys) if keys else {}
                if set(blocks) != keys:
                    problems.append(f"{agent}: {len(keys - set(blocks))} of {len(keys)} blocks missing")
                    continue
                for b in saved.branches:
                    tail = len(b.tokens) - BLOCK_TOKENS * len(b.block_keys)
                    if (b.tail.shape[3] if b.tail is not None else 0) != tail:
                        problems.append(f"{agent}: a tail of the wrong length")
                loadable.add(agent)
    finally:
        logger.removeHandler(warnings)
    problems += [f"store warning: {m}" for m in warnings.messages]
    problems += [f"quarantined at open: {p.name}" for p in corrupt_files(cache_dir)]
    return loadable, problems


async def test_kill_9_mid_load_never_tears_a_file_and_agents_resume(start_server, tmp_path):
    cycles, agents = scaled(20, floor=3), 6
    cache_dir = tmp_path / "cache"
    names = [f"killed-{i}" for i in range(agents)]
    histories = {a: [{"role": "system", "content": SYSTEM.format(agent=a)}] for a in names}
    rng = random.Random(9)
    tally = Tally("kill9")
    resumable: set[str] = set()
    resumed, not_resumed, problems, files_checked = 0, [], [], 0

    async def turn(http, url, agent, k):
        history = histories[agent] + user(f"Question {k}: what should I test next?")
        outcome = await chat(http, url, history, agent, max_tokens=6, temperature=0, timeout=120)
        if outcome.kind == "ok":
            histories[agent] = history + [{"role": "assistant", "content": outcome.text}]
        return outcome

    async def keep_busy(http, url, agent, cycle):
        k = 0
        while True:  # until the server dies under it
            outcome = await turn(http, url, agent, f"{cycle}.{k}")
            if outcome.kind != "ok":
                return
            k += 1

    started = time.monotonic()
    for cycle in range(cycles):
        srv = start_server("--max-batch", "8", cache_dir=cache_dir)
        async with http_session() as http:
            firsts = await asyncio.gather(*(turn(http, srv.url, a, f"{cycle}.start") for a in names))
            tally.extend(firsts)
            for agent, outcome in zip(names, firsts):
                if agent in resumable:
                    if outcome.kind == "ok" and outcome.cached_tokens > 0:
                        resumed += 1
                    else:
                        not_resumed.append((cycle, agent, outcome.kind, outcome.cached_tokens))
            load = [asyncio.create_task(keep_busy(http, srv.url, a, cycle)) for a in names]
            await asyncio.sleep(rng.uniform(0.2, 3.0))
            srv.kill()  # SIGKILL, mid-load: turns running, saves being written
            await asyncio.gather(*load)
        loadable, found = check_store(cache_dir)
        files_checked += len(loadable)
        problems += [f"cycle {cycle}: {p}" for p in found]
        resumable = loadable & set(names)
    elapsed = time.monotonic() - started
    report(
        "kill9",
        cycles=cycles,
        agents=agents,
        seconds=elapsed,
        first_turns=tally.figures(),
        agent_files_checked=files_checked,
        torn_or_quarantined=len(problems),
        resumed=resumed,
        not_resumed=len(not_resumed),
    )
    assert tally.hangs == 0 and tally.bad == 0, tally.problems()
    assert problems == [], problems[:10]
    assert not_resumed == [], not_resumed[:10]
    assert resumed > 0, "no agent ever had a whole file on disk at a kill"
