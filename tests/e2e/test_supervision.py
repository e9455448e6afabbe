"""Live model swap, restarts, graceful shutdown and the control socket, on the real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.control import request as ctl
from tests.e2e.models import write_corrupt_model, write_tiny_llama
from tests.e2e.server import ROOT

pytestmark = pytest.mark.e2e

EMBEDDED = "SmolLM2-135M-Instruct"
STORY = [{"role": "user", "content": "Tell me a long story about a dragon who learns to code."}]
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def corrupt_model(tmp_path_factory) -> Path:
    return write_corrupt_model(tmp_path_factory.mktemp("models") / "corrupt")


class Stream(threading.Thread):
    """A streaming chat request read in the background: text, finish reason, errors."""

    def __init__(self, srv, messages, agent=None, **params):
        super().__init__(daemon=True)
        self.srv, self.messages, self.agent, self.params = srv, messages, agent, params
        self.text, self.finish, self.errors, self.done_marker, self.models = "", None, [], False, set()
        self.first_token = threading.Event()

    def run(self):
        body = json.dumps({"messages": self.messages, "stream": True, **self.params}).encode()
        req = urllib.request.Request(self.srv.url + "/v1/chat/completions", data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        if self.agent:
            req.add_header("X-Agent-Id", self.agent)
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        self.done_marker = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        self.errors.append(event["error"]["message"])
                        continue
                    self.models.add(event["model"])
                    for choice in event["choices"]:
                        self.text += choice["delta"].get("content") or ""
                        if self.text:
                            self.first_token.set()
                        self.finish = choice["finish_reason"] or self.finish
        except Exception as exc:  # a dropped connection is an outcome the test inspects
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.first_token.set()


def control(srv, cmd, **args):
    return ctl(srv.cache_dir / "control.sock", cmd, args, timeout=300)


def test_control_socket_is_private_and_survives_garbage(fresh_server):
    srv = fresh_server()
    path = srv.cache_dir / "control.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        reader = s.makefile("rb")
        for garbage in (b"not json\n", b"[1,2]\n", b'{"cmd": "launch-missiles"}\n',
                        b'{"cmd": "swap"}\n', b'{"cmd": "evict", "args": {"agent": "../x"}}\n',
                        b'{"cmd": "restart", "args": {"actor": "gateway"}}\n', b"\xff\xfe\n"):
            s.sendall(garbage)
            reply = json.loads(reader.readline())
            assert reply["ok"] is False and reply["error"], garbage
        s.sendall(b'{"cmd": "status"}\n')  # the same connection still works
        assert json.loads(reader.readline())["result"]["state"] == "serving"
    assert srv.chat(HI, temperature=0, max_tokens=3)[0] == 200
    # The CLI client reports errors with a non-zero exit.
    cli = [sys.executable, "-m", "gateway.cli", "ctl", "--socket", str(path)]
    ok = subprocess.run([*cli, "status"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["model"] == EMBEDDED
    bad = subprocess.run([*cli, "evict", "nobody"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "nobody" in bad.stderr


def test_swap_model_mid_session_with_active_agents(fresh_server, tiny_model):
    srv = fresh_server()
    streams = [Stream(srv, STORY, agent=f"agent-{i}", temperature=0, max_tokens=40) for i in range(3)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first_token.wait(120)
    result = control(srv, "swap", model=str(tiny_model), drain_timeout=300)
    for s in streams:
        s.join(120)
        assert not s.errors, s.errors
        assert s.done_marker and s.finish in ("stop", "length")
        assert s.models == {EMBEDDED}
    assert result["ok"], result
    assert result["result"]["to"] == "tiny" and result["result"]["aborted_turns"] == 0
    assert [m["id"] for m in srv.get("/v1/models")[1]["data"]] == ["tiny"]
    status, reply = srv.chat(HI, agent="agent-0", max_tokens=5)
    assert status == 200 and reply["model"] == "tiny"


def test_active_agents_drain_successfully(fresh_server, tiny_model):
    srv = fresh_server()
    running = Stream(srv, STORY, agent="runner", temperature=0, max_tokens=120)
    running.start()
    assert running.first_token.wait(120)
    swap = {}
    swapper = threading.Thread(
        target=lambda: swap.update(control(srv, "swap", model=str(tiny_model), drain_timeout=300))
    )
    swapper.start()
    seen = set()
    deadline = time.monotonic() + 30
    while "draining" not in seen and time.monotonic() < deadline and swapper.is_alive():
        seen.add(srv.get("/health")[1]["status"])
        time.sleep(0.02)
    assert "draining" in seen, seen
    # Arrives while the swap drains: it waits, then is served by the new model.
    late = Stream(srv, HI, agent="late", max_tokens=5)
    late.start()
    swapper.join(300)
    running.join(60)
    late.join(60)
    assert swap["ok"] and swap["result"]["seconds"]["drain"] > 0 and swap["result"]["aborted_turns"] == 0
    assert running.finish in ("stop", "length") and not running.errors and running.models == {EMBEDDED}
    assert late.finish and not late.errors and late.models == {"tiny"}


def test_new_model_loads_and_serves_requests(fresh_server, tiny_model):
    srv = fresh_server()
    first = srv.chat(HI, agent="returner", temperature=0, max_tokens=8)[1]
    assert control(srv, "swap", model=str(tiny_model))["ok"]
    status, reply = srv.chat(HI, agent="returner", max_tokens=5)
    assert status == 200 and reply["model"] == "tiny"
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # other model: cold
    back = control(srv, "swap", model="default")
    assert back["ok"] and back["result"]["to"] == EMBEDDED
    history = HI + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]}, *HI]
    status, again = srv.chat(history, agent="returner", temperature=0, max_tokens=5)
    assert status == 200 and again["model"] == EMBEDDED
    # Its caches under the first model's tag were found again.
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens"] // 2


def test_rollback_on_swap_failure(fresh_server, corrupt_model, tmp_path):
    srv = fresh_server()
    running = Stream(srv, STORY, agent="steady", temperature=0, max_tokens=30)
    running.start()
    assert running.first_token.wait(120)
    for bad in (corrupt_model, tmp_path / "does-not-exist"):
        reply = control(srv, "swap", model=str(bad), drain_timeout=300)
        assert reply["ok"] is False
        assert reply["result"]["rolled_back"] and reply["result"]["serving"] == EMBEDDED
        assert str(bad) in reply["error"] or "does-not-exist" in reply["error"]
    running.join(120)
    assert running.finish in ("stop", "length") and not running.errors
    status, body = srv.chat(HI, temperature=0, max_tokens=5)
    assert status == 200 and body["model"] == EMBEDDED
    assert srv.get("/health")[1]["status"] == "ok"


def test_drain_deadline_ends_running_turns_with_abort(fresh_server, tiny_model):
    srv = fresh_server()
    long = Stream(srv, STORY, agent="talker", temperature=0, max_tokens=2000)
    long.start()
    assert long.first_token.wait(120)
    reply = control(srv, "swap", model=str(tiny_model), drain_timeout=0.5)
    long.join(60)
    assert reply["ok"] and reply["result"]["aborted_turns"] == 1
    assert long.finish == "abort" and long.done_marker


def test_drain_holds_new_turns_until_resume(fresh_server):
    srv = fresh_server()
    assert control(srv, "drain")["result"]["state"] == "draining"
    waiting = Stream(srv, HI, max_tokens=3)
    waiting.start()
    time.sleep(1.5)
    assert waiting.finish is None and not waiting.errors  # waiting, not rejected
    assert control(srv, "resume")["result"]["state"] == "serving"
    waiting.join(60)
    assert waiting.finish in ("stop", "length")


def test_evict_hibernates_an_agent(fresh_server):
    srv = fresh_server()
    srv.chat(HI, agent="sleepy", temperature=0, max_tokens=5)
    assert control(srv, "evict", agent="sleepy")["ok"]
    agents = {a["id"]: a for a in control(srv, "agents")["result"]}
    assert agents["sleepy"]["state"] == "hibernated"
    tag = srv.get("/health")[1]["model_tag"]
    assert (srv.cache_dir / "kv" / tag / "agents" / "sleepy.safetensors").is_file()


def test_model_crash_mid_stream_ends_stream_and_recovers(fresh_server):
    srv = fresh_server(env={"GREENROOM_ENABLE_FAULTS": "1"})
    stream = Stream(srv, STORY, agent="crashy", temperature=0, max_tokens=200)
    stream.start()
    assert stream.first_token.wait(120)
    assert control(srv, "fault")["ok"]
    stream.join(60)
    assert not stream.is_alive(), "the stream hung after the model crashed"
    assert stream.errors and "fault" in stream.errors[0]
    status, body = srv.chat(HI, agent="crashy", temperature=0, max_tokens=5)
    assert status == 200 and body["choices"][0]["message"]["content"]
    # The failed step dropped the batch; the weights were intact, so nothing reloaded.
    assert "dropped the batch" in srv.log()
    assert srv.log().count("loaded SmolLM2") == 1 and "restarting child 'model'" not in srv.log()
    # Scheduler restarts are survived the same way.
    assert control(srv, "restart", actor="scheduler")["ok"]
    assert srv.chat(HI, temperature=0, max_tokens=3)[0] == 200


def test_repeated_crashes_beyond_the_limit_exit_cleanly_and_save_the_caches(fresh_server):
    srv = fresh_server(env={"GREENROOM_ENABLE_FAULTS": "1"})
    assert srv.chat(HI, agent="keeper", temperature=0, max_tokens=5)[0] == 200
    deadline = time.monotonic() + 180
    while srv.proc.poll() is None and time.monotonic() < deadline:
        try:
            control(srv, "fault", actor="scheduler-crash")
        except OSError:
            break  # the socket went away: the server is exiting
        time.sleep(0.5)
    assert srv.proc.wait(60) != 0
    assert "giving up" in srv.log()
    # Escalation never loses data: the agent's cache was saved on the way down.
    tag = next((srv.cache_dir / "kv").iterdir())
    assert (tag / "agents" / "keeper.safetensors").is_file(), srv.log()
    assert "failed" not in srv.log().split("giving up")[-1].lower(), srv.log()


def test_operator_restarts_never_count_as_crashes(fresh_server):
    srv = fresh_server()
    for _ in range(6):  # more than the intensity (3 in 60 s) allows for crashes
        assert control(srv, "restart", actor="scheduler")["ok"]
        time.sleep(0.3)
    status, body = srv.chat(HI, temperature=0, max_tokens=3)
    assert status == 200 and srv.proc.poll() is None


def test_graceful_shutdown_works(fresh_server):
    srv = fresh_server()
    stream = Stream(srv, STORY, agent="finisher", temperature=0, max_tokens=30)
    stream.start()
    assert stream.first_token.wait(120)
    assert srv.stop(signal.SIGTERM) == 0
    stream.join(30)
    assert stream.finish in ("stop", "length", "abort") and stream.done_marker, stream.errors
    tag_dirs = list((srv.cache_dir / "kv").iterdir())
    assert [p.name for d in tag_dirs for p in d.glob("agents/*.safetensors")] == ["finisher.safetensors"]
    assert not (srv.cache_dir / "control.sock").exists()
