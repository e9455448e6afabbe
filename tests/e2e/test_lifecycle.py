"""Every turn ends, on the real server: restarts with turns queued, a client that leaves
during a restart, /health while an actor restarts, and requests held by a drain."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e.test_supervision import HI, STORY, Stream, control

pytestmark = pytest.mark.e2e


def test_restarting_the_scheduler_with_turns_queued_ends_every_turn(fresh_server):
    srv = fresh_server("--max-batch", "1")
    streams = [Stream(srv, STORY, agent=f"queued-{i}", temperature=0, max_tokens=400) for i in range(3)]
    # The first one takes the one batch slot before the others arrive (started together,
    # any of them could, and the test then waited for whole 400-token replies first).
    streams[0].start()
    assert streams[0].first_token.wait(120)
    for s in streams[1:]:
        s.start()
    for _ in range(100):  # the other two wait for the one batch slot
        if srv.get("/health")[1]["waiting"] == 2:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the other two turns never queued")
    assert control(srv, "restart", actor="scheduler")["ok"]
    for s in streams:
        s.join(60)
        assert not s.is_alive(), "a client hung after the scheduler restarted"
        assert s.done_marker or s.errors, (s.finish, s.errors)
        assert s.finish in ("stop", "length", "abort", None) and (s.finish or s.errors)
    # Each agent can go on at once (no session stuck in a turn, no full mailbox).
    for i in range(3):
        status, body = srv.chat(HI, agent=f"queued-{i}", temperature=0, max_tokens=3)
        assert status == 200, body


def test_a_client_leaving_during_a_scheduler_restart_leaves_its_agent_usable(fresh_server):
    srv = fresh_server()
    body = json.dumps({"messages": STORY, "stream": True, "max_tokens": 300, "temperature": 0}).encode()
    req = urllib.request.Request(srv.url + "/v1/chat/completions", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("X-Agent-Id", "leaver")
    resp = urllib.request.urlopen(req, timeout=120)
    resp.readline()
    assert control(srv, "restart", actor="scheduler")["ok"]
    resp.close()  # gone in the middle of the restart
    time.sleep(1)
    status, reply = srv.chat(HI, agent="leaver", temperature=0, max_tokens=3)
    assert status == 200, reply


def test_health_answers_json_while_the_scheduler_restarts(fresh_server):
    srv = fresh_server()
    answers, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            req = urllib.request.Request(srv.url + "/health")
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    answers.append((resp.status, resp.headers.get("Content-Type", "")))
            except urllib.error.HTTPError as err:
                answers.append((err.code, err.headers.get("Content-Type", "")))
            time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    for _ in range(4):
        assert control(srv, "restart", actor="scheduler")["ok"]
        time.sleep(0.3)
    stop.set()
    poller.join(10)
    assert answers and all(status in (200, 503) for status, _ in answers), answers
    assert all("application/json" in ctype for _, ctype in answers), answers


def test_a_request_held_by_a_drain_gets_503_with_retry_after_at_the_deadline(fresh_server):
    srv = fresh_server("--drain-timeout", "2")
    assert control(srv, "drain")["ok"]
    started = time.monotonic()
    req = urllib.request.Request(
        srv.url + "/v1/chat/completions",
        data=json.dumps({"messages": HI, "max_tokens": 3}).encode(),
        method="POST",
    )
    req.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    waited = time.monotonic() - started
    assert refused.value.code == 503
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert json.loads(refused.value.read())["error"]["message"]
    assert 1.5 <= waited < 20
    assert control(srv, "resume")["ok"]
    assert srv.chat(HI, temperature=0, max_tokens=3)[0] == 200
