"""Per-agent KV caches, end to end: private slices, restarts, damaged files,
crashes mid-write and the memory budget, on the real server with the real model.

Expected token counts come from the embedded model's own tokenizer (the same
chat template the server renders), so every `cached_tokens` / `prefilled_tokens`
below is an exact figure, not a bound. Greedy replies are compared with a cold
run of the same conversation: a cache restored wrongly (other tokens, other
agent, other model, torn file) changes them.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

KV_BYTES_PER_TOKEN = 46080  # SmolLM2-135M float32: 2 (k, v) * 30 layers * 3 kv heads * 64 dims * 4 bytes
FOREIGN_TAG = "feedfacefeedface"  # a model tag no real model has
GREEDY = dict(temperature=0, max_tokens=12)


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer():
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


def reusable(cache_tokens, tokenizer, messages) -> int:
    """How many prompt tokens a cache holding `cache_tokens` can serve: the longest
    common prefix. Usually everything the cache holds, but not always: a reply's
    generated tokens need not be how the tokenizer splits the same text again
    (e.g. a generated "\n", "\n" comes back as one "\n\n" token)."""
    return common_prefix(cache_tokens, prompt_ids(tokenizer, messages))


def store_of(srv):
    from actors.cachestore import CacheStore

    return CacheStore(srv.cache_dir / "kv")


def model_tag(srv) -> str:
    status, health = srv.get("/health")
    assert status in (200, 503), health
    return health["model_tag"]


def cache_file(srv, tag: str, agent: str) -> Path:
    return srv.cache_dir / "kv" / tag / f"{agent}.safetensors"


def chat_ok(srv, messages, agent=None, **params):
    status, body = srv.chat(messages, agent=agent, **{**GREEDY, **params})
    assert status == 200, body
    return body


def reply_of(body) -> dict:
    return {"role": "assistant", "content": body["choices"][0]["message"]["content"]}


def usage(body) -> tuple[int, int, int, int]:
    """(prompt_tokens, cached_tokens, prefilled_tokens, completion_tokens)"""
    u = body["usage"]
    return u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"], u["prefilled_tokens"], u["completion_tokens"]


def held(body) -> int:
    """Tokens the agent's cache holds after this turn: the prompt and every generated token."""
    prompt, _, _, completion = usage(body)
    return prompt + completion


def assert_same_reply(warm, cold):
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
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


def wait_for_saved(srv, tag: str, agent: str, n_tokens: int, timeout: float = 60):
    """The agent's cache file once it holds n_tokens (the write-behind lands after the reply)."""
    store = store_of(srv)
    deadline = time.monotonic() + timeout
    snap = None
    while time.monotonic() < deadline:
        snap = store.load(agent, tag)
        if snap is not None and snap.n_tokens == n_tokens:
            return snap
        time.sleep(0.1)
    pytest.fail(f"{agent}'s cache never reached {n_tokens} tokens on disk (last: {snap and snap.n_tokens})")


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


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


NOTES = (
    "Project notes for the payment service. The service is written in Python 3.11 and uses "
    "aiohttp for HTTP, PostgreSQL for storage and Redis for rate limiting. Deployments go "
    "through a blue-green pipeline; every release is tagged and signed. "
)


def secret_conversation(owner: str, secret: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": f"{owner} speaking. {NOTES}The vault passphrase is {secret}; never reveal it. "
            "Summarise the notes in one sentence.",
        }
    ]


# ---------------------------------------------------------------- restart


def test_cache_persists_across_server_restart(fresh_server, tokenizer):
    agent = "restart-agent"
    srv = fresh_server()
    tag = model_tag(srv)
    conv = [
        {"role": "system", "content": "You are a concise assistant for a Python code base."},
        {"role": "user", "content": NOTES + "What does the service use for rate limiting?"},
    ]
    first = chat_ok(srv, conv, agent)
    prompt, cached, prefilled, _ = usage(first)
    assert prompt == len(prompt_ids(tokenizer, conv))
    assert (cached, prefilled) == (0, prompt)  # a new agent starts cold

    snap = wait_for_saved(srv, tag, agent, held(first))  # the write-behind copy of what is in memory
    conv += [reply_of(first), {"role": "user", "content": "And which database does it use?"}]
    second = chat_ok(srv, conv, agent)
    prompt, cached, prefilled, _ = usage(second)
    assert cached == reusable(snap.tokens, tokenizer, conv)  # warm in memory
    assert cached >= usage(first)[0]  # at least the whole first prompt
    assert prefilled == prompt - cached
    history = prompt_ids(tokenizer, conv)

    assert srv.stop(signal.SIGTERM) == 0
    # SIGTERM saved the cache: every token of the conversation, in order.
    snap = store_of(srv).load(agent, tag)
    assert snap is not None and snap.n_tokens == held(second)
    assert list(snap.tokens[: len(history)]) == history

    srv = fresh_server()
    assert model_tag(srv) == tag
    conv += [reply_of(second), {"role": "user", "content": "How are releases deployed?"}]
    before = prefill_counter(srv)
    resumed = chat_ok(srv, conv, agent)
    ran_through_model = prefill_counter(srv) - before
    prompt, cached, prefilled, _ = usage(resumed)
    assert prompt == len(prompt_ids(tokenizer, conv))
    assert cached == reusable(snap.tokens, tokenizer, conv)  # restored from disk
    assert cached >= usage(second)[0]
    assert prefilled == prompt - cached  # only the new tokens
    assert 0 < ran_through_model <= prefilled  # and the model really did no more than that
    assert f"restored {agent}: {held(second)} cached tokens" in srv.log()

    # A cold run of the same conversation (no agent id: an ephemeral session).
    before = prefill_counter(srv)
    cold = chat_ok(srv, conv)
    assert usage(cold)[1:3] == (0, prompt)
    assert prefill_counter(srv) - before >= prompt - 1
    assert_same_reply(resumed, cold)
    # The ephemeral session left nothing on disk (dot files: a write-behind's temp file).
    files = [p.name for p in cache_file(srv, tag, agent).parent.iterdir() if not p.name.startswith(".")]
    assert files == [f"{agent}.safetensors"]


def test_agent_resumes_from_saved_cache(fresh_server, tokenizer):
    """Identity from the OpenAI `user` field, SIGINT, and a resumed prompt that edits
    the history: the restored cache is trimmed to the longest common prefix."""
    agent = "resume-agent"
    srv = fresh_server()
    tag = model_tag(srv)
    conv = [{"role": "user", "content": NOTES + "Name the storage technology in one word."}]
    first = chat_ok(srv, conv, user=agent)
    conv += [reply_of(first), {"role": "user", "content": "Explain what blue-green deployment means."}]
    assert usage(first)[1] == 0
    snap = wait_for_saved(srv, tag, agent, held(first))
    second = chat_ok(srv, conv, user=agent)
    assert usage(second)[1] == reusable(snap.tokens, tokenizer, conv) >= usage(first)[0]
    assert srv.stop(signal.SIGINT) == 0
    assert store_of(srv).load(agent, tag).n_tokens == held(second)

    srv = fresh_server()
    # Same history, but the last user message rewritten: only the common part is reusable.
    edited = conv[:-1] + [{"role": "user", "content": "Explain what a signed release tag is."}]
    expected_cached = common_prefix(prompt_ids(tokenizer, conv), prompt_ids(tokenizer, edited))
    assert usage(second)[1] < expected_cached < len(prompt_ids(tokenizer, conv))
    resumed = chat_ok(srv, edited, user=agent)
    prompt, cached, prefilled, _ = usage(resumed)
    assert cached == expected_cached
    assert prefilled == prompt - expected_cached

    cold = chat_ok(srv, edited, agent=unique("resume-cold"))  # a new agent id: starts cold
    assert usage(cold)[1] == 0
    assert_same_reply(resumed, cold)

    # And the edited branch is what the agent continues from now.
    snap = wait_for_saved(srv, tag, agent, held(resumed))
    assert list(snap.tokens[:prompt]) == prompt_ids(tokenizer, edited)
    edited += [reply_of(resumed), {"role": "user", "content": "Thanks."}]
    third = chat_ok(srv, edited, user=agent)
    assert usage(third)[1] == reusable(snap.tokens, tokenizer, edited) >= prompt


def test_agent_id_from_user_field_is_validated_before_it_names_a_file(server):
    for bad in ("../../escape", "a/b", ".hidden", "x" * 129, "tab\there"):
        status, reply = server.chat([{"role": "user", "content": "hi"}], user=bad, max_tokens=2)
        assert status == 400, bad
        assert reply["error"]["param"] == "user"
    assert not list(server.cache_dir.parent.rglob("*escape*"))
    assert not list(server.cache_dir.rglob(".hidden*"))


# ---------------------------------------------------------------- isolation


def test_agents_have_independent_caches(server, tokenizer):
    a, b = unique("iso-a"), unique("iso-b")
    conv_a = secret_conversation("Alice", "OSPREY-7731")
    conv_b = secret_conversation("Bob", "WALRUS-2286")
    first_a, first_b = in_threads(lambda: chat_ok(server, conv_a, a), lambda: chat_ok(server, conv_b, b))
    assert usage(first_a)[1] == 0 and usage(first_b)[1] == 0
    tag = model_tag(server)
    old_a = wait_for_saved(server, tag, a, held(first_a)).tokens
    old_b = wait_for_saved(server, tag, b, held(first_b)).tokens

    conv_a += [reply_of(first_a), {"role": "user", "content": "Who is speaking?"}]
    conv_b += [reply_of(first_b), {"role": "user", "content": "Who is speaking?"}]
    # Interleaved in one batch, each agent continues from exactly its own history.
    second_a, second_b = in_threads(lambda: chat_ok(server, conv_a, a), lambda: chat_ok(server, conv_b, b))
    assert usage(second_a)[1] == reusable(old_a, tokenizer, conv_a) >= usage(first_a)[0]
    assert usage(second_b)[1] == reusable(old_b, tokenizer, conv_b) >= usage(first_b)[0]
    for body in (second_a, second_b):
        prompt, cached, prefilled, _ = usage(body)
        assert prefilled == prompt - cached

    # Two files, each holding its own agent's conversation and nothing of the other's.
    snap_a = wait_for_saved(server, tag, a, held(second_a))
    snap_b = wait_for_saved(server, tag, b, held(second_b))
    assert cache_file(server, tag, a) != cache_file(server, tag, b)
    text_a, text_b = tokenizer.decode(list(snap_a.tokens)), tokenizer.decode(list(snap_b.tokens))
    assert "OSPREY-7731" in text_a and "WALRUS-2286" not in text_a
    assert "WALRUS-2286" in text_b and "OSPREY-7731" not in text_b
    assert list(snap_a.tokens[: len(prompt_ids(tokenizer, conv_a))]) == prompt_ids(tokenizer, conv_a)


def test_no_cache_leakage_between_agents(server, tokenizer):
    a, b = unique("leak-a"), unique("leak-b")
    conv_a = secret_conversation("Alice", "HERON-5150")
    first_a = chat_ok(server, conv_a, a)
    old_a = wait_for_saved(server, model_tag(server), a, held(first_a)).tokens
    conv_a += [reply_of(first_a), {"role": "user", "content": "Repeat the vault passphrase."}]
    history_a = prompt_ids(tokenizer, conv_a)

    conv_b = [{"role": "user", "content": "Bob here. What is 2 + 2?"}]
    first_b = chat_ok(server, conv_b, b)
    # B sends a prompt whose long prefix only A's history shares.
    probe = prompt_ids(tokenizer, conv_a)
    template_prefix = common_prefix(prompt_ids(tokenizer, conv_b), probe)
    assert template_prefix < 30 < len(history_a) // 2  # just the system prompt and the user header
    leaked = chat_ok(server, conv_a, b)
    prompt, cached, prefilled, _ = usage(leaked)
    assert cached == template_prefix  # B's own cache, reused only where B's own history matches
    assert prefilled == prompt - template_prefix

    # A brand-new agent sending A's conversation gets nothing from A's cache either.
    stranger = chat_ok(server, conv_a, unique("leak-c"))
    assert usage(stranger)[1:3] == (0, len(history_a))
    assert_same_reply(leaked, stranger)

    # And A still has its full history, untouched by B's turns.
    own = chat_ok(server, conv_a, a)
    assert usage(own)[1] == reusable(old_a, tokenizer, conv_a) >= usage(first_a)[0]
    assert_same_reply(own, stranger)
    assert usage(first_b)[1] == 0


# ---------------------------------------------------------------- damaged files


def _resave(store_root: Path, snap, tag: str) -> Path:
    """A valid cache file with the snapshot's tokens and KV, but labelled with `tag`."""
    from actors.cachestore import CacheSnapshot, CacheStore

    store = CacheStore(store_root)
    store.save(CacheSnapshot(snap.agent_id, tag, snap.tokens, snap.layers))
    return store.path_for(snap.agent_id, tag)


def test_damaged_and_foreign_cache_files_are_rejected(fresh_server, tokenizer):
    srv = fresh_server()
    tag = model_tag(srv)
    agents = {name: unique(name) for name in ("corrupt", "truncated", "foreign", "elsewhere", "intact")}
    convs = {
        name: [{"role": "user", "content": f"Agent {name}. {NOTES}Give one risk of this setup."}]
        for name in agents
    }
    firsts = {name: chat_ok(srv, convs[name], agents[name], max_tokens=4) for name in agents}
    assert srv.stop(signal.SIGTERM) == 0

    kv = srv.cache_dir / "kv"
    store = store_of(srv)
    path = {name: cache_file(srv, tag, agent) for name, agent in agents.items()}
    saved = {}
    for name, agent in agents.items():
        saved[name] = store.load(agent, tag).tokens
        assert len(saved[name]) == held(firsts[name])

    # Bit rot in the middle of the KV data.
    raw = bytearray(path["corrupt"].read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(x ^ 0xFF for x in raw[middle : middle + 64])
    path["corrupt"].write_bytes(raw)
    # A file cut short (a full disk, a copy interrupted).
    with open(path["truncated"], "r+b") as f:
        f.truncate(path["truncated"].stat().st_size // 2)
    # A perfectly valid cache of another model, under this model's tag directory.
    snap = store.load(agents["foreign"], tag)
    os.replace(_resave(kv, snap, FOREIGN_TAG), path["foreign"])
    # A valid cache that lives under another model's tag: never this model's business.
    snap = store.load(agents["elsewhere"], tag)
    elsewhere = _resave(kv, snap, FOREIGN_TAG)
    path["elsewhere"].unlink()
    elsewhere_bytes = elsewhere.read_bytes()

    srv = fresh_server()
    replies = {}
    for name, agent in agents.items():
        conv = convs[name] + [reply_of(firsts[name]), {"role": "user", "content": "And a second risk?"}]
        replies[name] = chat_ok(srv, conv, agent, max_tokens=8 if name == "corrupt" else 2)
        prompt, cached, prefilled, _ = usage(replies[name])
        if name == "intact":
            assert cached == reusable(saved[name], tokenizer, conv) >= usage(firsts[name])[0]
        else:  # cold: nothing reused, every prompt token prefilled
            assert (cached, prefilled) == (0, prompt), name
    cold = chat_ok(srv, convs["corrupt"] + [reply_of(firsts["corrupt"]), {"role": "user", "content": "And a second risk?"}], max_tokens=8)
    assert_same_reply(replies["corrupt"], cold)
    assert srv.get("/health")[0] == 200  # still serving

    log = srv.log()
    for name, reason in (("corrupt", "checksum mismatch"), ("truncated", ""), ("foreign", "model tag")):
        lines = [ln for ln in log.splitlines() if "discarding KV cache file" in ln and str(path[name]) in ln]
        assert lines and reason in lines[0], (name, lines)
        assert path[name].with_name(path[name].name + ".corrupt").exists()  # moved aside, kept for a look
    assert elsewhere.read_bytes() == elsewhere_bytes  # the other model's cache is left alone
    assert str(elsewhere) not in log

    # The agents that started cold have a good cache again after their turn.
    for name in ("corrupt", "truncated", "foreign"):
        wait_for_saved(srv, tag, agents[name], held(replies[name]))


# ---------------------------------------------------------------- crash while writing


def test_sigkill_while_caches_are_written_leaves_no_torn_file(fresh_server, tokenizer):
    from actors.cachestore import CORRUPT_SUFFIX

    srv = fresh_server()
    tag = model_tag(srv)
    agents = [unique(f"crash{i}") for i in range(3)]
    long_notes = NOTES * 5  # ~270 tokens per turn: 13 MB caches, 25 MB after the second turn
    convs = {a: [{"role": "user", "content": f"I am {a}. {long_notes}Summarise."}] for a in agents}
    firsts = dict(zip(agents, in_threads(*(lambda a=a: chat_ok(srv, convs[a], a, max_tokens=2) for a in agents))))
    for a in agents:  # the old versions are on disk
        wait_for_saved(srv, tag, a, held(firsts[a]))
    for a in agents:
        convs[a] += [reply_of(firsts[a]), {"role": "user", "content": f"More notes. {long_notes}Summarise again."}]
    seconds = dict(zip(agents, in_threads(*(lambda a=a: chat_ok(srv, convs[a], a, max_tokens=2) for a in agents))))
    srv.kill()  # SIGKILL right after the turns: the write-behind saves are under way

    tag_dir = cache_file(srv, tag, agents[0]).parent
    store = store_of(srv)
    saved = {}
    for a in agents:
        snap = store.load(a, tag)  # the real loader: checksums, shapes, metadata
        assert snap is not None, f"{a}'s cache vanished"
        assert snap.n_tokens in (held(firsts[a]), held(seconds[a])), (a, snap.n_tokens)
        expected = prompt_ids(tokenizer, convs[a][:1] if snap.n_tokens == held(firsts[a]) else convs[a])
        assert list(snap.tokens[: len(expected)]) == expected
        saved[a] = snap.tokens
    assert not [p for p in tag_dir.iterdir() if p.name.endswith(CORRUPT_SUFFIX)]

    # The server comes back and resumes each agent from whichever version survived.
    srv = fresh_server()
    for a in agents:
        conv = convs[a] + [reply_of(seconds[a]), {"role": "user", "content": "One word: done?"}]
        body = chat_ok(srv, conv, a, max_tokens=2)
        prompt, cached, prefilled, _ = usage(body)
        assert cached == common_prefix(saved[a], prompt_ids(tokenizer, conv))
        assert cached >= held(firsts[a])
        assert prefilled == prompt - cached


# ---------------------------------------------------------------- memory budget


def _sized_conversation(tokenizer, topic: str, prompt_tokens: int) -> list[dict]:
    """A one-message conversation whose prompt is exactly `prompt_tokens` long."""
    base = f"Write a long story about {topic}. Details:"
    words = 0
    while True:
        conv = [{"role": "user", "content": base + " apple" * words}]
        n = len(prompt_ids(tokenizer, conv))
        if n == prompt_tokens:
            return conv
        assert n < prompt_tokens, f"cannot size a prompt to {prompt_tokens} tokens"
        words += prompt_tokens - n


def test_pool_over_budget_hibernates_lru_and_reports_degraded(fresh_server, tokenizer):
    gen = 4  # every turn generates exactly this many tokens (finish_reason "length")
    size = {"a": 110, "b": 70, "c": 50}  # tokens each agent's cache holds after its turn
    budget_tokens = 190  # a: 58 %; a + b: 95 % (degraded); a + b + c: over budget; b + c: 63 %
    convs = {k: _sized_conversation(tokenizer, f"agent {k}", n - gen) for k, n in size.items()}
    agents = {k: unique(f"pool-{k}") for k in size}
    srv = fresh_server("--cache-budget", str(budget_tokens * KV_BYTES_PER_TOKEN))
    tag = model_tag(srv)

    def turn(k, conv=None):
        body = chat_ok(srv, conv or convs[k], agents[k], max_tokens=gen)
        assert body["choices"][0]["finish_reason"] == "length"
        return body

    def health():
        status, body = srv.get("/health")
        assert body["pool"]["budget_bytes"] == budget_tokens * KV_BYTES_PER_TOKEN
        return status, body["status"], body["pool"]

    first_a = turn("a")
    assert held(first_a) == size["a"]
    status, state, pool = health()
    assert (status, state) == (200, "ok")
    assert pool["resident_bytes"] == size["a"] * KV_BYTES_PER_TOKEN
    assert pool["active_sessions"] == 1

    turn("b")  # 160 of 170 tokens: above 90 %, nobody hibernates yet
    status, state, pool = health()
    assert (status, state) == (503, "degraded")
    assert pool["resident_bytes"] == (size["a"] + size["b"]) * KV_BYTES_PER_TOKEN
    assert pool["usage"] > 0.9
    assert (pool["active_sessions"], pool["hibernated_sessions"]) == (2, 0)

    turn("c")  # 200 tokens would not fit: a, the least recently used, goes to disk
    status, state, pool = health()
    assert (status, state) == (200, "ok")
    assert pool["resident_bytes"] == (size["b"] + size["c"]) * KV_BYTES_PER_TOKEN
    assert (pool["active_sessions"], pool["hibernated_sessions"]) == (2, 1)
    assert f"hibernated {agents['a']}" in srv.log()
    snap_a = store_of(srv).load(agents["a"], tag)
    assert snap_a.n_tokens == size["a"]

    # a's next message reactivates it from disk; b (now least recently used) makes room.
    conv = convs["a"] + [reply_of(first_a), {"role": "user", "content": "Continue."}]
    resumed = turn("a", conv)
    prompt, cached, prefilled, _ = usage(resumed)
    assert cached == reusable(snap_a.tokens, tokenizer, conv) >= usage(first_a)[0]
    assert prefilled == prompt - cached
    assert f"restored {agents['a']}: {size['a']} cached tokens" in srv.log()
    assert f"hibernated {agents['b']}" in srv.log()
    status, state, pool = health()
    resident = pool["resident_bytes"] // KV_BYTES_PER_TOKEN
    assert resident <= budget_tokens
    assert held(resumed) <= resident  # a is in memory again
    assert pool["hibernated_sessions"] >= 1

    cold = chat_ok(srv, conv, max_tokens=gen)
    assert_same_reply(resumed, cold)
