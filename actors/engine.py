"""BatchEngine: the mechanism under the model actor.

It executes one StepPlan at a time on mlx-lm's BatchGenerator, which does the
real work (continuous batching over BatchKVCache merge/extract/filter, chunked
prefill interleaved with decode). The engine only maps greenroom's turn ids to
the generator's uids and turns its responses into a StepResult. Not thread
safe: only the model actor's thread calls it.
"""

from __future__ import annotations

import os
import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import apply_top_p

from actors.loading import LoadedModel
from actors.prefill_budget import PrefillBudget, Prefilling, rows_and_area, tokens_in_step
from actors.messages import SamplingParams, SeqEnd, SeqInsert, StepPlan, StepResult, TurnStatus

_FINISH = {"stop": TurnStatus.FINISHED_STOPPED, "length": TurnStatus.FINISHED_LENGTH}


def make_sampler(params: SamplingParams):
    """None means greedy: BatchGenerator then samples the whole batch in one call.

    Otherwise each sequence gets its own PRNG key, so a seeded request samples
    the same tokens whatever else shares its batch.
    """
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    state = {"key": mx.random.key(seed)}
    inv_temp = 1.0 / params.temperature
    top_p = params.top_p

    def sample(logprobs: mx.array) -> mx.array:
        state["key"], key = mx.random.split(state["key"])
        if 0.0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * inv_temp, key=key)

    return sample


class BatchEngine:
    def __init__(self, loaded: LoadedModel, *, max_batch: int, prefill_chunk: int):
        eos = sorted(loaded.tokenizer.eos_token_ids)
        self.loaded = loaded
        self.generator = BatchGenerator(
            loaded.model,
            stop_tokens=[[t] for t in eos],
            completion_batch_size=max_batch,
            prefill_batch_size=max_batch,
            prefill_step_size=prefill_chunk,
        )
        self.budget = PrefillBudget(prefill_chunk)
        self._uid_of: dict[int, int] = {}
        self._turn_of: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._uid_of)

    def step(self, plan: StepPlan, *, fault: bool = False) -> StepResult:
        started = time.perf_counter()
        if fault:
            raise RuntimeError("injected fault in the model step")
        ended = self._remove(plan.removes)
        self._insert(plan.inserts)
        tokens: list[tuple[int, int]] = []
        counters = self.generator._counters
        prefill_before, prefill_time_before = counters.prompt_tokens, counters.prompt_time
        if self._uid_of:
            planned = self._plan_prefill()
            _, responses = self.generator.next()
            if planned is not None and counters.prompt_tokens - prefill_before == planned[0]:
                self.budget.observe(*planned[1:], counters.prompt_time - prefill_time_before)
            for r in responses:
                turn_id = self._turn_of[r.uid]
                tokens.append((turn_id, r.token))
                if r.finish_reason is not None:
                    self._forget(r.uid)
                    status = _FINISH.get(r.finish_reason, TurnStatus.FINISHED_STOPPED)
                    ended.append(SeqEnd(turn_id, status, r.prompt_cache, tuple(r.all_tokens)))
        return StepResult(
            tokens=tuple(tokens),
            ended=tuple(ended),
            prefill_tokens=counters.prompt_tokens - prefill_before,
            decode_tokens=len(tokens),
            seconds=time.perf_counter() - started,
        )

    def _plan_prefill(self) -> tuple[int, float, float] | None:
        """Set the generator's chunk for the coming step from the prefill budget.

        Returns (tokens, rows, area) the step should prefill, for the budget's fit. This
        reads BatchGenerator's queues (private in mlx-lm 0.32); if they change shape
        the engine falls back to the fixed chunk rather than failing the step."""
        gen = self.generator
        try:
            seqs = [Prefilling(len(tokens), sum(map(len, work[0])) - 1)
                    for tokens, work in zip(gen._prompt_batch.tokens, gen._currently_processing)]
            joining = min(gen.prefill_batch_size - len(gen._prompt_batch),
                          gen.completion_batch_size - len(gen._generation_batch),
                          len(gen._unprocessed_sequences))
            seqs += [Prefilling(len(q[4]), sum(map(len, q[1])) - 1)
                     for q in list(gen._unprocessed_sequences)[:max(joining, 0)]]
            decoding = len(gen._generation_batch) > 0
        except (AttributeError, TypeError, IndexError):
            gen.prefill_step_size = self.budget.chunk
            return None
        seqs = [s for s in seqs if s.remaining > 0]
        n = self.budget.tokens_per_sequence(seqs, decoding)
        # The prompt batch keeps the step size it was made with for its inner loop.
        gen.prefill_step_size = gen._prompt_batch.prefill_step_size = n
        return (tokens_in_step(seqs, n), *rows_and_area(seqs, n))

    def _insert(self, inserts: tuple[SeqInsert, ...]) -> None:
        if not inserts:
            return
        uids = self.generator.insert(
            [list(i.suffix) for i in inserts],
            max_tokens=[i.max_tokens for i in inserts],
            caches=[i.cache if i.cache else None for i in inserts],
            all_tokens=[list(i.cached) for i in inserts],
            samplers=[make_sampler(i.params) for i in inserts],
        )
        for uid, ins in zip(uids, inserts):
            self._uid_of[ins.turn_id] = uid
            self._turn_of[uid] = ins.turn_id

    def _remove(self, turn_ids: tuple[int, ...]) -> list[SeqEnd]:
        uids = [self._uid_of[t] for t in turn_ids if t in self._uid_of]
        if not uids:
            return []
        extracted = self.generator.remove(uids, return_prompt_caches=True)
        ended = []
        for uid in uids:
            cache, tokens = extracted.get(uid, (None, []))
            ended.append(
                SeqEnd(self._forget(uid), TurnStatus.FINISHED_ABORTED, cache, tuple(tokens))
            )
        return ended

    def _forget(self, uid: int) -> int:
        turn_id = self._turn_of.pop(uid)
        del self._uid_of[turn_id]
        return turn_id

    def abort_all(self) -> list[SeqEnd]:
        """Take every sequence out (drain deadline, model swap); caches go back."""
        return self._remove(tuple(self._uid_of))
