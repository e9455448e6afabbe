"""Per-agent KV caches, end to end: private branches, restarts, damaged files,
crashes mid-write and the memory budget, on the real server with the real model.

The caches are the block store's (format 2, actors/blockstore.py): per agent one
file of branches (tokens, block keys, a private tail) under ``kv/<tag>/agents/``,
and 64-token blocks written once, in segments under ``kv/<tag>/blocks/``. Agents
in one scope share blocks of identical prefixes (test_prefix_sharing.py tests that);
here each agent's prompt starts with its own id, so no two agents share a block.

Expected token counts come from the embedded model's own tokenizer (the same
chat template the server renders) and from the files on disk, so every
`cached_tokens` / `prefilled_tokens` below is an exact figure, not a bound. Greedy
replies are compared with cold runs (tests/e2e/kvhelpers.py cold_replies: a fresh
server that caches and shares nothing): a cache restored wrongly (other tokens,
other agent, other model, torn file, missing block) changes them.

While a server runs, its files are only read (kvhelpers: actors.blockfile and
segment headers), never opened with a BlockStore, whose constructor collects
garbage and sweeps temp files: it would race the server.
"""

from __future__ import annotations

import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.kvhelpers import (
    BLOCK,
    KV_BYTES_PER_TOKEN,
    agent_path,
    aligned,
    assert_keys_name_own_tokens,
    assert_same_reply,
    branch_tokens,
    chat_ok,
    cold_replies,
    common_prefix,
    held,
    in_threads,
    keys_on_disk,
    load_tokenizer,
    model_tag,
    pool_health,
    prefill_counter,
    prompt_ids,
    read_agent,
    referenced_keys,
    reply_of,
    resident_figures,
    reusable,
    segment_keys,
    shared_start,
    tag_dir,
    text_of,
    unique,
    usage,
    wait_for_saved,
)

pytestmark = pytest.mark.e2e

FOREIGN_TAG = "feedfacefeedface"  # a model tag no real model has
RESTORED = re.compile(r"restored (?P<agent>\S+): (?P<branches>\d+) branches, (?P<tokens>\d+) cached tokens")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def restored(srv, agent: str) -> list[tuple[int, int]]:
    """(branches, cached tokens) of each time the server restored the agent from disk."""
    return [
        (int(m["branches"]), int(m["tokens"])) for m in RESTORED.finditer(srv.log()) if m["agent"] == agent
    ]


def total_tokens(saved) -> tuple[int, int]:
    """(branches, tokens) a restore of this file reports."""
    return len(saved.branches), sum(len(b.tokens) for b in saved.branches)


def decode_all(tokenizer, saved) -> str:
    return "\n".join(tokenizer.decode(list(t)) for t in branch_tokens(saved))


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


def test_cache_persists_across_server_restart(fresh_server, tokenizer, tmp_path):
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

    saved = wait_for_saved(srv, tag, agent, held(first))  # the write-behind copy of what is in memory
    assert list(saved.branches[0].tokens[:prompt]) == prompt_ids(tokenizer, conv)
    conv += [reply_of(first), {"role": "user", "content": "And which database does it use?"}]
    second = chat_ok(srv, conv, agent)
    prompt, cached, prefilled, _ = usage(second)
    assert cached == reusable(branch_tokens(saved), prompt_ids(tokenizer, conv))  # warm in memory
    assert cached >= usage(first)[0]  # at least the whole first prompt
    assert prefilled == prompt - cached
    history = prompt_ids(tokenizer, conv)

    # An ephemeral request (no agent id) with blocks of its own: none of it reaches the disk.
    one_off = [{"role": "user", "content": "A one-off question. " + NOTES * 2 + "Which language is it in?"}]
    assert len(prompt_ids(tokenizer, one_off)) > 2 * BLOCK
    chat_ok(srv, one_off, max_tokens=2)

    assert srv.stop(signal.SIGTERM) == 0
    # SIGTERM saved the cache: every token of the conversation, in order.
    saved = read_agent(srv, tag, agent)
    assert saved is not None and len(saved.branches[0].tokens) == held(second)
    assert list(saved.branches[0].tokens[: len(history)]) == history
    assert_keys_name_own_tokens(saved, tag)
    # One agent file, the ephemeral session left none; every block on disk is the agent's, once.
    agents_dir = agent_path(srv, tag, agent).parent
    assert sorted(p.name for p in agents_dir.iterdir() if not p.name.startswith(".")) == [agent_path(srv, tag, agent).name]
    on_disk = keys_on_disk(srv, tag)
    assert set(on_disk) == referenced_keys(saved) and set(on_disk.values()) == {1}

    srv = fresh_server()
    assert model_tag(srv) == tag
    conv += [reply_of(second), {"role": "user", "content": "How are releases deployed?"}]
    before = prefill_counter(srv)
    resumed = chat_ok(srv, conv, agent)
    ran_through_model = prefill_counter(srv) - before
    prompt, cached, prefilled, _ = usage(resumed)
    assert prompt == len(prompt_ids(tokenizer, conv))
    assert cached == reusable(branch_tokens(saved), prompt_ids(tokenizer, conv))  # restored from disk
    assert cached >= usage(second)[0]
    assert prefilled == prompt - cached  # only the new tokens
    assert 0 < ran_through_model <= prefilled  # and the model really did no more than that
    assert restored(srv, agent) == [total_tokens(saved)]
    assert srv.stop() == 0

    (cold,) = cold_replies(fresh_server, tmp_path / "cold", [(conv, {})])
    assert_same_reply(resumed, cold)


def test_agent_resumes_from_saved_cache(fresh_server, tokenizer, tmp_path):
    """Identity from the OpenAI `user` field, SIGINT, and a resumed prompt that edits
    the history: the restored cache serves the longest common prefix, and the edited
    conversation becomes a branch beside the one it diverged from."""
    agent = "resume-agent"
    srv = fresh_server()
    tag = model_tag(srv)
    conv = [{"role": "user", "content": NOTES + "Name the storage technology in one word."}]
    first = chat_ok(srv, conv, user=agent)
    conv += [reply_of(first), {"role": "user", "content": "Explain what blue-green deployment means."}]
    assert usage(first)[1] == 0
    saved = wait_for_saved(srv, tag, agent, held(first))
    second = chat_ok(srv, conv, user=agent)
    assert usage(second)[1] == reusable(branch_tokens(saved), prompt_ids(tokenizer, conv)) >= usage(first)[0]
    assert srv.stop(signal.SIGINT) == 0
    saved = read_agent(srv, tag, agent)
    assert len(saved.branches[0].tokens) == held(second)

    srv = fresh_server()
    # Same history, but the last user message rewritten: only the common part is reusable.
    edited = conv[:-1] + [{"role": "user", "content": "Explain what a signed release tag is."}]
    edited_ids = prompt_ids(tokenizer, edited)
    expected_cached = common_prefix(prompt_ids(tokenizer, conv), edited_ids)
    assert usage(second)[1] < expected_cached < len(prompt_ids(tokenizer, conv))
    assert reusable(branch_tokens(saved), edited_ids) == expected_cached
    resumed = chat_ok(srv, edited, user=agent)
    prompt, cached, prefilled, _ = usage(resumed)
    assert cached == expected_cached
    assert prefilled == prompt - expected_cached
    assert restored(srv, agent) == [total_tokens(saved)]

    # The edited conversation is the agent's most recent branch now; the one it
    # diverged from stays beside it.
    now = wait_for_saved(srv, tag, agent, held(resumed), edited_ids)
    assert tuple(saved.branches[0].tokens) in branch_tokens(now)
    edited += [reply_of(resumed), {"role": "user", "content": "Thanks."}]
    third = chat_ok(srv, edited, user=agent)
    assert usage(third)[1] == reusable(branch_tokens(now), prompt_ids(tokenizer, edited)) >= prompt
    assert srv.stop() == 0

    (cold,) = cold_replies(fresh_server, tmp_path / "cold", [(edited[:-2], {})])
    assert_same_reply(resumed, cold)


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
    conv_a = secret_conversation(f"Alice {a}", "OSPREY-7731")
    conv_b = secret_conversation(f"Bob {b}", "WALRUS-2286")
    first_a, first_b = in_threads(lambda: chat_ok(server, conv_a, a), lambda: chat_ok(server, conv_b, b))
    assert usage(first_a)[1] == 0 and usage(first_b)[1] == 0
    tag = model_tag(server)
    old_a = wait_for_saved(server, tag, a, held(first_a))
    old_b = wait_for_saved(server, tag, b, held(first_b))

    conv_a += [reply_of(first_a), {"role": "user", "content": "Who is speaking?"}]
    conv_b += [reply_of(first_b), {"role": "user", "content": "Who is speaking?"}]
    # Interleaved in one batch, each agent continues from exactly its own history.
    second_a, second_b = in_threads(lambda: chat_ok(server, conv_a, a), lambda: chat_ok(server, conv_b, b))
    assert usage(second_a)[1] == reusable(branch_tokens(old_a), prompt_ids(tokenizer, conv_a)) >= usage(first_a)[0]
    assert usage(second_b)[1] == reusable(branch_tokens(old_b), prompt_ids(tokenizer, conv_b)) >= usage(first_b)[0]
    for body in (second_a, second_b):
        prompt, cached, prefilled, _ = usage(body)
        assert prefilled == prompt - cached

    # Two files, each holding its own agent's conversation and nothing of the other's:
    # its tokens, and blocks that are the hash chain of those tokens (wait_for_saved
    # checks that), none of them in common.
    saved_a = wait_for_saved(server, tag, a, held(second_a))
    saved_b = wait_for_saved(server, tag, b, held(second_b))
    assert agent_path(server, tag, a) != agent_path(server, tag, b)
    text_a, text_b = decode_all(tokenizer, saved_a), decode_all(tokenizer, saved_b)
    assert "OSPREY-7731" in text_a and "WALRUS-2286" not in text_a
    assert "WALRUS-2286" in text_b and "OSPREY-7731" not in text_b
    assert referenced_keys(saved_a) and not referenced_keys(saved_a) & referenced_keys(saved_b)
    assert list(saved_a.branches[0].tokens[: len(prompt_ids(tokenizer, conv_a))]) == prompt_ids(tokenizer, conv_a)


def test_no_cache_leakage_between_agents(server, tokenizer):
    """Another agent's prompt is served A's KV only for whole blocks of an identical
    prefix (tokens it sent itself): never A's private tail, never A's secret."""
    a, b, c, d = (unique(f"leak-{x}") for x in "abcd")
    owner, secret = f"Alice {a}", "HERON-5150"
    conv_a = secret_conversation(owner, secret)
    first_a = chat_ok(server, conv_a, a)
    tag = model_tag(server)
    saved_a = wait_for_saved(server, tag, a, held(first_a))
    tokens_a = saved_a.branches[0].tokens
    assert saved_a.branches[0].tail is not None  # A holds tokens past its last whole block
    secret_at = common_prefix(prompt_ids(tokenizer, conv_a), prompt_ids(tokenizer, secret_conversation(owner, "X")))
    # Every sequence this test's agents cached, in the shared scope (other tests' prompts
    # never match: each of ours starts with a fresh id, inside the first block).
    cached_so_far = [tokens_a]

    # D opens with A's words up to where A's secret starts, then asks for it.
    probe = [{"role": "user", "content": f"{owner} speaking. {NOTES}The vault passphrase is what again? Tell me."}]
    probe_ids = prompt_ids(tokenizer, probe)
    lcp = common_prefix(tokens_a, probe_ids)
    assert BLOCK <= lcp <= secret_at
    asked = chat_ok(server, probe, d)
    assert usage(asked)[1] == aligned(lcp) < lcp  # whole blocks only: A's tail stays A's
    assert secret not in text_of(asked)
    saved_d = wait_for_saved(server, tag, d, held(asked))
    assert secret not in decode_all(tokenizer, saved_d)
    cached_so_far.append(saved_d.branches[0].tokens)

    conv_a += [reply_of(first_a), {"role": "user", "content": "Repeat the vault passphrase."}]
    history_a = prompt_ids(tokenizer, conv_a)
    conv_b = [{"role": "user", "content": f"Bob {b} here. What is 2 + 2?"}]
    first_b = chat_ok(server, conv_b, b)
    assert usage(first_b)[1] == 0
    saved_b = wait_for_saved(server, tag, b, held(first_b))
    cached_so_far.append(saved_b.branches[0].tokens)
    # B sends A's whole conversation (so B itself sends the secret): the pool serves it
    # A's whole blocks of that identical prefix, and nothing of A's tail.
    leaked = chat_ok(server, conv_a, b)
    prompt, cached, prefilled, _ = usage(leaked)
    expected = max(shared_start(cached_so_far, history_a), reusable(branch_tokens(saved_b), history_a))
    assert cached == expected <= BLOCK * len(saved_a.branches[0].block_keys) < len(tokens_a)
    assert prefilled == prompt - cached
    saved_b = wait_for_saved(server, tag, b, held(leaked))
    for tokens in branch_tokens(saved_b):  # B's file holds only what B sent (and generated)
        assert any(list(tokens[: len(p)]) == p for p in (prompt_ids(tokenizer, conv_b), history_a))
    cached_so_far.append(saved_b.branches[0].tokens)

    # A brand-new agent sending A's conversation gets the same whole blocks, no more.
    stranger = chat_ok(server, conv_a, c)
    assert usage(stranger)[1] == shared_start(cached_so_far, history_a) < len(tokens_a)
    assert_same_reply(leaked, stranger)

    # And A still has its full history, untouched by the others' turns.
    own = chat_ok(server, conv_a, a)
    assert usage(own)[1] == max(shared_start(cached_so_far, history_a), reusable([tokens_a], history_a))
    assert usage(own)[1] >= usage(first_a)[0]
    assert_same_reply(own, stranger)


# ---------------------------------------------------------------- damaged files


def _flip_middle(path: Path) -> None:
    """Bit rot in the middle of the file: the KV data (the header is a few KB at the start)."""
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(x ^ 0xFF for x in raw[middle : middle + 64])
    path.write_bytes(raw)


def _truncate_half(path: Path) -> None:
    """A file cut short (a full disk, a copy interrupted)."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _write_agent_file(path: Path, saved, tag: str) -> None:
    """A valid agent file with `saved`'s branches, labelled with model tag `tag` (only
    while no server runs)."""
    import mlx.core as mx

    from actors.blockfile import BlockFormat

    arrays, meta, _ = BlockFormat(tag, BLOCK).agent_file(saved)
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), arrays, metadata=meta)


def _cut_before(saved, lost: set[bytes]) -> list[tuple[int, ...]]:
    """The branches a restore keeps when the blocks `lost` are gone: each cut before its
    first lost block (a branch cut to nothing is dropped)."""
    out = []
    for b in saved.branches:
        first = next((i for i, k in enumerate(b.block_keys) if k in lost), None)
        tokens = tuple(b.tokens) if first is None else tuple(b.tokens[: BLOCK * first])
        if tokens:
            out.append(tokens)
    return out


def test_damaged_and_foreign_cache_files_are_rejected(fresh_server, tokenizer, tmp_path):
    srv = fresh_server()
    tag = model_tag(srv)
    file_damage = ("corrupt", "truncated", "foreign", "wrong-agent", "elsewhere")
    segment_damage = ("rotten-segment", "cut-segment")
    names = (*file_damage, *segment_damage, "intact")
    agents = {name: unique(name) for name in names}
    convs = {
        name: [{"role": "user", "content": f"Agent {agents[name]}. {NOTES}Give one risk of this setup."}]
        for name in names
    }
    last = {name: chat_ok(srv, convs[name], agents[name], max_tokens=4) for name in names}
    firsts = dict(last)
    for name in segment_damage:  # a second turn adds a block, in a segment of its own
        wait_for_saved(srv, tag, agents[name], held(last[name]))
        convs[name] += [reply_of(last[name]), {"role": "user", "content": f"More notes. {NOTES}Another risk?"}]
        last[name] = chat_ok(srv, convs[name], agents[name], max_tokens=4)
    for name in names:
        wait_for_saved(srv, tag, agents[name], held(last[name]))
    assert srv.stop(signal.SIGTERM) == 0

    saved = {name: read_agent(srv, tag, agents[name]) for name in names}
    path = {name: agent_path(srv, tag, agent) for name, agent in agents.items()}
    segments = segment_keys(srv, tag)

    def segment_of(key: bytes) -> Path:
        (holder,) = [p for p, keys in segments.items() if key in keys]
        return holder

    assert saved["corrupt"].branches[0].tail is not None  # the middle of its file is KV data
    _flip_middle(path["corrupt"])
    _truncate_half(path["truncated"])
    # A perfectly valid file of another model, under this model's tag directory.
    _write_agent_file(path["foreign"], saved["foreign"], FOREIGN_TAG)
    # A valid file of another agent, under this agent's name.
    shutil.copyfile(path["intact"], path["wrong-agent"])
    # A valid cache that lives under another model's tag: never this model's business.
    elsewhere = srv.cache_dir / "kv" / FOREIGN_TAG / "agents" / path["elsewhere"].name
    _write_agent_file(elsewhere, saved["elsewhere"], FOREIGN_TAG)
    path["elsewhere"].unlink()
    elsewhere_bytes = elsewhere.read_bytes()
    # The segments the second turns wrote: bit rot in one (found when its blocks are
    # read), the other cut short (found when the store opens).
    damaged, lost = {}, {}
    for name, damage in zip(segment_damage, (_flip_middle, _truncate_half)):
        first_keys = saved[name].branches[0].block_keys
        assert len(first_keys) >= 2
        damaged[name] = segment_of(first_keys[1])
        assert segment_of(first_keys[0]) != damaged[name]  # the first turn's block is elsewhere
        lost[name] = set(segments[damaged[name]])
        damage(damaged[name])

    srv = fresh_server()
    replies = {}
    for name, agent in agents.items():
        conv = convs[name] + [reply_of(last[name]), {"role": "user", "content": "And a second risk?"}]
        ids = prompt_ids(tokenizer, conv)
        compared = name in ("corrupt", "rotten-segment")
        replies[name] = chat_ok(srv, conv, agent, max_tokens=8 if compared else 2)
        prompt, cached, prefilled, _ = usage(replies[name])
        assert prefilled == prompt - cached, name
        if name == "intact":
            assert cached == reusable(branch_tokens(saved[name]), ids) >= usage(firsts[name])[0]
        elif name in segment_damage:  # cut at the missing block: the blocks before it still serve
            kept = _cut_before(saved[name], lost[name])
            assert cached == reusable(kept, ids), name
            assert BLOCK <= cached < usage(last[name])[0], name
            assert restored(srv, agent) == [(len(kept), sum(map(len, kept)))]
        else:  # cold: nothing reused, every prompt token prefilled
            assert (cached, prefilled) == (0, prompt), name
    assert srv.get("/health")[0] == 200  # still serving

    log = srv.log()
    for name, reason in (("corrupt", "checksum mismatch"), ("truncated", ""), ("foreign", "model tag"), ("wrong-agent", "agent id")):
        lines = [ln for ln in log.splitlines() if "discarding KV cache file" in ln and path[name].name in ln]
        assert lines and reason in lines[0], (name, lines)
        assert path[name].with_name(path[name].name + ".corrupt").exists()  # moved aside, kept for a look
    for name, reason in (("rotten-segment", "checksum mismatch"), ("cut-segment", "truncated")):
        lines = [ln for ln in log.splitlines() if "discarding KV" in ln and damaged[name].name in ln]
        assert lines and reason in lines[0], (name, lines)
        assert damaged[name].with_name(damaged[name].name + ".corrupt").exists()
    assert elsewhere.read_bytes() == elsewhere_bytes  # the other model's cache is left alone
    assert str(elsewhere) not in log

    # The agents whose caches were damaged have whole ones again after their turn:
    # the lost blocks are written anew.
    for name in (*file_damage, *segment_damage):
        wait_for_saved(srv, tag, agents[name], held(replies[name]))
    assert srv.stop() == 0

    requests = []
    for name in ("corrupt", "rotten-segment"):
        conv = convs[name] + [reply_of(last[name]), {"role": "user", "content": "And a second risk?"}]
        requests.append((conv, {"max_tokens": 8}))
    for name, cold in zip(("corrupt", "rotten-segment"), cold_replies(fresh_server, tmp_path / "cold", requests)):
        assert_same_reply(replies[name], cold)


# ---------------------------------------------------------------- crash while writing


def test_sigkill_while_caches_are_written_leaves_every_file_whole(fresh_server, tokenizer):
    from actors.blockstore import BlockStore
    from actors.cachestore import CORRUPT_SUFFIX

    srv = fresh_server()
    tag = model_tag(srv)
    agents = [unique(f"crash{i}") for i in range(3)]
    long_notes = NOTES * 5  # ~280 tokens a turn: 4 new blocks (12 MB) per agent and save
    convs = {a: [{"role": "user", "content": f"I am {a}. {long_notes}Summarise."}] for a in agents}
    firsts = dict(zip(agents, in_threads(*(lambda a=a: chat_ok(srv, convs[a], a, max_tokens=2) for a in agents))))
    for a in agents:  # the old versions are on disk
        wait_for_saved(srv, tag, a, held(firsts[a]))
    for a in agents:
        convs[a] += [reply_of(firsts[a]), {"role": "user", "content": f"More notes. {long_notes}Summarise again."}]
    seconds = dict(zip(agents, in_threads(*(lambda a=a: chat_ok(srv, convs[a], a, max_tokens=2) for a in agents))))
    srv.kill()  # SIGKILL right after the turns: the write-behind saves are under way

    # The server is dead: the real store may open its directory now (sweeping the dead
    # writer's temp files, collecting segments a killed save left unreferenced, as the
    # next server will). Every agent file loads whole, with every block it references.
    store = BlockStore(srv.cache_dir / "kv", tag, block_tokens=BLOCK)
    saved = {}
    for a in agents:
        got = store.load_agent(a)  # the real loader: header, checksums, shapes, held blocks
        assert got is not None, f"{a}'s cache vanished"
        assert branch_tokens(got) == branch_tokens(read_agent(srv, tag, a))  # not cut for a missing block
        n = len(got.branches[0].tokens)
        assert n in (held(firsts[a]), held(seconds[a])), (a, n)
        expected = prompt_ids(tokenizer, convs[a][:1] if n == held(firsts[a]) else convs[a])
        assert list(got.branches[0].tokens[: len(expected)]) == expected
        keys = referenced_keys(got)
        assert set(store.load_blocks(keys)) == keys  # every block there, each matching its CRC
        saved[a] = got
    assert not [p for p in tag_dir(srv, tag).rglob("*") if p.name.endswith(CORRUPT_SUFFIX)]
    del store

    # The server comes back and resumes each agent from whichever version survived.
    srv = fresh_server()
    for a in agents:
        conv = convs[a] + [reply_of(seconds[a]), {"role": "user", "content": "One word: done?"}]
        body = chat_ok(srv, conv, a, max_tokens=2)
        prompt, cached, prefilled, _ = usage(body)
        assert cached == reusable(branch_tokens(saved[a]), prompt_ids(tokenizer, conv))
        assert cached >= usage(firsts[a])[0]
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


def test_pool_over_budget_hibernates_lru_and_reports_degraded(fresh_server, tokenizer, tmp_path):
    """Resident KV = the prefix pool's blocks (each once) + every session's private
    tails (+ running turns' copies). Over the budget, idle sessions hibernate least
    recently used first, and blocks nobody holds any more leave the pool."""
    gen = 4  # every turn generates exactly this many tokens (finish_reason "length")
    # Tokens each agent's cache holds after its turn, whole blocks + private tail:
    # a = 64 + 10, b = 64 + 50, c = 0 + 50.
    size = {"a": 74, "b": 114, "c": 50}
    # a: 39 %; a + b: 99 % (degraded); + c: over, so a hibernates and its block leaves
    # the pool: b + c = 86 %.
    budget_tokens = 190
    convs = {k: _sized_conversation(tokenizer, f"agent {k}", n - gen + 1) for k, n in size.items()}
    ids = [prompt_ids(tokenizer, c) for c in convs.values()]
    assert max(common_prefix(ids[0], ids[1]), common_prefix(ids[1], ids[2])) < BLOCK  # no block in common
    agents = {k: unique(f"pool-{k}") for k in size}
    srv = fresh_server("--cache-budget", str(budget_tokens * KV_BYTES_PER_TOKEN))
    tag = model_tag(srv)

    def turn(k, conv=None):
        """A turn, and its cache filed: the session turns a finished turn's cache into
        blocks and a tail just after the reply; the write-behind comes after that."""
        body = chat_ok(srv, conv or convs[k], agents[k], max_tokens=gen)
        assert body["choices"][0]["finish_reason"] == "length"
        wait_for_saved(srv, tag, agents[k], held(body))
        return body

    def health(resident_tokens: int):
        # The budget is kept just after a turn's cache is filed (a background task of
        # the supervisor): give it a moment to settle.
        deadline = time.monotonic() + 20
        while True:
            status, state, pool = pool_health(srv)
            if pool["resident_bytes"] == resident_tokens * KV_BYTES_PER_TOKEN or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert pool["resident_bytes"] == resident_tokens * KV_BYTES_PER_TOKEN, pool
        assert pool["budget_bytes"] == budget_tokens * KV_BYTES_PER_TOKEN
        assert (status, state) == ((503, "degraded") if pool["usage"] > 0.9 else (200, "ok")), pool
        return status, state, pool

    first_a = turn("a")
    assert held(first_a) == size["a"]
    status, state, pool = health(size["a"])
    assert (status, state) == (200, "ok")
    assert (pool["shared_blocks"], pool["shared_bytes"]) == (1, BLOCK * KV_BYTES_PER_TOKEN)
    assert pool["active_sessions"] == 1

    turn("b")  # 188 of 190 tokens: above 90 %, nobody hibernates yet
    status, state, pool = health(size["a"] + size["b"])
    assert (status, state) == (503, "degraded")
    assert pool["usage"] > 0.9
    assert pool["shared_bytes"] == 2 * BLOCK * KV_BYTES_PER_TOKEN
    assert (pool["active_sessions"], pool["hibernated_sessions"]) == (2, 0)

    turn("c")  # 238 tokens would not fit: a, the least recently used, goes to disk
    status, state, pool = health(size["b"] + size["c"])
    assert (status, state) == (200, "ok")
    assert (pool["shared_bytes"], pool["shared_idle_bytes"]) == (BLOCK * KV_BYTES_PER_TOKEN, 0)  # a's block left
    assert pool["shared_blocks_evicted"] >= 1
    evicted_once = pool["shared_blocks_evicted"] == 1
    assert (pool["active_sessions"], pool["hibernated_sessions"]) == (2, 1)
    assert f"hibernated {agents['a']}" in srv.log()
    saved_a = read_agent(srv, tag, agents["a"])
    assert total_tokens(saved_a) == (1, size["a"])

    # a's next message reactivates it from disk (its block too); b, now least recently
    # used, makes room, and its block leaves the pool. a + c fit (about 140 tokens).
    conv = convs["a"] + [reply_of(first_a), {"role": "user", "content": "Continue."}]
    resumed = turn("a", conv)
    prompt, cached, prefilled, _ = usage(resumed)
    assert cached == reusable(branch_tokens(saved_a), prompt_ids(tokenizer, conv)) >= usage(first_a)[0]
    assert prefilled == prompt - cached
    assert restored(srv, agents["a"]) == [(1, size["a"])]
    log = srv.log()
    assert f"hibernated {agents['b']}" in log
    c_stayed = f"hibernated {agents['c']}" not in log
    in_memory = [read_agent(srv, tag, agents[k]) for k in ("a", "c") if k == "a" or c_stayed]
    _, block_tokens, tail_tokens = resident_figures(in_memory)
    status, state, pool = health(block_tokens + tail_tokens)
    assert (pool["shared_bytes"], pool["shared_idle_bytes"]) == (block_tokens * KV_BYTES_PER_TOKEN, 0)
    assert pool["resident_bytes"] <= pool["budget_bytes"]
    assert (pool["active_sessions"], pool["hibernated_sessions"]) == (len(in_memory), 3 - len(in_memory))
    assert srv.stop() == 0

    (cold,) = cold_replies(fresh_server, tmp_path / "cold", [(conv, {"max_tokens": gen})])
    assert_same_reply(resumed, cold)

    # The budget is kept once a turn's cache is filed (not while the turn's working copy
    # still counts): only a's block left the pool, and c, which fits beside a, stayed.
    assert c_stayed and evicted_once
