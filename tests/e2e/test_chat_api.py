"""The OpenAI chat API of the real server with the embedded model."""

from __future__ import annotations

import statistics
import sys
import threading
import time

import openai
import pytest

pytestmark = pytest.mark.e2e

REVERSE = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def test_health_and_models(server):
    status, health = server.get("/health")
    assert status == 200
    assert health["status"] == "ok"
    assert health["model"] == "SmolLM2-135M-Instruct"
    assert health["uptime_s"] >= 0
    status, models = server.get("/v1/models")
    assert status == 200
    assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct"]


def test_health_and_metrics_report_mlx_memory(server):
    _, health = server.get("/health")
    memory = health["memory"]
    # Live arrays hold at least the weights (SmolLM2-135M: ~270 MB in 16 bits, ~540 MB in float32).
    assert memory["mlx_active_bytes"] > 250e6, memory
    assert memory["mlx_peak_bytes"] >= memory["mlx_active_bytes"] and memory["mlx_cache_bytes"] >= 0, memory
    status, text = server.request("GET", "/metrics")
    assert status == 200
    gauges = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("greenroom_mlx_"))
    assert set(gauges) == {"greenroom_mlx_active_bytes", "greenroom_mlx_cache_bytes", "greenroom_mlx_peak_bytes"}
    assert float(gauges["greenroom_mlx_active_bytes"]) > 250e6


@pytest.mark.skipif(sys.platform != "linux", reason="OpenBLAS is preloaded on Linux CPUs only")
def test_the_server_loaded_openblas_before_mlx(server):
    # An `import mlx` that runs before actors/ (which preloads OpenBLAS) leaves MLX on
    # its reference BLAS: every request ~30x slower, and only this warning says why.
    assert "CPU matmuls will be slow" not in server.log(), server.log()[-2000:]


def test_plain_http_request_answers_with_python_code(server):
    status, body = server.chat(REVERSE, temperature=0, max_tokens=80)
    assert status == 200, body
    content = body["choices"][0]["message"]["content"]
    assert "def " in content
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 10
    assert 0 < usage["completion_tokens"] <= 80
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_sdk_non_streaming(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="default", messages=REVERSE, temperature=0, max_tokens=80)
    assert "def " in reply.choices[0].message.content
    assert reply.model == "SmolLM2-135M-Instruct"
    assert reply.usage.completion_tokens > 0


def test_openai_sdk_streaming_matches_non_streaming(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    whole = client.chat.completions.create(model="default", messages=REVERSE, temperature=0, max_tokens=60)
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=REVERSE,
            temperature=0,
            max_tokens=60,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "def " in text
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_ends_the_reply_before_it(server):
    status, full = server.chat(REVERSE, temperature=0, max_tokens=60)
    text = full["choices"][0]["message"]["content"]
    assert "def" in text
    status, body = server.chat(REVERSE, temperature=0, max_tokens=60, stop=["def"])
    assert status == 200
    assert body["choices"][0]["message"]["content"] == text[: text.index("def")]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_is_respected(server):
    status, body = server.chat(REVERSE, temperature=0, max_tokens=5)
    assert status == 200
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_is_reproducible(server):
    params = dict(temperature=1.0, top_p=0.9, max_tokens=30, seed=1234)
    a = server.chat(REVERSE, **params)[1]["choices"][0]["message"]["content"]
    b = server.chat(REVERSE, **params)[1]["choices"][0]["message"]["content"]
    assert a == b


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages"),
        ({"messages": REVERSE, "temperature": 7}, "temperature"),
        ({"messages": REVERSE, "temperature": "hot"}, "temperature"),
        ({"messages": REVERSE, "top_p": 1.5}, "top_p"),
        ({"messages": REVERSE, "max_tokens": 0}, "max_tokens"),
        ({"messages": REVERSE, "max_tokens": 10**9}, "max_tokens"),
        ({"messages": REVERSE, "stop": [1, 2]}, "stop"),
        ({"messages": REVERSE, "n": 3}, "n"),
        ({"messages": REVERSE, "stream": "yes"}, "stream"),
        ({"messages": REVERSE, "seed": -1}, "seed"),
    ],
)
def test_bad_requests_get_openai_style_400(server, body, param):
    status, reply = server.request("POST", "/v1/chat/completions", body)
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] == param
    assert reply["error"]["message"]


def test_malformed_json_and_huge_prompt_are_rejected(server):
    status, reply = server.request("POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in reply["error"]["message"]
    huge = [{"role": "user", "content": "word " * 20000}]
    status, reply = server.chat(huge, max_tokens=5)
    assert status == 400
    assert reply["error"]["code"] == "context_length_exceeded"
    # The server is still fine afterwards.
    assert server.chat(REVERSE, temperature=0, max_tokens=3)[0] == 200


def test_invalid_agent_id_is_rejected(server):
    for bad in ("../../etc", "a/b", "x" * 129, "white space"):
        status, reply = server.chat(REVERSE, agent=bad, max_tokens=2)
        assert status == 400, bad
        assert "agent" in reply["error"]["message"].lower()


def test_foreign_host_header_is_refused(server):
    status, _ = server.get("/health", headers={"Host": "evil.example:8000"})
    assert status == 403


def test_health_answers_quickly_during_a_long_generation(server):
    done = threading.Event()

    def generate():
        server.chat(REVERSE, temperature=0, max_tokens=200, agent="long-runner")
        done.set()

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(1.0)  # let the generation get going
    latencies = []
    while not done.is_set() and len(latencies) < 20:
        started = time.perf_counter()
        status, _ = server.get("/health")
        latencies.append(time.perf_counter() - started)
        assert status == 200
        time.sleep(0.05)
    thread.join()
    assert len(latencies) >= 5, "the generation finished before health could be sampled"
    assert statistics.median(latencies) < 0.1, latencies
