"""The ragged batch (actors/ragged.py) and the engine's prefill groups on a tiny real
llama: several sequences' prompt chunks of different lengths, over caches of
different depths, in one model call, must leave each sequence exactly what it gets
alone, and give the same greedy tokens."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from actors import ragged
from actors.engine import MIN_GROUP_FILL, BatchEngine, prefill_groups
from actors.kvblocks import KVPieces, cut
from actors.messages import SamplingParams, SeqInsert, StepPlan


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)
    m = llama.Model(llama.ModelArgs.from_dict({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 97,
    }))
    assert ragged.install(m)
    return m


def filled(model, tokens):
    cache = make_prompt_cache(model)
    if tokens:
        model(mx.array([tokens]), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def test_prefill_chunks_of_different_lengths_in_one_call_match_each_alone(model):
    histories = [list(range(1, 40)), [5, 6, 7], list(range(10, 90))]
    chunks = [[11, 12, 13, 14, 15, 16, 17], [20, 21], [30, 31, 32, 33, 34]]
    alone = []
    for history, chunk in zip(histories, chunks):
        cache = filled(model, history)
        logits = model(mx.array([chunk]), cache=cache)
        alone.append((cache, logits[0, -1]))
    caches = [filled(model, h) for h in histories]
    lengths = tuple(len(c) for c in chunks)
    logits = model(ragged.padded_rows(chunks), cache=ragged.ragged_caches(caches, lengths))
    for i, (cache, last) in enumerate(alone):
        n = len(histories[i]) + lengths[i]
        for mine, theirs in zip(caches[i], cache):
            assert mine.offset == theirs.offset == n  # padding never reached the cache
            assert mx.allclose(mine.keys[..., :n, :], theirs.keys[..., :n, :], atol=1e-5).item()
            assert mx.allclose(mine.values[..., :n, :], theirs.values[..., :n, :], atol=1e-5).item()
        assert mx.allclose(logits[i, lengths[i] - 1], last, atol=1e-4).item()


def test_prefill_groups_keep_padding_bounded():
    def seq(n):
        return (SimpleNamespace(n=n), [0] * n)

    groups = prefill_groups([seq(24), seq(256), seq(37), seq(30), seq(1)])
    sizes = [[len(chunk) for _, chunk in g] for g in groups]
    assert sizes[0] == [256]  # a long chunk never pads the short ones to its length
    assert [37, 30, 24] in sizes  # follow-ups of similar length go together
    for g in groups:
        width = len(g[0][1])
        assert sum(len(c) for _, c in g) >= MIN_GROUP_FILL * width * len(g)
    assert sorted(n for s in sizes for n in s) == [1, 24, 30, 37, 256]


def engine_for(model):
    return BatchEngine(SimpleNamespace(model=model, tokenizer=SimpleNamespace(eos_token_ids=set()),
                                       constraints=None), max_batch=8)


def run_turns(model, turns):
    """Greedy tokens of `turns` ((history, suffix) pairs) started in one step."""
    engine = engine_for(model)
    inserts = []
    for i, (history, suffix) in enumerate(turns):
        cache = None
        if history:
            full = filled(model, history)
            cache = KVPieces(((cut(full, 0, len(history)), len(history)),))
        inserts.append(SeqInsert(i, tuple(suffix), cache, tuple(history), SamplingParams(temperature=0.0), 6))
    prefill = tuple((i, len(s) - 1) for i, (_, s) in enumerate(turns) if len(s) > 1)
    out = {i: [] for i in range(len(turns))}
    result = engine.step(StepPlan(inserts=tuple(inserts), removes=(), prefill=prefill, paused=(), publish=()))
    while True:
        for turn_id, token in result.tokens:
            out[turn_id].append(token.token)
        if not engine.seqs:
            return out, engine
        result = engine.step(StepPlan(inserts=(), removes=(), prefill=(), paused=(), publish=()))


def test_turns_started_together_get_the_greedy_tokens_they_get_alone(model):
    turns = [(list(range(1, 50)), [60, 61, 62, 63]), ([], [7, 8, 9, 10, 11, 12]), ([3] * 20, [4, 5, 6]),
             (list(range(40, 70)), [71])]
    together, _ = run_turns(model, turns)
    assert all(len(t) == 6 for t in together.values())
    for i, turn in enumerate(turns):
        alone, _ = run_turns(model, [turn])
        assert alone[0] == together[i], i


def test_a_turns_cache_has_room_for_its_prompt_and_first_tokens_from_the_start(model):
    """Growing a cache copies all of it: the room for the prompt and the first 256
    generated tokens is made when the turn joins."""
    history, suffix = list(range(1, 50)), [60, 61, 62]
    full = filled(model, history)
    engine = engine_for(model)
    engine.step(StepPlan(inserts=(SeqInsert(1, tuple(suffix), KVPieces(((cut(full, 0, len(history)), len(history)),)),
                                            tuple(history), SamplingParams(temperature=0.0), 300),),
                         removes=(), prefill=((1, len(suffix) - 1),), paused=(), publish=()))
    first = engine.seqs[1].cache
    assert all(c.keys.shape[2] >= len(history) + len(suffix) + 256 for c in first)
    keys = [c.keys for c in first]
    for _ in range(200):
        engine.step(StepPlan(inserts=(), removes=(), prefill=(), paused=(), publish=()))
    assert all(c.keys is k for c, k in zip(engine.seqs[1].cache, keys))  # never regrown
