"""Shared pieces of the benchmarks: servers as subprocesses, a streaming client,
result files. Not a benchmark itself (run_all skips files starting with _)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PY = sys.executable
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the benchmark process dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def exit_on_sigterm() -> None:
    """SIGTERM runs the finally blocks (servers stopped) instead of killing outright."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# Extra environment for every server and worker process (e.g. OPENBLAS_NUM_THREADS).
CHILD_ENV: dict[str, str] = {}


def add_env_flags(ap) -> None:
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="OPENBLAS_NUM_THREADS for every server and worker (default: unset, as users run it)")


def apply_env_flags(args) -> dict:
    if args.blas_threads is not None:
        CHILD_ENV["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    return dict(CHILD_ENV)


def child_env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", **CHILD_ENV)


def setup_server_bench(args) -> tuple[Path, dict]:
    """The start of a benchmark that runs servers/workers: SIGTERM cleans up, the
    env flags reach the children, the model folder exists. Returns it and the
    result header (which records the children's extra environment)."""
    from export_model import ensure_model

    exit_on_sigterm()
    out = header()
    out["child_env"] = apply_env_flags(args)
    return args.model or ensure_model(), out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        from importlib.metadata import version

        info["mlx"] = version("mlx")
        info["mlx_lm"] = version("mlx-lm")
    except Exception:
        pass
    return info


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    if isinstance(data.get("machine"), dict):
        try:
            data["machine"]["loadavg_at_end"] = os.getloadavg()
        except OSError:
            pass
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def header(argv: list[str] | None = None) -> dict:
    argv = sys.argv if argv is None else argv
    return {
        "command": shlex.join([os.path.relpath(PY, ROOT) if PY.startswith(str(ROOT)) else PY, *argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
    }


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(rows: list[list], headers: list[str]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


# ---------------------------------------------------------------- servers


class Server:
    """A server subprocess; `kind` is 'greenroom' or 'mlx_lm'."""

    def __init__(self, kind: str, model: Path, *, extra: list[str] | None = None, log_dir: Path | None = None):
        self.kind = kind
        self.model = Path(model)
        self.port = free_port()
        self.extra = list(extra or [])
        self.tmp = Path(tempfile.mkdtemp(prefix=f"greenroom-bench-{kind}-"))
        self.log_path = (log_dir or self.tmp) / f"{kind}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cmd(self) -> list[str]:
        if self.kind == "greenroom":
            return [str(Path(PY).parent / "greenroom"), "serve", "--port", str(self.port),
                    "--cache-dir", str(self.tmp / "cache"), "--model", str(self.model),
                    "--log-level", "WARNING", *self.extra]
        if self.kind == "mlx_lm":
            return [PY, str(BENCH / "mlx_lm_server.py"), "--model", str(self.model),
                    "--port", str(self.port), "--log-level", "WARNING", *self.extra]
        raise ValueError(self.kind)

    def start(self, timeout: float = 180) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = child_env()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError(f"{self.kind} did not start in {timeout}s:\n{self.log()[-4000:]}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def health(self) -> dict:
        """greenroom's /health (a 503 "degraded" body too)."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            return json.loads(err.read())

    def metrics(self) -> dict[str, float]:
        """Prometheus samples (greenroom only): name{labels} -> value."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------- client


@dataclass
class StreamResult:
    sent: float  # perf_counter when the request was sent
    first: float | None = None  # first non-empty content chunk
    end: float | None = None  # finish_reason chunk (or last chunk)
    chunk_times: list[float] = field(default_factory=list)  # every non-empty content chunk
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    status: int = 0
    error: str | None = None

    @property
    def ttft(self):
        return None if self.first is None else self.first - self.sent

    @property
    def completion_tokens(self) -> int:
        return int((self.usage or {}).get("completion_tokens") or 0)

    @property
    def decode_rate(self):
        """Tokens per second from the first to the last token (excludes prefill)."""
        n = self.completion_tokens
        if self.first is None or self.end is None or n < 2 or self.end <= self.first:
            return None
        return (n - 1) / (self.end - self.first)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("chunk_times")
        d["ttft"] = self.ttft
        d["decode_rate"] = self.decode_rate
        d["chunks"] = len(self.chunk_times)
        return d


async def stream_chat(session, url: str, messages: list[dict], *, agent: str | None, max_tokens: int,
                      extra_body: dict | None = None, res: StreamResult | None = None) -> StreamResult:
    """One streaming, greedy chat completion; timestamps every content chunk.

    Pass `res` to watch it fill in while the request runs (and keep what it
    had if the task is cancelled)."""
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **(extra_body or {})}
    headers = {"Content-Type": "application/json"}
    if agent:
        headers["X-Agent-Id"] = agent
    if res is None:
        res = StreamResult(sent=0.0)
    res.sent = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", data=json.dumps(body), headers=headers) as resp:
        res.status = resp.status
        if resp.status != 200:
            res.error = (await resp.text())[:500]
            return res
        async for raw in resp.content:
            now = time.perf_counter()
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank lines, ': keepalive' comments
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            obj = json.loads(payload)
            if "error" in obj:
                res.error = json.dumps(obj["error"])[:500]
                continue
            if obj.get("usage"):
                res.usage = obj["usage"]
            for choice in obj.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if res.first is None:
                        res.first = now
                    res.chunk_times.append(now)
                    res.text += content
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
                    res.end = now
    if res.end is None and res.chunk_times:
        res.end = res.chunk_times[-1]
    return res


def client_session(limit: int = 64):
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=3600, sock_read=600),
    )


def run_async(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- workers


class Worker:
    """A persistent child process speaking JSON lines on stdin/stdout.

    Used to run mlx-lm measurements in their own process, idle (blocked on
    stdin) while a server is being measured, so the two never share the cores.
    """

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen([PY, *argv], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=child_env(), preexec_fn=_die_with_parent)
        ready = self._read()
        if ready.get("ready") is not True:
            raise RuntimeError(f"worker failed to start: {ready}")
        self.info = ready

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker exited ({self.proc.wait()})")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
            print(f"  [worker] {line}", file=sys.stderr)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"worker error: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def serve_worker(handlers: dict) -> None:
    """The worker side: {'op': name, ...} lines in, one JSON reply line out each."""
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            reply = handlers[req.pop("op")](**req)
        except Exception as exc:  # report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply, default=str) + "\n")
        out.flush()
