"""Per-agent KV caches: what they save, side by side in one run.

On the embedded model, with a conversation of about --context tokens (default 2,000):

  cold     TTFT of the conversation sent by a new agent (everything prefilled);
  warm     TTFT of the same agent's follow-up turn (its cache is in memory: only
           the new tokens are prefilled)                       target warm / cold <= 1/10;
  restart  TTFT of that agent's first turn after `greenroom serve` was stopped
           (SIGTERM) and started again: the session is activated and its cache
           restored from disk (the file is evicted from the page cache first with
           posix_fadvise(DONTNEED), so this is a read from the disk)
                                                               target restart / cold <= 1/5;
  load     BlockStore.load_agent + load_blocks of an agent (its file and the segment
           files holding its blocks: read + checksums + arrays) vs reading the same
           files sequentially with os.readv, both from the disk (page cache dropped
           for the files before each run) and, as a second figure, both from the
           page cache                                         target load / read >= 50 %;
  bytes per token of context: on disk (file size / tokens) and in memory.

TTFT is client-side: request sent -> first non-empty content chunk of a
streaming, greedy /v1/chat/completions. Each measured turn waits until the
previous turn's write-behind save is on disk, so a save never runs during a
measurement. Each agent is measured once per kind; the figures are medians over
--reps agents.

Usage: .venv/bin/python bench/bench_cache.py [--reps 3] [--context 2000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository root on sys.path)

import actors  # noqa: E402,F401  (OpenBLAS before mlx, as the server does)
import mlx.core as mx  # noqa: E402

from actors import loading  # noqa: E402
from actors.blockfile import BlockFormat  # noqa: E402
from actors.blockstore import AGENTS, BLOCKS, BlockStore  # noqa: E402
from actors.cachestore import file_name  # noqa: E402
from actors.prefix_pool import BLOCK_TOKENS  # noqa: E402

TARGETS = {"warm_over_cold": 0.1, "restart_over_cold": 0.2, "load_over_read": 0.5}
MAX_TOKENS = 8


# ---------------------------------------------------------------- conversation


def module_source(i: int) -> str:
    name = ["parse", "render", "schedule", "persist", "validate", "encode", "merge", "retry"][i % 8]
    return (
        f"def {name}_{i}(items, limit={10 + i}):\n"
        f'    """{name.capitalize()} up to `limit` items and return the ones that pass."""\n'
        f"    out = []\n"
        f"    for index, item in enumerate(items):\n"
        f"        if index >= limit:\n"
        f"            break\n"
        f"        if item is None or item.get('skip'):\n"
        f"            continue\n"
        f"        value = item['value'] * {i + 2} + len(item.get('tags', []))\n"
        f"        out.append({{'id': item['id'], 'value': value, 'stage': '{name}'}})\n"
        f"    return out\n"
    )


def conversation(tokenizer, agent: str, context: int) -> list[dict]:
    """A code-review conversation of about `context` prompt tokens."""
    messages = [{"role": "system", "content": f"You review Python code for the team ({agent}). Be brief."}]
    i = 0
    while len(tokenizer.apply_chat_template(messages, add_generation_prompt=True)) < context - 60:
        messages.append({"role": "user", "content": f"Module {i}:\n```python\n{module_source(i)}```\nAny bug?"})
        messages.append(
            {"role": "assistant", "content": f"Module {i} looks correct; consider validating `limit` and the item keys."}
        )
        i += 1
    messages.append({"role": "user", "content": "Which module would you refactor first, and why?"})
    return messages


# ---------------------------------------------------------------- server and client


class Server:
    def __init__(self, cache_dir: Path, log_dir: Path):
        self.cache_dir = cache_dir
        self.port = C.free_port()
        self.log_path = log_dir / f"server-{self.port}.log"
        self.cmd = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port),
                    "--cache-dir", str(cache_dir), "--log-level", "INFO"]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> "Server":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=C.ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                status, body = self.get("/health")
                if status in (200, 503):
                    self.tag = body["model_tag"]
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def get(self, path: str):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def stop(self) -> float:
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=300)
        return time.perf_counter() - started

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stream(self, messages: list[dict], agent: str | None) -> dict:
        """One streaming greedy turn: TTFT (client side), text and usage."""
        body = json.dumps({"model": "default", "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS,
                           "stream": True, "stream_options": {"include_usage": True}})
        headers = {"Content-Type": "application/json"}
        if agent:
            headers["X-Agent-Id"] = agent
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        sent = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        first, text, usage = None, "", None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            obj = json.loads(payload)
            usage = obj.get("usage") or usage
            for choice in obj.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if first is None:
                        first = time.perf_counter()
                    text += content
        conn.close()
        return {"ttft_s": None if first is None else first - sent, "text": text, "usage": usage}


def agent_path(cache_dir: Path, tag: str, agent: str) -> Path:
    return cache_dir / "kv" / tag / AGENTS / file_name(agent)


def wait_saved(cache_dir: Path, agent: str, tag: str, n_tokens: int, timeout: float = 300) -> None:
    """Read-only (a BlockStore must not be opened on a live server's directory)."""
    deadline = time.monotonic() + timeout
    fmt = BlockFormat(tag, BLOCK_TOKENS)
    while time.monotonic() < deadline:
        try:
            saved = fmt.read_agent(agent, agent_path(cache_dir, tag, agent))
            if saved.branches and len(saved.branches[0].tokens) == n_tokens:
                return
        except Exception:
            pass  # not there yet, or being replaced
        time.sleep(0.05)
    raise RuntimeError(f"{agent}'s cache did not reach {n_tokens} tokens on disk")


def held(turn: dict) -> int:
    """Tokens a turn leaves cached: the prompt and every generated token but the last."""
    return turn["usage"]["prompt_tokens"] + turn["usage"]["completion_tokens"] - 1


def agent_files(cache_dir: Path, tag: str, agent: str) -> list[Path]:
    """The agent's file and the segment files holding its blocks."""
    saved = BlockFormat(tag, BLOCK_TOKENS).read_agent(agent, agent_path(cache_dir, tag, agent))
    keys = {k for b in saved.branches for k in b.block_keys}
    segments = []
    for path in sorted((cache_dir / "kv" / tag / BLOCKS).glob("*.safetensors")):
        with open(path, "rb") as f:
            header = f.read(8 + int.from_bytes(f.read(8), "little"))
        if any(k.hex().encode() in header for k in keys):
            segments.append(path)
    return [agent_path(cache_dir, tag, agent), *segments]


# ---------------------------------------------------------------- disk


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_sequential(path: Path) -> float:
    """Seconds to read the whole file front to back into one buffer (8 MiB reads)."""
    size = path.stat().st_size
    buf = bytearray(size)
    view = memoryview(buf)
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            n = os.readv(fd, [view[pos : pos + (8 << 20)]])
            if n == 0:
                break
            pos += n
    finally:
        os.close(fd)
    return time.perf_counter() - started


def time_load(store: BlockStore, agent: str) -> tuple[float, int]:
    """Seconds to load the agent and all its blocks, and the tokens it holds."""
    started = time.perf_counter()
    saved = store.load_agent(agent)
    blocks = store.load_blocks({k for b in saved.branches for k in b.block_keys})
    elapsed = time.perf_counter() - started
    assert saved is not None and len(blocks) == len({k for b in saved.branches for k in b.block_keys})
    return elapsed, len(saved.branches[0].tokens)


def read_files(paths: list[Path]) -> float:
    return sum(read_sequential(p) for p in paths)


def drop_all(paths: list[Path]) -> None:
    for p in paths:
        drop_from_page_cache(p)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="agents measured (medians over them)")
    ap.add_argument("--context", type=int, default=2000, help="prompt tokens of the conversation")
    ap.add_argument("--keep", action="store_true", help="keep the temporary cache dir")
    args = ap.parse_args(argv)
    result = C.header()
    result["parameters"] = {"reps": args.reps, "context": args.context, "max_tokens": MAX_TOKENS}

    _, meta = mx.load(str(loading.embedded_gguf_path()), return_metadata=True)
    tokenizer = loading._gguf_tokenizer(meta)
    n_layers = int(meta["llama.block_count"].item())
    n_kv = int(meta["llama.attention.head_count_kv"].item())
    head_dim = int(meta["llama.embedding_length"].item()) // int(meta["llama.attention.head_count"].item())
    kv_bytes_per_token = 2 * n_layers * n_kv * head_dim * 4  # float32 on the CPU

    tmp = Path(tempfile.mkdtemp(prefix="greenroom-bench-cache-"))
    cache_dir = tmp / "cache"
    agents = [f"bench-cache-{i}" for i in range(args.reps)]
    convs = {a: conversation(tokenizer, a, args.context) for a in agents}
    turns: dict[str, dict] = {a: {} for a in agents}
    servers: list[Server] = []
    try:
        # ---- cold and warm, one server
        srv = Server(cache_dir, tmp).start()
        servers.append(srv)
        srv.stream([{"role": "user", "content": "Hello"}], None)  # warm-up (no agent: ephemeral)
        for a in agents:
            cold = srv.stream(convs[a], a)
            wait_saved(cache_dir, a, srv.tag, held(cold))
            convs[a] += [{"role": "assistant", "content": cold["text"]},
                         {"role": "user", "content": "Summarise your answer in one sentence."}]
            warm = srv.stream(convs[a], a)
            wait_saved(cache_dir, a, srv.tag, held(warm))
            convs[a] += [{"role": "assistant", "content": warm["text"]},
                         {"role": "user", "content": "Thanks. Which test would you add first?"}]
            turns[a].update(cold=cold, warm=warm)
            print(f"{a}: cold {cold['ttft_s']:.3f}s  warm {warm['ttft_s']:.3f}s  "
                  f"(prompt {cold['usage']['prompt_tokens']} tokens)", flush=True)
        shutdown_s = srv.stop()

        # ---- restart: restore from disk
        files = {a: agent_files(cache_dir, srv.tag, a) for a in agents}
        for paths in files.values():
            drop_all(paths)
        srv = Server(cache_dir, tmp).start()
        servers.append(srv)
        srv.stream([{"role": "user", "content": "Hello"}], None)  # warm-up, as before the cold runs
        for a in agents:
            restart = srv.stream(convs[a], a)
            turns[a]["restart"] = restart
            print(f"{a}: first turn after restart {restart['ttft_s']:.3f}s  usage {restart['usage']}", flush=True)
        log = srv.log_path.read_text()
        srv.stop()

        # ---- load speed vs sequential read of the same files
        store = BlockStore(cache_dir / "kv", srv.tag, block_tokens=BLOCK_TOKENS)  # the server is stopped
        load = {"disk": {"read_s": [], "load_s": []}, "page_cache": {"read_s": [], "load_s": []}}
        sizes, tokens = {}, {}
        for a in agents:
            paths = files[a]
            sizes[a] = sum(p.stat().st_size for p in paths)
            for _ in range(2):
                drop_all(paths)
                load["disk"]["read_s"].append(read_files(paths))
                drop_all(paths)
                seconds, tokens[a] = time_load(store, a)
                load["disk"]["load_s"].append(seconds)
                load["page_cache"]["read_s"].append(read_files(paths))
                load["page_cache"]["load_s"].append(time_load(store, a)[0])
    finally:
        for s in servers:
            s.kill()

    def med(kind):
        return statistics.median(turns[a][kind]["ttft_s"] for a in agents)

    mean_size = statistics.mean(sizes.values())
    throughput = {
        where: {k: mean_size / statistics.median(v) / 1e6 for k, v in figures.items()}
        for where, figures in load.items()
    }
    ratios = {
        "warm_over_cold": med("warm") / med("cold"),
        "restart_over_cold": med("restart") / med("cold"),
        "load_over_read": throughput["disk"]["load_s"] / throughput["disk"]["read_s"],
        "load_over_read_page_cache": throughput["page_cache"]["load_s"] / throughput["page_cache"]["read_s"],
    }
    result.update(
        {
            "ttft_s": {kind: {a: turns[a][kind]["ttft_s"] for a in agents} for kind in ("cold", "warm", "restart")},
            "ttft_median_s": {kind: med(kind) for kind in ("cold", "warm", "restart")},
            "usage": {kind: {a: turns[a][kind]["usage"] for a in agents} for kind in ("cold", "warm", "restart")},
            "restored_log_lines": [ln for ln in log.splitlines() if "restored " in ln],
            "shutdown_with_saves_s": shutdown_s,
            "load": {
                "file_bytes": sizes,
                "file_tokens": tokens,
                "seconds": load,
                "mb_per_s_median": throughput,
            },
            "bytes_per_token": {
                "memory_kv": kv_bytes_per_token,
                "disk": statistics.mean(sizes[a] / tokens[a] for a in agents),
            },
            "ratios": ratios,
            "targets": TARGETS,
            "meets_targets": {
                "warm_over_cold": ratios["warm_over_cold"] <= TARGETS["warm_over_cold"],
                "restart_over_cold": ratios["restart_over_cold"] <= TARGETS["restart_over_cold"],
                "load_over_read": ratios["load_over_read"] >= TARGETS["load_over_read"],
            },
        }
    )
    try:
        result["machine"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    path = C.write_result("cache", result)

    m = result["ttft_median_s"]
    print()
    print(C.table(
        [
            ["cold prefill (new agent)", m["cold"], "", ""],
            ["warm follow-up (in memory)", m["warm"], ratios["warm_over_cold"], f"<= {TARGETS['warm_over_cold']}"],
            ["first turn after restart (disk)", m["restart"], ratios["restart_over_cold"],
             f"<= {TARGETS['restart_over_cold']}"],
        ],
        ["TTFT, median", "seconds", "vs cold", "target"],
    ))
    print()
    print(C.table(
        [
            [where, throughput[where]["read_s"], throughput[where]["load_s"],
             throughput[where]["load_s"] / throughput[where]["read_s"]]
            for where in ("disk", "page_cache")
        ],
        ["cache files", "read MB/s", "BlockStore load MB/s", "load / read"],
    ))
    print(f"\nbytes per token of context: {result['bytes_per_token']['disk']:.0f} on disk, "
          f"{kv_bytes_per_token} in memory (float32 KV)")
    print(f"mean file {mean_size / 1e6:.1f} MB for {statistics.mean(tokens.values()):.0f} tokens")
    print(f"targets met: {result['meets_targets']}")
    print(f"saved {path.relative_to(C.ROOT)}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
