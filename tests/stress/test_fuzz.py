"""schemathesis against the server's own /openapi.json: valid and invalid requests for
every documented operation. No 5xx, no hang (a per-request deadline), every 4xx in
its API's error shape (OpenAI's under /v1/chat|completions|models and elsewhere,
Anthropic's under /v1/messages), and every reply as the document says.

Generations stay cheap: the fuzzing copy of the document caps max_tokens and
max_completion_tokens at FUZZ_MAX_TOKENS, and a request that would still generate
more (an OpenAI request that sets neither) is sent with the cap.
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from tests.stress.client import HANG_S, report, scaled

pytestmark = pytest.mark.stress

FUZZ_MAX_TOKENS = 8
REQUEST_TIMEOUT_S = float(os.environ.get("GREENROOM_STRESS_FUZZ_TIMEOUT_S", str(min(HANG_S, 120))))
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
OPENAI_TURNS = ("/v1/chat/completions", "/v1/completions")


def fuzzing_document(doc: dict) -> dict:
    """`doc` with every max_tokens / max_completion_tokens bounded by FUZZ_MAX_TOKENS."""
    doc = copy.deepcopy(doc)

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in TOKEN_FIELDS and isinstance(value, dict):
                    cap(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    def cap(schema):
        for option in [schema, *schema.get("anyOf", [])]:
            if option.get("type") == "integer":
                option["maximum"] = min(option.get("maximum", FUZZ_MAX_TOKENS), FUZZ_MAX_TOKENS)

    walk(doc["components"])
    return doc


def keep_cheap(path: str, body) -> None:
    """Cap what an (even invalid) body would generate."""
    if not isinstance(body, dict):
        return
    for key in TOKEN_FIELDS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > FUZZ_MAX_TOKENS:
            body[key] = FUZZ_MAX_TOKENS
    if path in OPENAI_TURNS and not any(key in body for key in TOKEN_FIELDS):
        body["max_tokens"] = FUZZ_MAX_TOKENS  # unset, the server's default is 2,048 tokens


def described(case) -> str:
    """The request as sent, to reproduce a failure (headers and body as JSON)."""
    import json

    body = case.body if isinstance(case.body, (dict, list, str, int, float, bool)) or case.body is None else repr(case.body)
    return json.dumps({"headers": dict(case.headers or {}), "body": body}, default=repr)[:4000]


def error_shape_problem(path: str, response) -> str | None:
    """Why a 4xx body is not in its API's error shape, or None."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:120]!r}"
    if path.startswith("/v1/messages"):
        ok = (
            isinstance(body, dict)
            and body.get("type") == "error"
            and isinstance(body.get("error"), dict)
            and isinstance(body["error"].get("type"), str)
            and isinstance(body["error"].get("message"), str)
        )
        return None if ok else f"not Anthropic's error shape: {str(body)[:200]}"
    ok = (
        isinstance(body, dict)
        and isinstance(body.get("error"), dict)
        and isinstance(body["error"].get("message"), str)
        and isinstance(body["error"].get("type"), str)
    )
    return None if ok else f"not OpenAI's error shape: {str(body)[:200]}"


def test_schemathesis_finds_no_5xx_no_hang_and_only_well_shaped_errors(start_server):
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    srv = start_server()
    status, doc = srv.get("/openapi.json")
    assert status == 200, doc
    schema = schemathesis.openapi.from_dict(fuzzing_document(doc))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    examples = {GenerationMode.POSITIVE: scaled(15, floor=3), GenerationMode.NEGATIVE: scaled(30, floor=5)}

    tried, statuses, unsendable, known = Counter(), Counter(), Counter(), Counter()
    failures: list[str] = []
    hangs: list[str] = []
    pool = ThreadPoolExecutor(1)
    session = requests.Session()
    started = time.monotonic()

    def send(case):
        return case.call(base_url=srv.url, session=session, timeout=(10, REQUEST_TIMEOUT_S))

    for operation in operations:
        for mode, count in examples.items():
            label = f"{operation.method.upper()} {operation.path} [{mode.value}]"

            @settings(max_examples=count, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                keep_cheap(operation.path, case.body)
                tried[label] += 1
                future = pool.submit(send, case)
                try:
                    response = future.result(timeout=REQUEST_TIMEOUT_S + 15)
                except FutureTimeout:
                    hangs.append(f"{label}: no answer in {REQUEST_TIMEOUT_S:.0f}s: {described(case)}")
                    return
                except requests.Timeout:
                    hangs.append(f"{label}: read timeout: {described(case)}")
                    return
                except (requests.RequestException, ValueError, UnicodeError) as exc:
                    # A header the HTTP client refuses to send (non-latin-1 text, newlines).
                    unsendable[f"{label}: {type(exc).__name__}"] += 1
                    return
                statuses[response.status_code] += 1
                bug = next((name for name, hit in KNOWN_BUGS.items() if hit(operation.path, case.body)), None)
                if bug is not None and response.status_code >= 500:
                    known[bug] += 1  # its own xfail test below keeps it visible
                    return
                if 400 <= response.status_code < 500:
                    problem = error_shape_problem(operation.path, response)
                    if problem:
                        failures.append(f"{label} -> {response.status_code}: {problem}")
                try:
                    case.validate_response(response, checks=checks)
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis groups its failures
                    failures.append(f"{label} -> {response.status_code}: {str(exc)[:600]}")

            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
                pass
    pool.shutdown(wait=False, cancel_futures=True)
    server_errors = sum(n for code, n in statuses.items() if code >= 500) - sum(known.values())
    report(
        "fuzz",
        operations=len(operations),
        requests=sum(tried.values()),
        seconds=time.monotonic() - started,
        statuses=dict(sorted(statuses.items())),
        server_errors=server_errors,
        hangs=len(hangs),
        failures=len(failures),
        unsendable=sum(unsendable.values()),
        known_bugs=dict(known),
    )
    assert hangs == [], hangs[:5] + [srv.log()[-3000:]]
    assert server_errors == 0 and failures == [], failures[:8]
    assert srv.proc.poll() is None, "the server died under fuzzing"


# ---------------------------------------------------------------- what fuzzing found


# Server bugs the fuzzer finds and that have their own strict xfail test: fuzzing counts
# them apart (figure `known_bugs`) so it keeps guarding everything else. None open now;
# the empty completion prompt it found (a 500 that dropped the running batch) is fixed
# and guarded below.
KNOWN_BUGS: dict = {}


async def test_an_empty_completion_prompt_is_a_400_and_spares_the_running_batch(start_server):
    from tests.stress.client import http_session, stream_chat, user

    srv = start_server()
    async with http_session() as http:
        import asyncio

        neighbour = asyncio.create_task(
            stream_chat(http, srv.url, user("Count from 1 to 40."), "neighbour", max_tokens=60, temperature=0)
        )
        await asyncio.sleep(3)  # the neighbour is decoding
        async with http.post(srv.url + "/v1/completions", json={"prompt": "", "max_tokens": 4}) as resp:
            status, body = resp.status, await resp.json()
        other = await neighbour
    report("fuzz.empty_prompt", status=status, neighbour=other.kind, neighbour_error=other.error)
    assert status == 400, body
    assert other.kind == "ok", other
