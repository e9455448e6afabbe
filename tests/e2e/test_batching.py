"""Continuous batching, end to end: the real server, the real model, real sockets.

Every test here runs several requests at once and holds the scheduler to what a
user would notice: a batched reply is the reply the prompt gets alone, streams
never mix, a client that leaves frees its slot, each request keeps its own
sampling parameters, nobody starves behind a full batch, and /metrics says what
happened.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

MAX_TOKENS = 32
# Eight prompts whose greedy answers differ from each other from the first tokens.
PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that adds two numbers.",
    "Name the three primary colors.",
    "Write a haiku about the ocean.",
    "Translate 'good morning' into Spanish.",
    "List the days of the week.",
    "Explain what a black hole is in one sentence.",
    "Give me a recipe for pancakes.",
)
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=300)


def user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def fresh_agent(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str
    completion_tokens: int


# ---------------------------------------------------------------- HTTP helpers


async def chat(http: aiohttp.ClientSession, url: str, prompt: str, agent: str | None = None, **params) -> Reply:
    headers = {"X-Agent-Id": agent} if agent else {}
    body = {"model": "default", "messages": user(prompt), **params}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        data = await resp.json()
        assert resp.status == 200, data
    choice = data["choices"][0]
    return Reply(choice["message"]["content"], choice["finish_reason"], data["usage"]["completion_tokens"])


@dataclass
class Streamed:
    text: str = ""
    roles: list = field(default_factory=list)
    finish_reasons: list = field(default_factory=list)
    ids: set = field(default_factory=set)
    events_after_done: int = 0
    done: bool = False
    finished: bool = False  # the finish_reason chunk arrived


async def stream_chat(
    http: aiohttp.ClientSession, url: str, prompt: str, agent: str | None = None, progress: Streamed | None = None, **params
) -> Streamed:
    out = progress or Streamed()
    headers = {"X-Agent-Id": agent} if agent else {}
    body = {"model": "default", "messages": user(prompt), "stream": True, **params}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if out.done:
                out.events_after_done += 1
                continue
            if data == "[DONE]":
                out.done = True
                continue
            event = json.loads(data)
            assert "error" not in event, event
            out.ids.add(event["id"])
            for choice in event["choices"]:
                delta = choice["delta"]
                if "role" in delta:
                    out.roles.append(delta["role"])
                out.text += delta.get("content") or ""
                if choice["finish_reason"] is not None:
                    out.finish_reasons.append(choice["finish_reason"])
                    out.finished = True
    return out


async def get_json(http: aiohttp.ClientSession, url: str, path: str) -> dict:
    async with http.get(url + path) as resp:
        return await resp.json()


# ---------------------------------------------------------------- Prometheus text

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
_TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$")
_HELP = re.compile(r"^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .+$")


@dataclass
class Metrics:
    samples: dict[str, float]
    types: dict[str, str]
    helps: set[str]

    def __getitem__(self, key: str) -> float:
        return self.samples[key]

    def bucket(self, name: str, le: str) -> float:
        return self.samples[f'{name}_bucket{{le="{le}"}}']

    def steps_with_at_least(self, k: int) -> float:
        """Model steps whose batch held k sequences or more (batch buckets are 1..max_batch)."""
        count = self.samples["greenroom_batch_size_count"]
        return count if k <= 1 else count - self.bucket("greenroom_batch_size", str(k - 1))


def parse_metrics(text: str) -> Metrics:
    samples, types, helps = {}, {}, set()
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            if m := _TYPE.match(line):
                assert m.group(1) not in types, f"TYPE twice: {line}"
                types[m.group(1)] = m.group(2)
            elif m := _HELP.match(line):
                helps.add(m.group(1))
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} before (or without) its # TYPE line"
        samples[name + labels] = float(value)
    return Metrics(samples, types, helps)


async def fetch_metrics(http: aiohttp.ClientSession, url: str) -> Metrics:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse_metrics(await resp.text())


def sync_metrics(server) -> Metrics:
    status, text = server.get("/metrics")
    assert status == 200
    return parse_metrics(text)


async def wait_idle(http, url: str, deadline_s: float = 10.0) -> dict:
    """Poll /health until nothing runs or waits; returns the last health."""
    deadline = time.monotonic() + deadline_s
    while True:
        health = await get_json(http, url, "/health")
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        assert time.monotonic() < deadline, f"server still busy after {deadline_s}s: {health}"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def alone(server) -> dict[str, Reply]:
    """Each prompt's greedy reply with nothing else on the model (one at a time, no agent id)."""
    replies = {}
    for prompt in PROMPTS:
        status, health = server.get("/health")
        assert health["running"] == 0 and health["waiting"] == 0, health
        status, body = server.chat(user(prompt), temperature=0, max_tokens=MAX_TOKENS)
        assert status == 200, body
        choice = body["choices"][0]
        replies[prompt] = Reply(choice["message"]["content"], choice["finish_reason"], body["usage"]["completion_tokens"])
    texts = [r.text for r in replies.values()]
    # Precondition of every comparison below: the answers tell the prompts apart.
    assert len(set(texts)) == len(texts), texts
    return replies


# ---------------------------------------------------------------- the tests


async def test_greedy_reply_is_identical_alone_and_in_a_batch_of_eight(server, alone):
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        before = await fetch_metrics(http, server.url)
        replies = await asyncio.gather(
            *(
                # Half the prompts as named agents, half in one-off sessions.
                chat(http, server.url, p, agent=fresh_agent("batch8") if i % 2 else None, temperature=0, max_tokens=MAX_TOKENS)
                for i, p in enumerate(PROMPTS)
            )
        )
        after = await fetch_metrics(http, server.url)

    # They really shared the model: some steps ran all eight sequences together.
    assert after.steps_with_at_least(len(PROMPTS)) - before.steps_with_at_least(len(PROMPTS)) > 0
    for prompt, reply in zip(PROMPTS, replies):
        assert reply == alone[prompt], prompt


async def test_eight_concurrent_streams_each_get_their_own_complete_reply(server, alone):
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        before = await fetch_metrics(http, server.url)
        streams = await asyncio.gather(
            *(
                stream_chat(http, server.url, p, agent=fresh_agent("stream8"), temperature=0, max_tokens=MAX_TOKENS)
                for p in PROMPTS
            )
        )
        after = await fetch_metrics(http, server.url)

    assert after.steps_with_at_least(len(PROMPTS)) - before.steps_with_at_least(len(PROMPTS)) > 0
    all_ids = set()
    for prompt, s in zip(PROMPTS, streams):
        assert s.text == alone[prompt].text, prompt  # nobody else's tokens, none missing
        assert s.roles == ["assistant"]
        assert s.finish_reasons == [alone[prompt].finish_reason]
        assert s.done and s.events_after_done == 0
        assert len(s.ids) == 1  # one completion id throughout the stream
        all_ids |= s.ids
    assert len(all_ids) == len(PROMPTS)


async def _raw_stream_until(port: int, body: dict, content_chunks: int, agent: str | None):
    """Open a raw HTTP/1.1 connection, start a streaming chat and return once
    `content_chunks` text deltas arrived; the caller closes the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        + (f"X-Agent-Id: {agent}\r\n" if agent else "")
        + "Connection: close\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    await writer.drain()
    received = b""
    while received.count(b'"delta":{"content":') < content_chunks:
        chunk = await asyncio.wait_for(reader.read(65536), 120)
        assert chunk, f"the server ended the stream early: {received[-500:]!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert b"finish_reason\":\"" not in received  # still mid-stream
    return reader, writer


@pytest.mark.parametrize("victim_agent", [None, "named"], ids=["one-off-session", "named-agent"])
async def test_disconnected_stream_frees_its_slot_and_others_are_unaffected(server, alone, victim_agent):
    # Three neighbours whose alone reply ran the full MAX_TOKENS, so none of them can
    # leave the batch early and be mistaken for the one that disconnected.
    neighbours = [p for p in PROMPTS if alone[p].finish_reason == "length"][:3]
    assert len(neighbours) == 3, alone
    victim_body = {
        "model": "default",
        "messages": user("Write a very long story about a dragon who learns to program computers."),
        "temperature": 0,
        "max_tokens": 1000,  # far more than the neighbours: it would outlive them if not freed
        "stream": True,
    }
    agent = fresh_agent("leaver") if victim_agent else None

    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        progress = [Streamed() for _ in neighbours]
        victim = asyncio.create_task(_raw_stream_until(server.port, victim_body, 3, agent))
        tasks = [
            asyncio.create_task(
                stream_chat(http, server.url, p, agent=fresh_agent("stayer"), progress=s, temperature=0, max_tokens=MAX_TOKENS)
            )
            for p, s in zip(neighbours, progress)
        ]
        reader, writer = await victim
        # Everyone is in the batch before the victim leaves.
        deadline = time.monotonic() + 30
        while (await get_json(http, server.url, "/health"))["running"] < 4:
            assert not any(s.finished for s in progress), "a neighbour finished before all four ran"
            assert time.monotonic() < deadline, "the four streams never ran together"
            await asyncio.sleep(0.02)

        at_close = await fetch_metrics(http, server.url)
        writer.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 60  # only against a hang: the bound that matters is in steps
        while True:
            now = await fetch_metrics(http, server.url)
            if now["greenroom_running_sequences"] <= 3:
                break
            assert time.monotonic() < deadline, "the slot was never freed"
            await asyncio.sleep(0.02)
        # Freed at a step boundary right after the server saw the socket close: the step
        # in flight when it closed, the next one (planned before the cancel could arrive),
        # then the one that takes it out; one more for the close to reach the server.
        steps = now["greenroom_batch_size_count"] - at_close["greenroom_batch_size_count"]
        assert steps <= 4, f"the slot was freed only {steps:g} steps after the client left"
        # The one that left the batch is the victim: every neighbour is still streaming.
        assert not any(s.finished for s in progress), [s.text for s in progress]

        streams = await asyncio.gather(*tasks)
        for prompt, s in zip(neighbours, streams):
            assert s.text == alone[prompt].text, prompt
            assert s.finish_reasons == [alone[prompt].finish_reason] and s.done
        # Nothing of the 1000-token victim lingers once the neighbours are done.
        await wait_idle(http, server.url, deadline_s=5)
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (ConnectionError, TimeoutError):
            pass


async def test_each_request_keeps_its_own_sampling_parameters_inside_a_batch(server, alone):
    greedy_p, seeded_p, short_p, stop_p = PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]
    seeded = dict(temperature=1.0, seed=4242, max_tokens=30)
    short = dict(temperature=0, max_tokens=3)
    full = alone[stop_p].text
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    assert stop.strip(), full
    expected_stopped = full[: full.index(stop)]

    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        seeded_alone = await chat(http, server.url, seeded_p, **seeded)
        short_alone = await chat(http, server.url, short_p, **short)
        # Sampling at temperature 1 really departs from greedy for this prompt and seed.
        assert seeded_alone.text != alone[seeded_p].text

        before = await fetch_metrics(http, server.url)
        greedy_r, seeded_r, seeded_twin, short_r, stop_r = await asyncio.gather(
            chat(http, server.url, greedy_p, agent=fresh_agent("mix"), temperature=0, max_tokens=MAX_TOKENS),
            chat(http, server.url, seeded_p, agent=fresh_agent("mix"), **seeded),
            chat(http, server.url, seeded_p, **seeded),  # same seed in the same batch: own PRNG key each
            chat(http, server.url, short_p, agent=fresh_agent("mix"), **short),
            chat(http, server.url, stop_p, temperature=0, max_tokens=MAX_TOKENS, stop=[stop]),
        )
        after = await fetch_metrics(http, server.url)

    assert after.steps_with_at_least(4) - before.steps_with_at_least(4) > 0
    assert greedy_r == alone[greedy_p]
    assert seeded_r == seeded_alone
    assert seeded_twin == seeded_alone
    assert short_r == short_alone
    assert short_r.completion_tokens == 3 and short_r.finish_reason == "length"
    assert stop_r.text == expected_stopped
    assert stop_r.finish_reason == "stop"


async def test_small_batch_admits_waiting_requests_without_starving_any(fresh_server, alone):
    srv = fresh_server("--max-batch", "2", "--no-persist")
    prompts = PROMPTS[:5]
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        before = await fetch_metrics(http, srv.url)
        peak = {"running": 0, "waiting": 0}
        finished = asyncio.Event()

        async def watch():
            while not finished.is_set():
                health = await get_json(http, srv.url, "/health")
                for k in peak:
                    peak[k] = max(peak[k], health[k])
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            replies = await asyncio.gather(
                *(chat(http, srv.url, p, temperature=0, max_tokens=16) for p in prompts)
            )
        finally:
            finished.set()
            await watcher
        after = await fetch_metrics(http, srv.url)
        await wait_idle(http, srv.url)

    # Everyone got a full reply, and it is the start of the same prompt's reply alone.
    for prompt, reply in zip(prompts, replies):
        assert reply.completion_tokens > 0
        assert alone[prompt].text.startswith(reply.text), (prompt, reply.text)
        if alone[prompt].completion_tokens > 16:
            assert reply.finish_reason == "length" and reply.completion_tokens == 16
    # The batch never exceeded two, so three requests had to queue.
    assert peak["running"] == 2
    assert peak["waiting"] >= 1
    assert after.steps_with_at_least(3) == before.steps_with_at_least(3)
    assert after.steps_with_at_least(2) - before.steps_with_at_least(2) > 0
    assert after["greenroom_waiting_sequences"] == 0 and after["greenroom_running_sequences"] == 0
    waits = after["greenroom_queue_wait_seconds_count"] - before["greenroom_queue_wait_seconds_count"]
    assert waits == len(prompts)  # each admitted exactly once
    first = "0.01"  # smallest queue-wait bucket: the three that queued waited out a whole turn
    queued = waits - (after.bucket("greenroom_queue_wait_seconds", first) - before.bucket("greenroom_queue_wait_seconds", first))
    assert queued >= len(prompts) - 2
    assert after["greenroom_turns_finished_total"] - before["greenroom_turns_finished_total"] == len(prompts)


async def test_metrics_are_prometheus_text_and_move_with_a_request(server):
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        await wait_idle(http, server.url)
        before = await fetch_metrics(http, server.url)
        async with http.post(
            server.url + "/v1/chat/completions",
            json={"model": "default", "messages": user("Say hello."), "temperature": 0, "max_tokens": 8},
        ) as resp:
            assert resp.status == 200
            usage = (await resp.json())["usage"]
        after = await fetch_metrics(http, server.url)

    expected = {
        "greenroom_running_sequences": "gauge",
        "greenroom_waiting_sequences": "gauge",
        "greenroom_batch_size": "histogram",
        "greenroom_prefill_tokens_total": "counter",
        "greenroom_decode_tokens_total": "counter",
        "greenroom_prefill_tokens_per_second": "gauge",
        "greenroom_decode_tokens_per_second": "gauge",
        "greenroom_time_to_first_token_seconds": "histogram",
        "greenroom_queue_wait_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert after.types.get(name) == kind, name
        assert name in after.helps, name
    for name, kind in after.types.items():
        if kind != "histogram":
            continue
        buckets = [(k, v) for k, v in after.samples.items() if k.startswith(name + "_bucket{")]
        bounds = [float(re.search(r'le="([^"]+)"', k).group(1)) for k, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, name
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name} buckets are not cumulative"
        assert counts[-1] == after[name + "_count"], name
        assert name + "_sum" in after.samples

    def delta(key: str) -> float:
        return after[key] - before[key]

    assert usage["completion_tokens"] > 0
    assert delta("greenroom_decode_tokens_total") == usage["completion_tokens"]
    assert 0 < delta("greenroom_prefill_tokens_total") <= usage["prompt_tokens"]
    assert delta("greenroom_time_to_first_token_seconds_count") == 1
    assert delta("greenroom_time_to_first_token_seconds_sum") > 0
    assert delta("greenroom_queue_wait_seconds_count") == 1
    assert delta("greenroom_batch_size_count") >= usage["completion_tokens"]
    assert delta("greenroom_turns_finished_total") == 1
    assert after["greenroom_decode_tokens_per_second"] > 0
    assert after["greenroom_prefill_tokens_per_second"] > 0
    assert after["greenroom_running_sequences"] == 0
    assert after["greenroom_waiting_sequences"] == 0


async def test_unconstrained_replies_are_identical_beside_constrained_neighbours(server, alone):
    """Four greedy prompts share the batch with four whose output follows a JSON schema
    (a token mask per sequence inside the batched step): the unconstrained ones' replies
    are exactly their replies alone."""
    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    constrained = {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        before = await fetch_metrics(http, server.url)
        replies = await asyncio.gather(
            *(
                chat(http, server.url, p, temperature=0, max_tokens=MAX_TOKENS, **(constrained if i % 2 else {}))
                for i, p in enumerate(PROMPTS)
            )
        )
        after = await fetch_metrics(http, server.url)
    assert after.steps_with_at_least(len(PROMPTS)) - before.steps_with_at_least(len(PROMPTS)) > 0
    for i, (prompt, reply) in enumerate(zip(PROMPTS, replies)):
        if i % 2 == 0:
            assert reply == alone[prompt], prompt
        elif reply.finish_reason == "stop":  # a complete constrained reply parses and fits the schema
            data = json.loads(reply.text)
            assert set(data) == {"answer", "confidence"} and isinstance(data["answer"], str)
        else:
            assert reply.text.startswith("{"), reply
