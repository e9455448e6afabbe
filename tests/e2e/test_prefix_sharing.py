"""Issue 12 from the outside: agents that send the same prompt prefix share its KV
(computed once, held once in memory, written once on disk), an agent keeps several
conversations, and nothing of one agent's own tokens reaches another.

Real server, real embedded model, greedy decoding. Prompts open with one system
prompt (a few hundred tokens, ~1k where memory and prefill are measured), so
several 64-token blocks are shared; expected figures come from the model's own
tokenizer and the files on disk (tests/e2e/kvhelpers.py), and the numbers worth
knowing are printed (pytest -s shows them).

Which of these fail on the server before issue 12 (one whole-cache file per agent,
no shared pool, one cache per agent): the second agent's start, the memory held
once, the disk written once, the side call and the burst all do (every agent
prefilled and held its own copy, a side call replaced the main conversation's
cache); the privacy test guards the new sharing (an old server never shared, and
has no --no-shared-prefix flag, so it fails only there).
"""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.e2e.kvhelpers import (
    BLOCK,
    KV_BYTES_PER_TOKEN,
    aligned,
    assert_same_reply,
    branch_tokens,
    chat_ok,
    cold_replies,
    common_prefix,
    held,
    in_threads,
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
    text_of,
    unique,
    usage,
    wait_for_saved,
)
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.e2e

MB = 1 << 20
RULES = [
    "Read the whole diff before commenting on any line of it.",
    "Name functions for what they return, and variables for what they hold.",
    "Prefer small pure functions; keep side effects at the edges.",
    "Every public function has a docstring that states its contract.",
    "Tests assert behaviour a user would notice, never private details.",
    "Bad input gets a clear error message, never a stack trace.",
    "Money is handled in integer cents, never in floating point.",
    "Log the request id with every message about a payment.",
]


def system_prompt(rules: int, padding: int = 0) -> dict:
    """The team's shared instructions: ~17 tokens a rule (18 rules: ~340 tokens of
    prompt, 58: ~1k). `padding` words at the end move where the prompt ends."""
    text = "You are the code review assistant of the payments team. Follow the house rules. "
    text += " ".join(f"Rule {i + 1}: {RULES[i % len(RULES)]}" for i in range(rules))
    return {"role": "system", "content": text + " Thanks." * padding}


SYSTEM = system_prompt(18)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def shared_prefix(tokenizer, convs) -> int:
    """Tokens every conversation's prompt starts with."""
    ids = [prompt_ids(tokenizer, c) for c in convs]
    return min(common_prefix(ids[0], other) for other in ids[1:])


# ---------------------------------------------------------------- two agents


def test_second_agent_starts_from_the_first_ones_system_prompt(fresh_server, tokenizer, tmp_path):
    # Before issue 12: B's first turn reported 0 cached tokens (each agent had only its own cache).
    a, b = unique("first"), unique("second")
    conv_a = [SYSTEM, {"role": "user", "content": "Review: def add(a, b): return a - b"}]
    conv_b = [SYSTEM, {"role": "user", "content": "Review: def area(r): return 3.14 * r * r"}]
    shared = shared_prefix(tokenizer, [conv_a, conv_b])
    assert shared >= 4 * BLOCK

    srv = fresh_server()
    first_a = chat_ok(srv, conv_a, a, max_tokens=8)
    assert usage(first_a)[1] == 0
    first_b = chat_ok(srv, conv_b, b, max_tokens=8)
    prompt, cached, prefilled, _ = usage(first_b)
    print(f"\nB's first turn: {prompt} prompt tokens, {shared} shared with A, {cached} cached, {prefilled} prefilled")
    assert cached == aligned(shared)  # every whole block of the shared part, and only those
    assert prefilled == prompt - cached
    assert srv.stop() == 0

    (cold,) = cold_replies(fresh_server, tmp_path / "cold", [(conv_b, {"max_tokens": 8})])
    assert_same_reply(first_b, cold)


# ---------------------------------------------------------------- held once, written once


@dataclass(frozen=True)
class SixAgents:
    srv: ServerProcess
    tag: str
    prefix: int  # tokens every prompt shares
    saved: list  # each agent's file after its turn
    health: dict  # /health's pool at rest
    on_disk: list  # each agent's file after the shutdown


def aligned_system(tokenizer, rules: int, users: list[str], slack: int = 8) -> dict:
    """A system prompt of about `rules` rules whose shared prefix (with these user
    messages after it) ends at most `slack` tokens past a block boundary.

    Why: the pool shares whole 64-token blocks, so each agent holds the shared
    prefix's last partial block in its own tail (up to 63 tokens each). Issue 12's
    target (resident <= 1.1 x one prefix + each agent's suffix) counts the prefix
    once; an unaligned prefix would add up to 63 tokens per agent beyond the first."""
    for padding in range(2 * BLOCK):
        system = system_prompt(rules, padding)
        prefix = shared_prefix(tokenizer, [[system, {"role": "user", "content": u}] for u in users])
        if 0 < prefix % BLOCK <= slack:
            return system
    pytest.fail("no padding aligns the shared prefix")


@pytest.fixture(scope="module")
def six_agents(tmp_path_factory, tokenizer) -> SixAgents:
    """Six agents, one ~1k-token system prompt, one turn each, one after the other;
    /health at rest; then a clean shutdown (SIGTERM)."""
    users = [f"Agent {i}: review the module ledger_{i}.py and list its three biggest risks." for i in range(6)]
    system = aligned_system(tokenizer, 58, users)
    convs = [[system, {"role": "user", "content": u}] for u in users]
    prefix = shared_prefix(tokenizer, convs)
    srv = ServerProcess(tmp_path_factory.mktemp("six-agents")).start()
    try:
        tag = model_tag(srv)
        agents = [unique(f"six{i}") for i in range(6)]
        bodies = [chat_ok(srv, conv, agent, max_tokens=4) for agent, conv in zip(agents, convs)]
        for body in bodies[1:]:
            assert usage(body)[1] >= aligned(prefix)
        # Each file written means its session has filed the turn's cache: at rest.
        saved = [wait_for_saved(srv, tag, agent, held(body)) for agent, body in zip(agents, bodies)]
        health = pool_health(srv)[2]
        assert srv.stop(signal.SIGTERM) == 0
        on_disk = [read_agent(srv, tag, agent) for agent in agents]
        yield SixAgents(srv, tag, prefix, saved, health, on_disk)
    finally:
        srv.kill()


def test_a_shared_prefix_is_held_once_in_memory(six_agents):
    # Before issue 12: six whole caches, the ~1k-token prefix six times (ratio ~5).
    six = six_agents
    pool = six.health
    blocks, block_tokens, tail_tokens = resident_figures(six.saved)
    held_tokens = [len(s.branches[0].tokens) for s in six.saved]
    ideal = six.prefix + sum(n - six.prefix for n in held_tokens)  # one prefix + each agent's suffix
    copies = sum(held_tokens)  # what six private caches would hold
    print(
        f"\nsix agents, {six.prefix}-token shared prefix: pool {pool['shared_blocks']} blocks "
        f"{pool['shared_bytes'] / MB:.1f} MB, resident {pool['resident_bytes'] / MB:.1f} MB; "
        f"one prefix + suffixes {ideal * KV_BYTES_PER_TOKEN / MB:.1f} MB "
        f"(resident / that = {pool['resident_bytes'] / (ideal * KV_BYTES_PER_TOKEN):.3f}); "
        f"six private copies {copies * KV_BYTES_PER_TOKEN / MB:.1f} MB"
    )
    # The pool: the shared blocks once, plus each agent's own whole blocks.
    assert (pool["shared_blocks"], pool["shared_bytes"]) == (blocks, block_tokens * KV_BYTES_PER_TOKEN)
    assert blocks == aligned(six.prefix) // BLOCK + sum(
        len(s.branches[0].block_keys) - aligned(six.prefix) // BLOCK for s in six.saved
    )
    assert pool["shared_idle_bytes"] == 0
    # Resident: the pool plus every agent's private tail, nothing twice.
    assert pool["resident_bytes"] == (block_tokens + tail_tokens) * KV_BYTES_PER_TOKEN
    assert pool["resident_bytes"] <= 1.1 * ideal * KV_BYTES_PER_TOKEN


def test_a_shared_prefix_is_written_once_on_disk(six_agents):
    # Before issue 12: six agent files, each with the whole prefix; no blocks/ directory.
    six = six_agents
    segments = segment_keys(six.srv, six.tag)
    copies = Counter(k for keys in segments.values() for k in keys)
    shared_keys = six.on_disk[0].branches[0].block_keys[: aligned(six.prefix) // BLOCK]
    holders = {path for path, keys in segments.items() if set(shared_keys) & set(keys)}
    segment_bytes = sum(p.stat().st_size for p in segments)
    agent_bytes = sum(p.stat().st_size for p in (six.srv.cache_dir / "kv" / six.tag / "agents").glob("*.safetensors"))
    print(
        f"\non disk: {len(segments)} segments {segment_bytes / MB:.1f} MB holding {len(copies)} blocks "
        f"({len(shared_keys)} shared), six agent files {agent_bytes / MB:.1f} MB"
    )
    assert set(copies.values()) == {1}  # every block in exactly one segment
    assert len(holders) == 1  # the shared blocks: written together, once
    for saved, rested in zip(six.on_disk, six.saved):
        assert branch_tokens(saved) == branch_tokens(rested)  # the shutdown kept every turn
        assert saved.branches[0].block_keys[: len(shared_keys)] == shared_keys  # and each references them
        assert referenced_keys(saved) <= set(copies)


# ---------------------------------------------------------------- branches


def test_a_side_call_does_not_evict_the_main_conversation(fresh_server, tokenizer):
    # Before issue 12 (one cache per agent) the side call replaced the main conversation's
    # cache: the continuation got only the system prompt back. With --branches 1 it still
    # does, apart from the main conversation's whole blocks the pool still holds.
    main = [SYSTEM, {"role": "user", "content": "Main task: review the refund handler for rounding errors."}]
    side = [SYSTEM, {"role": "user", "content": "Quick side question: what is 17 * 3?"}]

    def main_side_main(srv, agent):
        tag = model_tag(srv)
        first = chat_ok(srv, main, agent, max_tokens=8)
        main_tokens = wait_for_saved(srv, tag, agent, held(first)).branches[0].tokens
        aside = chat_ok(srv, side, agent, max_tokens=8)
        after_side = wait_for_saved(srv, tag, agent, held(aside), prompt_ids(tokenizer, side))
        follow = main + [reply_of(first), {"role": "user", "content": "Continue the main task: which line rounds?"}]
        ids = prompt_ids(tokenizer, follow)
        cont = chat_ok(srv, follow, agent, max_tokens=8)
        assert usage(cont)[2] == usage(cont)[0] - usage(cont)[1]
        return first, main_tokens, after_side, ids, cont

    srv = fresh_server()
    first, main_tokens, after_side, ids, cont = main_side_main(srv, unique("branchy"))
    assert len(after_side.branches) == 2 and after_side.branches[1].tokens == main_tokens  # both kept
    cached = usage(cont)[1]
    print(f"\ncontinuation after a side call: {usage(cont)[0]} prompt tokens, {cached} cached (4 branches)")
    assert cached == reusable([main_tokens], ids) >= usage(first)[0]  # the whole main history
    assert srv.stop() == 0

    srv = fresh_server("--branches", "1")
    first, main_tokens, after_side, ids, narrow = main_side_main(srv, unique("narrow"))
    assert len(after_side.branches) == 1  # the side call replaced the main conversation
    lcp = common_prefix(main_tokens, ids)
    cached = usage(narrow)[1]
    print(f"continuation after a side call: {usage(narrow)[0]} prompt tokens, {cached} cached (1 branch)")
    # What is left: the main conversation's whole blocks (the pool still holds them) or
    # the side call's branch (the system prompt), whichever reaches further; never the
    # main conversation's private tail.
    assert cached == max(aligned(lcp), reusable(branch_tokens(after_side), ids)) < lcp
    assert srv.stop() == 0
    assert_same_reply(narrow, cont)


# ---------------------------------------------------------------- privacy


def test_a_private_suffix_never_reaches_another_agent(fresh_server, tokenizer, tmp_path):
    # A guard on the new sharing: an old server never shared (B got 0), and has no
    # --no-shared-prefix flag, so only the second half fails there.
    secret = "ZEBRA-4417-QUASAR"
    conv_a = [SYSTEM, {"role": "user", "content": f"Deploy notes. The deploy key is {secret}. Keep it private. Reply OK."}]
    conv_b = [SYSTEM, {"role": "user", "content": "Deploy notes. The deploy key is what? Quote it exactly."}]
    ids_a, ids_b = prompt_ids(tokenizer, conv_a), prompt_ids(tokenizer, conv_b)
    secret_at = common_prefix(ids_a, prompt_ids(tokenizer, [SYSTEM, {"role": "user", "content": "Deploy notes. The deploy key is X."}]))
    a, b = unique("keeper"), unique("asker")

    srv = fresh_server()
    tag = model_tag(srv)
    first_a = chat_ok(srv, conv_a, a, max_tokens=4)
    tokens_a = wait_for_saved(srv, tag, a, held(first_a)).branches[0].tokens
    lcp = common_prefix(tokens_a, ids_b)
    assert 4 * BLOCK <= lcp <= secret_at
    asked = chat_ok(srv, conv_b, b, max_tokens=16)
    cached = usage(asked)[1]
    print(f"\nB shares {lcp} tokens with A up to A's secret (at {secret_at}): {cached} cached")
    assert cached == aligned(lcp) <= secret_at  # whole blocks B sent itself, nothing of A's after them
    assert secret not in text_of(asked)
    saved_b = wait_for_saved(srv, tag, b, held(asked))  # B's blocks: the hash chain of B's own tokens
    assert all(secret not in tokenizer.decode(list(t)) for t in branch_tokens(saved_b))
    assert srv.stop() == 0

    # --no-shared-prefix: nothing crosses agents, not even an identical prompt.
    srv = fresh_server("--no-shared-prefix", cache_dir=tmp_path / "unshared")  # nothing on disk yet
    first_a = chat_ok(srv, conv_a, a, max_tokens=4)
    assert usage(chat_ok(srv, conv_b, b, max_tokens=4))[1] == 0
    assert usage(chat_ok(srv, conv_a, unique("copycat"), max_tokens=4))[1] == 0
    # ... while each agent's own cache still serves it.
    again = conv_a + [reply_of(first_a), {"role": "user", "content": "Thanks."}]
    tokens_a = wait_for_saved(srv, model_tag(srv), a, held(first_a), scope=a).branches[0].tokens  # its own scope
    assert usage(chat_ok(srv, again, a, max_tokens=4))[1] == reusable([tokens_a], prompt_ids(tokenizer, again)) >= len(ids_a)


# ---------------------------------------------------------------- a burst


def test_agents_arriving_together_prefill_the_shared_prompt_once(fresh_server, tokenizer):
    # Before issue 12: each of the four prefilled the whole ~1k-token prompt (4x).
    system = system_prompt(58)
    convs = [[system, {"role": "user", "content": f"Agent {i}: review ledger_{i}.py."}] for i in range(4)]
    lengths = [len(prompt_ids(tokenizer, c)) for c in convs]
    shared = shared_prefix(tokenizer, convs)
    assert shared >= 15 * BLOCK
    agents = [unique(f"burst{i}") for i in range(4)]

    srv = fresh_server()
    before = prefill_counter(srv)
    bodies = in_threads(*(lambda a=a, c=c: chat_ok(srv, c, a, max_tokens=4) for a, c in zip(agents, convs)))
    ran_through_model = prefill_counter(srv) - before
    prefilled = sum(usage(b)[2] for b in bodies)
    cached = sorted(usage(b)[1] for b in bodies)
    print(
        f"\nburst of 4, {shared}-token shared prompt: {prefilled} prompt tokens prefilled "
        f"({ran_through_model:.0f} by the metrics counter), cached {cached}; "
        f"prompts {sum(lengths)} tokens, 4 x shared = {4 * shared}"
    )
    # One of them prefilled the shared part; the others rode on it, prefilling only their own.
    assert cached == [0] + [aligned(shared)] * 3
    assert prefilled == sum(lengths) - 3 * aligned(shared) < 2 * shared
    assert 0 < ran_through_model <= prefilled
