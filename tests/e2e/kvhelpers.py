"""Helpers for the KV cache e2e tests (test_persistence.py, test_prefix_sharing.py):
chat calls and their usage figures, the embedded model's tokenizer, read-only views
of a server's cache files (format 2: actors/blockstore.py) and cold reference replies.

The disk views never open a BlockStore: its constructor collects garbage and sweeps
temp files, which would race a live server. They only read: agent files through
actors.blockfile (every array checked against its CRC) and segment headers. A file
the server replaces while we read it fails its checks; the waiting helpers retry.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

KV_BYTES_PER_TOKEN = 46080  # SmolLM2-135M float32: 2 (k, v) * 30 layers * 3 kv heads * 64 dims * 4 bytes
BLOCK = 64  # tokens a shared block holds (actors/prefix_pool.py BLOCK_TOKENS)
GREEDY = dict(temperature=0, max_tokens=12)


# ---------------------------------------------------------------- tokens


def load_tokenizer():
    """The embedded model's tokenizer: the same chat template the server renders."""
    import actors  # noqa: F401  (OpenBLAS before mlx, as the server does)
    import mlx.core as mx

    from actors import loading

    _, meta = mx.load(str(loading.embedded_gguf_path()), return_metadata=True)
    return loading._gguf_tokenizer(meta)


def prompt_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def aligned(n: int) -> int:
    """The part of an n-token prefix that whole shared blocks cover."""
    return n // BLOCK * BLOCK


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- chat


def chat_ok(srv, messages, agent=None, **params):
    status, body = srv.chat(messages, agent=agent, **{**GREEDY, **params})
    assert status == 200, body
    return body


def reply_of(body) -> dict:
    return {"role": "assistant", "content": body["choices"][0]["message"]["content"]}


def text_of(body) -> str:
    return body["choices"][0]["message"]["content"]


def usage(body) -> tuple[int, int, int, int]:
    """(prompt_tokens, cached_tokens, prefilled_tokens, completion_tokens)"""
    u = body["usage"]
    return u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"], u["prefilled_tokens"], u["completion_tokens"]


def held(body) -> int:
    """Tokens the agent's cache holds after this turn: the prompt and every generated token
    but the last, which the model never read (it ended the turn)."""
    prompt, _, _, completion = usage(body)
    return prompt + completion - 1


def assert_same_reply(warm, cold):
    assert text_of(warm) == text_of(cold)
    assert warm["usage"]["completion_tokens"] == cold["usage"]["completion_tokens"]
    assert warm["choices"][0]["finish_reason"] == cold["choices"][0]["finish_reason"]


def prefill_counter(srv) -> float:
    """Prompt tokens the model has run through prefill so far (Prometheus counter)."""
    status, text = srv.get("/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith("greenroom_prefill_tokens_total "):
            return float(line.split()[1])
    pytest.fail("greenroom_prefill_tokens_total missing from /metrics")


def model_tag(srv) -> str:
    status, health = srv.get("/health")
    assert status in (200, 503), health
    return health["model_tag"]


def pool_health(srv) -> tuple[int, str, dict]:
    status, body = srv.get("/health")
    return status, body["status"], body["pool"]


def in_threads(*calls):
    """Run the calls at the same time; their results in order."""
    results = [None] * len(calls)
    errors = []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def cold_replies(fresh_server, cache_dir: Path, requests: list[tuple[list, dict]]) -> list[dict]:
    """The replies of a server that has cached nothing and shares nothing, one request
    after the other: the reference a reply served from a cache must equal. Every request
    is ephemeral and --no-shared-prefix gives each its own scope, so each starts cold.
    Stop the test's own server first (one server at a time)."""
    ref = fresh_server("--no-shared-prefix", "--no-persist", cache_dir=cache_dir)
    try:
        replies = []
        for messages, params in requests:
            body = chat_ok(ref, messages, **params)
            prompt, cached, prefilled, _ = usage(body)
            assert (cached, prefilled) == (0, prompt)
            replies.append(body)
        return replies
    finally:
        ref.stop()


# ---------------------------------------------------------------- files (read-only)


def tag_dir(srv, tag: str) -> Path:
    return srv.cache_dir / "kv" / tag


def agent_path(srv, tag: str, agent: str) -> Path:
    from actors.cachestore import file_name

    return tag_dir(srv, tag) / "agents" / file_name(agent)


def read_agent(srv, tag: str, agent: str):
    """The agent's file (actors.blockfile.SavedAgent), every array checked; None if absent.
    BadFile (or an MLX error) if damaged, or replaced while read."""
    from actors.blockfile import BlockFormat

    path = agent_path(srv, tag, agent)
    if not path.exists():
        return None
    return BlockFormat(tag, BLOCK).read_agent(agent, path)


def segment_keys(srv, tag: str) -> dict[Path, tuple[bytes, ...]]:
    """Every block segment on disk and the keys its header lists (headers only)."""
    import json

    from actors.blockfile import read_header

    out = {}
    for path in sorted((tag_dir(srv, tag) / "blocks").glob("*.safetensors")):
        if path.name.startswith("."):
            continue  # a writer's temp file
        try:
            meta, _ = read_header(path)
        except FileNotFoundError:
            continue  # collected while we listed
        out[path] = tuple(bytes.fromhex(h) for h in json.loads(meta["keys"]))
    return out


def keys_on_disk(srv, tag: str) -> Counter:
    """How many segments hold each block key."""
    return Counter(k for keys in segment_keys(srv, tag).values() for k in keys)


def referenced_keys(saved) -> set[bytes]:
    return {k for b in saved.branches for k in b.block_keys}


def wait_for_saved(srv, tag: str, agent: str, n_tokens: int, prompt=None, scope: str = "", timeout: float = 120):
    """The agent's file once its most recent branch holds n_tokens (and starts with
    `prompt`, if given: a branch of the same length may be on disk already; the
    write-behind lands after the reply), checked: its block keys name exactly its own
    tokens (in `scope`: "" where agents share, the agent id with --no-shared-prefix),
    and every block it references is in a segment on disk."""
    from actors.blockfile import BadFile

    deadline = time.monotonic() + timeout
    saved, last = None, None
    while time.monotonic() < deadline:
        try:
            saved = read_agent(srv, tag, agent)
        except (BadFile, OSError, RuntimeError, ValueError) as exc:  # replaced while we read it
            last = exc
            saved = None
        newest = saved.branches[0].tokens if saved is not None and saved.branches else ()
        if len(newest) == n_tokens and (prompt is None or list(newest[: len(prompt)]) == list(prompt)):
            assert_keys_name_own_tokens(saved, tag, scope)
            missing = referenced_keys(saved) - set(keys_on_disk(srv, tag))
            assert not missing, f"{agent}'s file references {len(missing)} block(s) no segment holds"
            return saved
        time.sleep(0.1)
    got = saved and [len(b.tokens) for b in saved.branches]
    pytest.fail(f"{agent}'s cache never reached {n_tokens} tokens on disk (last: {got or last})")


def assert_keys_name_own_tokens(saved, tag: str, scope: str = "") -> None:
    """Each branch's blocks are the hash chain of its own tokens (in `scope`): a block
    named in an agent's file holds that agent's own tokens, nobody else's."""
    from actors.prefix_pool import chain

    for i, branch in enumerate(saved.branches):
        want = chain(branch.tokens, scope, tag)
        assert list(branch.block_keys) == want, (saved.agent_id, i, len(branch.block_keys), len(want))
        tail = len(branch.tokens) - BLOCK * len(branch.block_keys)
        assert (branch.tail is None) == (tail == 0)
        if branch.tail is not None:
            assert branch.tail.shape[3] == tail


def branch_tokens(saved) -> list[tuple[int, ...]]:
    return [tuple(b.tokens) for b in saved.branches] if saved is not None else []


def reusable(token_lists, prompt) -> int:
    """How many tokens of `prompt` an agent holding these branches starts from: the
    longest common prefix with any of them (never the whole prompt: the model reads at
    least one token). Usually all a branch holds, but not always: a reply's generated
    tokens need not be how the tokenizer splits the same text again."""
    best = max((common_prefix(t, prompt) for t in token_lists), default=0)
    return min(best, len(prompt) - 1)


def shared_start(token_lists, prompt) -> int:
    """How many tokens of `prompt` the shared pool serves when these sequences were
    cached in the same scope: only whole blocks, and only where `prompt` is identical."""
    best = max((aligned(common_prefix(t, prompt)) for t in token_lists), default=0)
    return min(best, len(prompt) - 1)


def resident_figures(saved_agents) -> tuple[int, int, int]:
    """(distinct blocks, block tokens, private tail tokens) that these agents' branches
    hold: what the prefix pool and the sessions keep in memory for them."""
    keys, tails = set(), 0
    for saved in saved_agents:
        for b in saved.branches:
            keys.update(b.block_keys)
            tails += len(b.tokens) - BLOCK * len(b.block_keys)
    return len(keys), BLOCK * len(keys), tails
