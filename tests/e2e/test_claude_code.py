"""Claude Code itself, unchanged, run headless (`claude -p`) against a real greenroom
serving the embedded model (SmolLM2-135M-Instruct, 8k context).

The pinned Claude Code is installed by npm into tests/e2e/.claude-code on first use
(tests/e2e/claude_code.py). Without node and npm these tests fail and say so: the
issue asks for Claude Code to be tested wherever the suite runs.

Two environment variables make the tiny model's answers short and repeatable:
CLAUDE_CODE_MAX_OUTPUT_TOKENS caps each request; CLAUDE_CODE_EXTRA_BODY (Claude Code
merges it into every request body) sets temperature 0, since Claude Code sends no
sampling settings and the embedded model would otherwise sample at temperature 1
and ramble into the cap, which Claude Code answers with up to three "resume"
requests and then an error. `--bare --system-prompt ... --tools ""` trims Claude
Code's ~12k-token default prompt to what fits 8k.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.claude_code import ClaudeCode, ClaudeCodeUnavailable, install
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.e2e

API_KEY = "greenroom-test-key"
MODEL = "greenroom-local"  # any name: the loaded model serves it
GREEDY = json.dumps({"temperature": 0})
TIMEOUT_S = 300  # per run; a healthy one takes seconds (minutes on a busy 2-core CPU)
SHORT_SYSTEM = "You are a helpful assistant. Answer briefly."
# Long enough that the first exchange is most of the second turn's prompt.
TEAM_SYSTEM = (
    "You are the terse assistant of a small software team. The team builds a local "
    "server that runs language models for several coding agents at once. Each agent "
    "keeps its own cache of the conversation so far, so a follow-up question only costs "
    "the new words. The team writes Python, uses asyncio and aiohttp, tests everything "
    "with pytest, and prefers small functions with clear names. When you answer, use one "
    "short sentence, never a list, never code unless asked, and never repeat the question. "
    "If you do not know something, say so in a few words. Be friendly but brief: the team "
    "reads your answers between meetings, on small screens, and has no time for filler. "
    "Numbers are written as digits. Units are metric. Dates are written as year, month, day."
)


def trimmed(system: str = SHORT_SYSTEM, *, tools: str = "") -> list[str]:
    """Claude Code's own flags that make its prompt fit a small model's context."""
    return ["--bare", "--system-prompt", system, "--tools", tools, "--model", MODEL]


@pytest.fixture(scope="module")
def claude_binary():
    try:
        return install()
    except ClaudeCodeUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A server of this module's own, with --api-key: Claude Code sends the key as
    x-api-key (ANTHROPIC_API_KEY) or as a Bearer token (ANTHROPIC_AUTH_TOKEN)."""
    srv = ServerProcess(tmp_path_factory.mktemp("claude-code-server"), "--api-key", API_KEY).start()
    yield srv
    srv.stop()


@pytest.fixture
def claude(claude_binary, keyed_server, tmp_path):
    return ClaudeCode(
        claude_binary, tmp_path, keyed_server.url, ANTHROPIC_API_KEY=API_KEY, CLAUDE_CODE_EXTRA_BODY=GREEDY
    )


def prefilled_total(server: ServerProcess) -> int:
    """Prompt tokens the model has prefilled since the server started (/metrics)."""
    status, text = server.get("/metrics", headers={"x-api-key": API_KEY})
    assert status == 200, text
    match = re.search(r"^greenroom_prefill_tokens_total (\d+(?:\.\d+)?)$", text, re.M)
    assert match, text
    return int(float(match.group(1)))


def succeeded(run) -> dict:
    out = run.json()
    assert run.returncode == 0 and out["is_error"] is False and out["subtype"] == "success", run
    assert out["result"].strip(), run
    return out


def prompt_tokens(usage: dict) -> int:
    """The whole prompt in Anthropic's terms (Claude Code adds these up too)."""
    return usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]


# ---------------------------------------------------------------- answers


def test_print_mode_answers_in_json(claude):
    run = claude.run(
        "-p", "What is the capital of France? Answer in one word.", "--output-format", "json", *trimmed(),
        timeout=TIMEOUT_S,
    )
    out = succeeded(run)
    assert out["num_turns"] == 1 and out["stop_reason"] == "end_turn", run
    usage = out["usage"]
    # Claude Code read greenroom's usage from the stream: a whole prompt, some output.
    assert usage["input_tokens"] > 20 and usage["output_tokens"] > 0, run


def test_continue_reuses_the_agents_cache(claude, keyed_server):
    first = succeeded(claude.run(
        "-p", "Which language does the team write?", "--output-format", "json", *trimmed(TEAM_SYSTEM),
        timeout=TIMEOUT_S,
    ))
    before = prefilled_total(keyed_server)
    run = claude.run(
        "-p", "--continue", "And which test tool?", "--output-format", "json", *trimmed(TEAM_SYSTEM),
        timeout=TIMEOUT_S,
    )
    second = succeeded(run)
    prefilled = prefilled_total(keyed_server) - before
    # One session, hence one agent (X-Claude-Code-Session-Id), one request per run.
    assert second["session_id"] == first["session_id"], run
    assert first["num_turns"] == second["num_turns"] == 1, run
    usage = second["usage"]
    # The whole first exchange came from the agent's cache: its prompt, and more
    # (the answer it generated), because the billing block that changes on every
    # request never reaches the prompt.
    assert usage["cache_read_input_tokens"] >= prompt_tokens(first["usage"]), (first["usage"], run)
    # The server agrees: it prefilled only the uncached part, a fraction of the prompt.
    assert prefilled <= usage["input_tokens"], (prefilled, run)
    assert prefilled < prompt_tokens(usage) / 4, (prefilled, run)


# ---------------------------------------------------------------- limits and errors


def test_default_prompt_is_too_long_and_the_server_stays_up(claude, keyed_server):
    # No trimming flags: Claude Code's own system prompt and 12 tools, ~12k tokens,
    # and the key as a Bearer token this time.
    run = claude.run(
        "-p", "Say hello.", "--output-format", "json", "--model", MODEL,
        env={"ANTHROPIC_API_KEY": "", "ANTHROPIC_AUTH_TOKEN": API_KEY}, timeout=TIMEOUT_S,
    )
    out = run.json()
    # greenroom answers 400 "prompt is too long: N tokens > M maximum" before any
    # generation. Claude Code recognises the wording: it reports prompt_too_long with
    # the two numbers it parsed from it, and, as a one-message conversation cannot be
    # compacted, gives up at once (exit 1) instead of retrying or hanging.
    assert run.returncode == 1 and out["is_error"] is True, run
    assert out["api_error_status"] == 400 and out["terminal_reason"] == "prompt_too_long", run
    numbers = re.search(r"~(\d+) tokens \(limit (\d+)\)", out["result"])
    assert numbers and int(numbers.group(1)) > int(numbers.group(2)) > 0, run
    assert run.seconds < 120, run
    status, health = keyed_server.get("/health")
    assert status == 200 and health["status"] == "ok", health
    status, body = keyed_server.request(
        "POST", "/v1/messages",
        {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]},
        headers={"x-api-key": API_KEY},
    )
    assert status == 200 and body["content"], body
    assert "Traceback" not in keyed_server.log(), keyed_server.log()[-4000:]


def test_a_wrong_key_is_an_authentication_error(claude):
    run = claude.run(
        "-p", "Say hello.", "--output-format", "json", *trimmed(),
        env={"ANTHROPIC_API_KEY": "not-the-key"}, timeout=TIMEOUT_S,
    )
    out = run.json()
    assert run.returncode == 1 and out["is_error"] is True and out["api_error_status"] == 401, run


# ---------------------------------------------------------------- tools


def test_a_forced_read_tool_call_runs_and_its_result_goes_back(claude):
    """Claude Code has no flag for tool_choice, and the tiny model does not choose a
    tool by itself; CLAUDE_CODE_EXTRA_BODY forces the Read tool on every request, so
    greenroom's constrained decoding writes the call. Claude Code runs it, sends the
    tool_result back, gets a second forced call, and stops at --max-turns 2."""
    notes = claude.project / "notes.txt"
    notes.write_text("The secret word is PINEAPPLE.\n")
    forced = {"temperature": 0, "tool_choice": {"type": "tool", "name": "Read", "disable_parallel_tool_use": True}}
    run = claude.run(
        # A relative name (Claude Code resolves it in its working directory): the
        # tiny model copies a short name reliably and garbles random temporary paths.
        "-p", "Read the file notes.txt", "--output-format", "stream-json", "--verbose", "--max-turns", "2",
        *trimmed("You read files with the Read tool. Pass only file_path.", tools="Read"),
        env={"CLAUDE_CODE_EXTRA_BODY": json.dumps(forced)}, timeout=TIMEOUT_S,
    )
    events = run.events()
    calls = [b for e in events if e["type"] == "assistant" for b in e["message"]["content"] if b["type"] == "tool_use"]
    results = {
        b["tool_use_id"]: b for e in events if e["type"] == "user"
        for b in e["message"]["content"] if isinstance(b, dict) and b.get("type") == "tool_result"
    }
    assert len(calls) == 2 and all(c["name"] == "Read" for c in calls), run
    # Claude Code validated the input against the tool's schema and read the file.
    assert calls[0]["input"]["file_path"] in ("notes.txt", str(notes)), run
    first_result = results[calls[0]["id"]]
    assert not first_result.get("is_error") and "PINEAPPLE" in str(first_result["content"]), run
    # The second call answered a request whose history held the tool_use and its
    # tool_result; the run ended at our turn limit, not on an API error.
    final = events[-1]
    assert final["type"] == "result" and final["terminal_reason"] == "max_turns", run
    assert final.get("api_error_status") is None, run
