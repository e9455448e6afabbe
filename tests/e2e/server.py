"""Run the real `greenroom serve` as a subprocess for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import json
import urllib.error
import urllib.request

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, cache_dir: Path, *extra: str, port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.cache_dir = cache_dir
        self.extra = extra
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = cache_dir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "ServerProcess":
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port),
               "--cache-dir", str(self.cache_dir), *self.extra]
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = self.get("/health", timeout=1)
                if status in (200, 503):
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()}")

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 120):
        """(status, parsed JSON or text) of one HTTP request; 4xx/5xx are returned, not raised."""
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            status, raw, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in ctype else raw.decode())

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def chat(self, messages, agent: str | None = None, **params):
        body = {"model": "default", "messages": messages, **params}
        headers = {"X-Agent-Id": agent} if agent else {}
        return self.request("POST", "/v1/chat/completions", body, headers)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"server ignored {sig!r} for {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
