"""The prefix pool and an agent's branches, with small real arrays (no model): shared
prefixes are found through hash chains, held once, never reachable by a different
prompt, and an agent's side conversation does not evict its main one."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

import actors  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx_lm.models.cache import KVCache

from actors.branches import Branch, Branches
from actors.kvblocks import KVPieces, assemble, cut
from actors.prefix_pool import BLOCK_TOKENS as B
from actors.prefix_pool import PrefixPool, chain

LAYERS, HEADS, DIM = 2, 2, 4


def kv_of(tokens) -> list[KVCache]:
    """A per-layer cache whose values encode (layer, token): easy to check after moves."""
    caches = []
    for layer in range(LAYERS):
        t = mx.array(tokens, dtype=mx.float32)[None, None, :, None]
        k = mx.broadcast_to(t + 1000 * layer, (1, HEADS, len(tokens), DIM))
        c = KVCache()
        c.keys, c.values, c.offset = mx.array(k), mx.array(-k), len(tokens)
        caches.append(c)
    mx.eval([(c.keys, c.values) for c in caches])
    return caches


def tokens_in(caches: list[KVCache]) -> list[int]:
    return caches[0].keys[0, 0, : caches[0].offset, 0].astype(mx.int32).tolist()


@pytest.fixture
def io():
    with ThreadPoolExecutor(1) as pool:
        yield pool


def test_a_chain_key_names_the_whole_prefix():
    a = chain(list(range(3 * B)), "", "tag")
    b = chain(list(range(2 * B)) + [7] * B, "", "tag")
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert chain([9] + list(range(1, 3 * B)), "", "tag")[1] != a[1]  # block 1 alike, block 0 not
    assert chain(list(range(3 * B)), "other scope", "tag")[0] != a[0]
    assert chain(list(range(3 * B)), "", "other model")[0] != a[0]
    assert chain(list(range(B - 1)), "", "tag") == []  # no full block yet


async def test_a_second_agent_starts_from_the_first_ones_blocks_held_once(io):
    pool = PrefixPool("tag")
    system = list(range(100, 100 + 3 * B + 10))  # 3 full blocks, then 10 tokens
    a, b = Branches(pool, "", 4), Branches(pool, "", 4)
    a_tokens = tuple(system + [1, 2, 3])
    a.keep(await a.from_cache(kv_of(a_tokens), a_tokens, io))
    assert len(pool.blocks) == 3 and pool.nbytes == 3 * pool.blocks[next(iter(pool.blocks))].nbytes
    b_prompt = tuple(system + [4, 5, 6])
    start = b.start_for(b_prompt)
    assert start.cached == 3 * B  # the block-aligned shared part; a's tail stays private
    assert tokens_in(assemble(start.pieces, reserve=5)) == list(b_prompt[: 3 * B])
    b.keep(await b.from_cache(kv_of(b_prompt), b_prompt, io))
    assert len(pool.blocks) == 3  # b's blocks are a's: nothing new held
    assert all(block.refs == 2 + (block in start.pinned) for block in pool.blocks.values())


async def test_a_different_prompt_never_reaches_another_agents_private_tokens(io):
    pool = PrefixPool("tag")
    secret = tuple([1] * B + [42, 43, 44] * B)  # the secret fills whole blocks after block 0
    owner = Branches(pool, "", 4)
    owner.keep(await owner.from_cache(kv_of(secret), secret, io))
    other = Branches(pool, "", 4)
    probe = tuple([1] * B + [42, 43, 45] * B)  # same first block, then different
    assert other.start_for(probe).cached == B
    assert other.start_for(tuple([2] + list(secret[1:]))).cached == 0  # a changed first token: nothing
    isolated = Branches(pool, "agent-b", 4)  # --no-shared-prefix: its own scope
    assert isolated.start_for(secret[: 2 * B]).cached == 0


async def test_a_side_conversation_does_not_evict_the_main_one(io):
    pool = PrefixPool("tag")
    agent = Branches(pool, "", limit=2)
    system = tuple(range(500, 500 + B))
    main = system + tuple(range(1, 2 * B))
    agent.keep(await agent.from_cache(kv_of(main), main, io))
    side = system + (9, 9, 9)
    assert agent.start_for(side).cached == B
    agent.keep(await agent.from_cache(kv_of(side), side, io))
    follow_up = main + (7, 7)
    start = agent.start_for(follow_up)
    assert start.cached == len(main)  # the main branch, private tail included
    assert tokens_in(assemble(start.pieces)) == list(main)
    # The branch it continues is replaced by the longer one; the side one stays.
    agent.keep(await agent.from_cache(kv_of(follow_up), follow_up, io))
    assert [len(b.tokens) for b in agent.items] == [len(follow_up), len(side)]
    # With room for one branch, the side call replaces the main conversation: its private
    # tail is gone (its full blocks may linger in the pool as an idle cache).
    single = Branches(PrefixPool("tag"), "", limit=1)
    single.keep(await single.from_cache(kv_of(main), main, io))
    single.keep(await single.from_cache(kv_of(side), side, io))
    assert single.start_for(follow_up).cached == B * (len(main) // B) < len(main)


async def test_idle_blocks_are_a_cache_evicted_least_recently_used_first(io):
    pool = PrefixPool("tag")
    a = Branches(pool, "", 4)
    first, second = tuple(range(2 * B)), tuple(range(1000, 1000 + 2 * B))
    a.keep(await a.from_cache(kv_of(first), first, io))
    a.keep(await a.from_cache(kv_of(second), second, io))
    held = pool.nbytes
    assert pool.evict(held) == 0  # every block is held by a branch
    a.clear()  # the agent hibernated: its blocks stay as a cache
    assert pool.nbytes == held and pool.idle_bytes == held
    pool.match(chain(second, "", "tag"))  # used again: the other one is older
    freed = pool.evict(1)
    assert freed == pool.blocks[chain(second, "", "tag")[0]].nbytes
    assert chain(first, "", "tag")[0] not in pool.blocks and chain(second, "", "tag")[0] in pool.blocks


def test_cut_and_assemble_round_trip_with_room_reserved():
    caches = kv_of(list(range(3 * B + 5)))
    blocks = [cut(caches, i * B, (i + 1) * B) for i in range(3)]
    tail = cut(caches, 3 * B, 3 * B + 5)
    assert blocks[0].shape == (LAYERS, 2, HEADS, B, DIM)
    joined = assemble(KVPieces(tuple((b, B) for b in blocks) + ((tail, 5),)), reserve=7)
    assert tokens_in(joined) == list(range(3 * B + 5))
    assert joined[1].keys.shape[2] == 3 * B + 5 + 7 and joined[1].offset == 3 * B + 5
    assert mx.array_equal(joined[1].values[..., : 3 * B + 5, :], caches[1].values).item()
    partial = assemble(KVPieces(((blocks[0], B), (blocks[1], 10))))
    assert tokens_in(partial) == list(range(B + 10))


def test_branch_segments_cover_its_tokens():
    kv = mx.zeros((LAYERS, 2, HEADS, 3, DIM))
    branch = Branch(tuple(range(3)), [], kv)
    assert branch.tail_tokens == 3 and branch.segments() == [(kv, 3)]


async def test_turns_arriving_together_with_one_prompt_prefill_it_once():
    """The real scheduler over a real (tiny) model's engine: four turns with the same
    600-token prompt but their own last lines, submitted together. The first prefills
    the shared part; the others wait for its blocks, then start from them."""
    from types import SimpleNamespace

    from mlx_lm.models import llama

    from actors.engine import BatchEngine
    from actors.messages import ChatRequest, ExecuteStep, SamplingParams
    from actors.scheduler import SchedulerActor, SubmitTurn
    from actors.turn import Turn

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 97,
    }))
    engine = BatchEngine(SimpleNamespace(model=model, tokenizer=SimpleNamespace(eos_token_ids=set()),
                                         constraints=None), max_batch=4)
    prefilled = []

    class ModelRef:
        actor = SimpleNamespace(alive=True)

        async def ask(self, message, *, timeout):
            await asyncio.sleep(0)
            if isinstance(message, ExecuteStep):
                prefilled.extend(n for _, n in message.plan.prefill)
                return engine.step(message.plan)
            return 0

    pool = PrefixPool("tiny")
    sched = SchedulerActor(ModelRef(), max_batch=4, prefill_chunk=128, prefixes=pool)
    task = asyncio.create_task(sched.run())
    shared = tuple(1 + i % 90 for i in range(600))
    turns = []
    for i in range(4):
        turn = Turn(ChatRequest(), f"agent-{i}")
        turn.prompt = shared + (10 + i, 20 + i, 30 + i)
        turn.keys = pool.keys(turn.prompt, "")
        turn.params, turn.max_tokens = SamplingParams(temperature=0.0), 2
        turns.append(turn)
        sched.tell(SubmitTurn(turn))
    try:
        for turn in turns:
            await asyncio.wait_for(turn.wait_ended(), 120)
    finally:
        sched.stop()
        await asyncio.wait([task], timeout=5)
    aligned = (len(shared) // B) * B
    assert [len(t.cached) for t in turns[1:]] == [aligned] * 3  # each rode on the first one's blocks
    assert sum(prefilled) == (len(turns[0].prompt) - 1) + 3 * (len(turns[0].prompt) - 1 - aligned)
    assert all(t.done.finish_reason == "length" for t in turns)
