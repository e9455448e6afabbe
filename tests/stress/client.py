"""What every stress scenario needs from outside the server: clients that never wait
without a deadline and say how each request ended, a tally, RSS samples and a fit.

A request ends in one of four ways (`Outcome.kind`):
  "ok"     a 200 with its final event (finish_reason / [DONE], or a whole JSON reply)
  "clean"  a clean error: a 4xx/5xx JSON body in the API's error shape, or an SSE error
           event, or the client left on purpose (a scheduled disconnect)
  "hang"   the client-side deadline passed with no final event
  "bad"    anything else: a 5xx that is not a documented clean error, a dropped
           connection, a stream that ended without a final event
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

# How long one short request may take before it counts as a hang. Generous: the
# shared 2-core machine is slow, but a turn of a few tokens never needs this long.
HANG_S = float(os.environ.get("GREENROOM_STRESS_HANG_S", "180"))

# Scale factor for every scenario's request counts (1.0 = what the issue asks for).
SCALE = float(os.environ.get("GREENROOM_STRESS_SCALE", "1"))


def scaled(n: int, floor: int = 1) -> int:
    return max(floor, round(n * SCALE))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@dataclass
class Outcome:
    kind: str  # ok | clean | hang | bad
    status: int | None = None
    finish: str | None = None
    error: str | None = None
    text: str = ""
    usage: dict | None = None
    chunks: int = 0
    seconds: float = 0.0

    @property
    def cached_tokens(self) -> int:
        return ((self.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def _openai_error(body) -> str | None:
    """The message of an OpenAI-shaped error body, else None."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and isinstance(body["error"].get("message"), str):
        return body["error"]["message"]
    return None


# Statuses a request may get that are documented clean errors, not server faults:
# 500 is a failed model step ("generation failed"), 503 a drain/swap/busy refusal.
CLEAN_STATUSES = {429, 500, 503}


async def chat(http: aiohttp.ClientSession, url: str, messages, agent: str | None = None, *,
               timeout: float = HANG_S, **params) -> Outcome:
    """One non-streamed chat completion with a deadline."""
    headers = {"X-Agent-Id": agent} if agent else {}
    body = {"model": "default", "messages": messages, **params}
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
    except TimeoutError:
        return Outcome("hang", error=f"no reply in {timeout:.0f}s", seconds=time.monotonic() - started)
    except aiohttp.ClientError as exc:
        return Outcome("bad", error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)
    seconds = time.monotonic() - started
    try:
        data = json.loads(raw)
    except ValueError:
        return Outcome("bad", status, error=f"not JSON: {raw[:200]!r}", seconds=seconds)
    if status == 200:
        choice = data["choices"][0]
        return Outcome("ok", status, choice["finish_reason"], None, choice["message"]["content"] or "",
                       data.get("usage"), seconds=seconds)
    message = _openai_error(data)
    kind = "clean" if message is not None and (status < 500 or status in CLEAN_STATUSES) else "bad"
    return Outcome(kind, status, error=message or repr(data)[:200], seconds=seconds)


async def stream_chat(http: aiohttp.ClientSession, url: str, messages, agent: str | None = None, *,
                      timeout: float = HANG_S, leave_after: int | None = None, read_delay: float = 0.0,
                      first_chunk: asyncio.Event | None = None, **params) -> Outcome:
    """One streamed chat completion with a deadline. `leave_after`: disconnect after that
    many content chunks (a client that goes away mid-stream); `read_delay`: sleep that
    long before reading each line (a slow reader); `first_chunk`: set once a content
    chunk arrived (the turn is decoding)."""
    headers = {"X-Agent-Id": agent} if agent else {}
    body = {"model": "default", "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}, **params}
    out = Outcome("bad")
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
                out.status = resp.status
                if resp.status != 200:
                    data = json.loads(await resp.read())
                    out.error = _openai_error(data) or repr(data)[:200]
                    out.kind = "clean" if _openai_error(data) and (resp.status < 500 or resp.status in CLEAN_STATUSES) else "bad"
                    return out
                await _read_stream(resp, out, leave_after, read_delay, first_chunk)
    except TimeoutError:
        out.kind, out.error = "hang", f"no final event in {timeout:.0f}s ({out.chunks} chunks read)"
    except (aiohttp.ClientError, ValueError) as exc:
        out.kind, out.error = "bad", f"{type(exc).__name__}: {exc}"
    finally:
        out.seconds = time.monotonic() - started
    return out


async def _read_stream(resp, out: Outcome, leave_after: int | None, read_delay: float,
                       first_chunk: asyncio.Event | None) -> None:
    done_marker = False
    while True:
        if read_delay:
            await asyncio.sleep(read_delay)
        raw = await resp.content.readline()
        if not raw:
            break
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done_marker = True
            continue
        event = json.loads(data)
        if "error" in event:
            out.error = _openai_error(event) or repr(event)[:200]
            continue
        if event.get("usage"):
            out.usage = event["usage"]
        for choice in event.get("choices", []):
            out.text += choice["delta"].get("content") or ""
            out.finish = choice.get("finish_reason") or out.finish
            out.chunks += 1
            if first_chunk is not None:
                first_chunk.set()
        if leave_after is not None and out.chunks >= leave_after:
            resp.close()  # gone mid-stream, on purpose
            out.kind = "clean"
            out.error = "left on purpose"
            return
    if out.error is not None:  # an error event: the server ended the turn in the API's shape
        out.kind = "clean"
    elif done_marker and out.finish is not None:
        out.kind = "ok"
    else:
        out.kind, out.error = "bad", f"the stream ended without a final event ({out.chunks} chunks)"


# ---------------------------------------------------------------- figures


@dataclass
class Tally:
    """Requests tried / completed / clean errors / hangs / bad, with examples of each."""

    name: str
    counts: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    finishes: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, outcome: Outcome) -> Outcome:
        self.counts["tried"] += 1
        self.counts[outcome.kind] += 1
        if outcome.status is not None:
            self.statuses[outcome.status] += 1
        if outcome.finish is not None:
            self.finishes[outcome.finish] += 1
        if outcome.kind != "ok":
            self.examples.setdefault(outcome.kind, []).append((outcome.status, outcome.error))
        return outcome

    def extend(self, outcomes) -> None:
        for outcome in outcomes:
            self.add(outcome)

    @property
    def hangs(self) -> int:
        return self.counts["hang"]

    @property
    def bad(self) -> int:
        return self.counts["bad"]

    def figures(self) -> dict:
        c = self.counts
        return {"tried": c["tried"], "completed": c["ok"], "clean_errors": c["clean"], "hangs": c["hang"],
                "bad": c["bad"], "statuses": dict(sorted(self.statuses.items())),
                "finish": dict(sorted(self.finishes.items()))}

    def problems(self) -> str:
        return "; ".join(f"{kind}: {examples[:5]}" for kind, examples in self.examples.items() if kind != "clean")


def report(name: str, **figures) -> None:
    """One line of figures per scenario, easy to grep from `make stress` output."""
    text = " ".join(f"{key}={_fmt(value)}" for key, value in figures.items())
    print(f"\nSTRESS {name}: {text}", flush=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


# ---------------------------------------------------------------- the server from outside


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


async def health(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with asyncio.timeout(30):
        async with http.get(url + "/health") as resp:
            return resp.status, await resp.json()


async def wait_idle(http: aiohttp.ClientSession, url: str, within: float = 60) -> dict:
    """/health once running and waiting are both 0 (or the last answer after `within` s)."""
    deadline = time.monotonic() + within
    while True:
        status, data = await health(http, url)  # 503 "degraded" (over the KV budget) has the figures too
        if data.get("running") == 0 and data.get("waiting") == 0:
            return data
        if time.monotonic() > deadline:
            return data
        await asyncio.sleep(0.25)


def control(srv, cmd: str, timeout: float = 300, **args) -> dict:
    """A command over the server's control socket (blocking: run it in a thread)."""
    from gateway.control import request

    return request(srv.cache_dir / "control.sock", cmd, args, timeout=timeout)


def http_session(limit: int = 200) -> aiohttp.ClientSession:
    # No client-wide timeout: every call above sets its own deadline.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=None))
