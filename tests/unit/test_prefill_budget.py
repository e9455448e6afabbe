"""While agents decode, a long prompt is prefilled in steps of bounded compute, not bounded tokens."""

from __future__ import annotations

import pytest

from actors.prefill_budget import MIN_TOKENS, PrefillBudget, Prefilling, rows_and_area

A, B = 2.5e-3, 3e-6  # seconds per token row and per query-key pair (the CPU's embedded model)


def trained(chunk=256) -> PrefillBudget:
    budget = PrefillBudget(chunk)
    for offset in range(0, 4096, chunk):  # a 4k prompt prefilled in plain chunks
        rows, area = rows_and_area([Prefilling(offset, 4096 - offset)], [chunk])
        budget.observe(rows, area, A * rows + B * area)
    return budget


def test_fit_recovers_the_cost_of_weights_and_of_attention():
    a, b = trained().coefficients()
    assert a == pytest.approx(A, rel=1e-3)
    assert b == pytest.approx(B, rel=1e-3)


def test_full_chunk_when_nobody_decodes_or_before_any_measurement():
    deep = [Prefilling(3900, 2000)]
    assert trained().plan(deep, decoding=False) == [256]
    assert PrefillBudget(256).plan(deep, decoding=True) == [256]


def test_chunk_shrinks_with_depth_so_a_step_never_costs_more_than_a_first_chunk():
    budget = trained()
    first_chunk = A * 256 + B * 256 * 256 / 2
    sizes = []
    for offset in (0, 512, 1024, 2048, 3900):
        seqs = [Prefilling(offset, 5000)]
        [n] = budget.plan(seqs, decoding=True)
        rows, area = rows_and_area(seqs, [n])
        assert A * rows + B * area <= first_chunk * 1.001
        rows, area = rows_and_area(seqs, [n + 1])  # and it is the largest such chunk
        assert n == 256 or A * rows + B * area > first_chunk * 0.999
        sizes.append(n)
    assert sizes[0] == 256
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 128


def cost(seqs, takes) -> float:
    rows, area = rows_and_area(seqs, takes)
    return A * rows + B * area


def test_follow_ups_go_in_whole_shortest_first_and_a_long_prompt_takes_what_is_left():
    """While an agent decodes: a long prompt (the oldest) and four 24-token follow-ups
    deep in their conversations. Follow-ups are never split (that costs a whole extra
    step); as many as the step's compute allows go first."""
    budget = trained()
    first_chunk = A * 256 + B * 256 * 256 / 2
    seqs = [Prefilling(3000, 2000)] + [Prefilling(1900, 24)] * 4
    takes = budget.plan(seqs, decoding=True)
    assert set(takes[1:]) == {0, 24}  # whole or not at all
    whole = takes[1:].count(24)
    assert whole >= 3
    assert takes[0] >= MIN_TOKENS  # the oldest always progresses
    # Within the budget, but for the oldest one's minimum.
    assert cost(seqs[1:], takes[1:]) <= first_chunk
    assert cost(seqs, takes) <= first_chunk + cost(seqs[:1], [MIN_TOKENS])
    # Without the follow-ups, the long prompt has the whole step.
    alone = budget.plan(seqs[:1], decoding=True)
    assert alone[0] > takes[0] and cost(seqs[:1], alone) <= first_chunk * 1.001


def test_the_oldest_prefilling_sequence_always_progresses():
    budget = trained()
    takes = budget.plan([Prefilling(100_000, 5000)] * 8, decoding=True)
    assert takes == [MIN_TOKENS] + [0] * 7
    # A short remainder that fits nowhere near the budget still goes in whole when it is the oldest.
    assert budget.plan([Prefilling(100_000, 5)], decoding=True) == [5]


def test_tokens_only_history_falls_back_to_a_token_budget():
    budget = PrefillBudget(256)
    for _ in range(5):
        budget.observe(256, 0.0, 0.64)  # no attention area at all: b cannot be fitted
    a, b = budget.coefficients()
    assert (a, b) == (pytest.approx(0.0025), 0.0)
    assert budget.plan([Prefilling(3000, 1000)], decoding=True) == [256]


async def test_scheduler_shrinks_a_deep_prompts_chunks_only_while_another_agent_decodes():
    """The real scheduler planning steps for a real (tiny) model's BatchEngine: agent B's
    3,000-token prompt goes in full chunks while nobody decodes, and in smaller ones at
    depth once agent A decodes."""
    import asyncio
    from types import SimpleNamespace

    import actors  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx
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
    loaded = SimpleNamespace(model=model, tokenizer=SimpleNamespace(eos_token_ids=set()), constraints=None)
    engine = BatchEngine(loaded, max_batch=4)
    chunks: dict[int, list[int]] = {}

    class ModelRef:  # runs each plan on the engine, as the model actor does
        actor = SimpleNamespace(alive=True)

        async def ask(self, message, *, timeout):
            await asyncio.sleep(0)  # the real model actor answers from its own thread
            if isinstance(message, ExecuteStep):
                for turn_id, n in message.plan.prefill:
                    chunks.setdefault(turn_id, []).append(n)
                return engine.step(message.plan)
            return 0

    greedy = SamplingParams(temperature=0.0)
    sched = SchedulerActor(ModelRef(), max_batch=4, prefill_chunk=256)
    task = asyncio.create_task(sched.run())

    def submit(n, max_tokens):
        turn = Turn(ChatRequest(), "agent")
        turn.prompt, turn.params, turn.max_tokens = tuple(1 + i % 90 for i in range(n)), greedy, max_tokens
        sched.tell(SubmitTurn(turn))
        return turn

    async def until_first_token(turn):
        for _ in range(12_000):
            if turn.generated:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no first token")

    try:
        alone_turn = submit(3000, 1)  # nobody else: full chunks, and the fit learns
        await until_first_token(alone_turn)
        await until_first_token(submit(20, 10_000))  # agent A starts decoding
        beside_turn = submit(3000, 1)
        await until_first_token(beside_turn)
    finally:
        sched.stop()
        await asyncio.wait([task], timeout=5)
    alone, beside = chunks[alone_turn.id], chunks[beside_turn.id]
    assert alone[:-1] == [256] * (len(alone) - 1)
    assert beside[0] == 256  # at the start of a prompt a chunk costs what the budget allows
    assert max(beside[-4:-1]) < 256  # deep in it, the same compute buys fewer tokens
    assert min(beside[:-1]) >= 16  # the last one is whatever remained
    assert sum(beside) == sum(alone) == 2999  # nothing skipped; the last token is the first decode input


def test_prompts_arriving_together_share_bounded_steps_even_with_nobody_decoding():
    """Five follow-ups at once: one step holding all of them would give each its first
    token only at its end; bounded steps give the first ones theirs a step earlier."""
    budget = trained()
    first_chunk = A * 256 + B * 256 * 256 / 2
    seqs = [Prefilling(1900, 24)] * 5
    takes = budget.plan(seqs, decoding=False)
    assert set(takes) == {0, 24} and takes[0] == 24  # whole or not at all, the oldest first
    assert cost(seqs, takes) <= first_chunk
    assert budget.plan(seqs[:1], decoding=False) == [24]  # alone it simply goes
    # Long prompts starting together (none can finish in this step): one batched step.
    assert budget.plan([Prefilling(0, 1400)] * 5, decoding=False) == [256] * 5


def test_nothing_to_prefill_plans_nothing():
    assert trained().plan([], decoding=True) == []
