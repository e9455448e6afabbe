"""BatchEngine: the mechanism under the model actor.

It executes one StepPlan at a time; the scheduler decides everything in it (who
joins, who leaves, how many prompt tokens each prefilling sequence processes).
A step is:

1. leaves: the sequence's cache goes back as it is (no copy);
2. joins: a sequence starts from the cache it brings (or an empty one);
3. prefill: the planned chunks run as few model calls as padding allows, each
   sequence's keys and values going to its own cache (actors/ragged.py; the
   logits are never evaluated: only the keys and values matter);
4. decode: every sequence whose prompt is in the cache (but its last token)
   contributes one input token to one batched model call (actors/ragged.py),
   and picks its next token with its own sampling settings and grammar
   (actors/sampling.py, actors/constraint.py).

It uses mlx-lm's public pieces only: the model call, KVCache (update_and_fetch,
trim, offset) and the sampling utilities. Not thread safe: only the model
actor's thread calls it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from actors import ragged
from actors.constraint import apply_bitmask, fill_rows
from actors.kvblocks import DECODE_GROWTH, KVPieces, assemble, cut, decode_room
from actors.loading import LoadedModel
from actors.messages import SeqEnd, SeqInsert, StepPlan, StepResult, TokenOut, TurnStatus
from actors.prefix_pool import BLOCK_TOKENS
from actors.sampling import SeqSampler, make_seq_sampler, pick_tokens

@dataclass(slots=True)
class _Seq:
    turn_id: int
    cache: list  # one mlx-lm KVCache per layer, holding exactly `tokens`
    tokens: list[int]
    pending: list[int]  # not in the cache yet; once decoding, the one next input
    max_tokens: int
    sampler: SeqSampler
    constraint: Any = None  # actors.constraint.Constraint
    generated: int = 0
    decoding: bool = False
    recent: list[int] = field(default_factory=list)  # for the penalties


class EngineError(RuntimeError):
    """A plan the engine cannot execute (a scheduler bug, never the client's)."""


class BatchEngine:
    def __init__(self, loaded: LoadedModel, *, max_batch: int = 8, prefill_chunk: int = 256):
        self.loaded = loaded
        self.model = loaded.model
        self.eos = frozenset(loaded.tokenizer.eos_token_ids)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.ragged = ragged.install(self.model)
        self.seqs: dict[int, _Seq] = {}
        self._bitmask = None

    def __len__(self) -> int:
        return len(self.seqs)

    # ------------------------------------------------------------ a step

    def step(self, plan: StepPlan, *, fault: bool = False) -> StepResult:
        started = time.perf_counter()
        if fault:
            raise RuntimeError("injected fault in the model step")
        ended = [self._end(self.seqs[t], TurnStatus.FINISHED_ABORTED) for t in plan.removes if t in self.seqs]
        for insert in plan.inserts:
            self._insert(insert)
        prefill_tokens = self._prefill(plan.prefill)
        published = self._publish(plan.publish)
        prefill_seconds = time.perf_counter() - started
        tokens, finished = self._decode(frozenset(plan.paused))
        ended += finished
        return StepResult(
            tokens=tuple(tokens),
            ended=tuple(ended),
            prefill_tokens=prefill_tokens,
            decode_tokens=len(tokens),
            seconds=time.perf_counter() - started,
            prefill_seconds=prefill_seconds,
            published=published,
        )

    def abort_all(self) -> list[SeqEnd]:
        """Take every sequence out (drain deadline, model swap); caches go back."""
        return [self._end(seq, TurnStatus.FINISHED_ABORTED) for seq in list(self.seqs.values())]

    def reset(self) -> int:
        """Forget every sequence (after a failed step: their caches are suspect)."""
        n = len(self.seqs)
        self.seqs.clear()
        mx.clear_cache()
        return n

    # ------------------------------------------------------------ joins and leaves

    def _insert(self, ins: SeqInsert) -> None:
        if ins.turn_id in self.seqs:
            raise EngineError(f"turn {ins.turn_id} is already running")
        if not ins.suffix:
            raise EngineError(f"turn {ins.turn_id} has nothing to prefill")
        self.seqs[ins.turn_id] = _Seq(
            turn_id=ins.turn_id,
            cache=self._own_cache(ins.cache, len(ins.cached), len(ins.suffix) + decode_room(ins.max_tokens)),
            tokens=list(ins.cached),
            pending=list(ins.suffix),
            max_tokens=ins.max_tokens,
            sampler=make_seq_sampler(ins.params),
            constraint=ins.constraint,
            decoding=len(ins.suffix) == 1,
            recent=list(ins.cached[-64:]) + list(ins.suffix[-64:]),
        )

    def _own_cache(self, cache, n: int, coming: int) -> list:
        """The sequence's own KVCache per layer, holding its n cached tokens with room for
        the `coming` ones (prompt and first generated): assembled from pool blocks and
        a branch's tail (KVPieces), or views of a cache it brings (the first write then
        copies, so whoever else holds those arrays never sees it change)."""
        if not cache:
            return make_prompt_cache(self.model)
        if isinstance(cache, KVPieces):
            if cache.tokens != n:
                raise EngineError(f"the pieces hold {cache.tokens} tokens, the turn says {n}")
            return assemble(cache, reserve=coming)
        own = []
        for layer in cache:
            if layer.offset != n:
                raise EngineError(f"cache holds {layer.offset} tokens, the turn says {n}")
            copy = KVCache()
            copy.keys, copy.values = layer.keys[..., :n, :], layer.values[..., :n, :]
            copy.offset = n
            own.append(copy)
        return own

    def _end(self, seq: _Seq, status: TurnStatus) -> SeqEnd:
        del self.seqs[seq.turn_id]
        # Evaluated here, on the model thread: the cache's arrays may then be used
        # (saved, restored, joined) from any thread.
        mx.eval([c.state for c in seq.cache])
        return SeqEnd(seq.turn_id, status, seq.cache, tuple(seq.tokens))

    # ------------------------------------------------------------ prefill

    def _prefill(self, chunks: tuple[tuple[int, int], ...]) -> int:
        work, total = [], 0
        for turn_id, n in chunks:
            seq = self.seqs.get(turn_id)
            if seq is None or seq.decoding or not 0 < n < len(seq.pending):
                raise EngineError(f"bad prefill chunk {n} for turn {turn_id}")
            chunk, seq.pending = seq.pending[:n], seq.pending[n:]
            _reserve(seq.cache, len(chunk) + len(seq.pending) + decode_room(seq.max_tokens))
            work.append((seq, chunk))
            total += n
        for group in prefill_groups(work) if self.ragged else [[w] for w in work]:
            if len(group) == 1:
                seq, chunk = group[0]
                self.model(mx.array([chunk]), cache=seq.cache)
            else:  # one model call for the group (actors/ragged.py)
                lengths = tuple(len(chunk) for _, chunk in group)
                caches = ragged.ragged_caches([seq.cache for seq, _ in group], lengths)
                self.model(ragged.padded_rows([chunk for _, chunk in group]), cache=caches)
        states = []
        for seq, chunk in work:
            seq.tokens += chunk
            if len(seq.pending) == 1:
                seq.decoding = True
                _reserve(seq.cache, 0)
            states += [c.state for c in seq.cache]
        # The logits are never evaluated: only the keys and values matter.
        if states:
            mx.eval(states)
        return total

    def _publish(self, ranges: tuple[tuple[int, int, int], ...]) -> tuple:
        """Copies of prefilled prompt blocks, one array per BLOCK_TOKENS tokens."""
        out = []
        for turn_id, start, end in ranges:
            seq = self.seqs.get(turn_id)
            if seq is None or end > len(seq.tokens):
                raise EngineError(f"cannot publish tokens {start}:{end} of turn {turn_id}")
            for at in range(start, end, BLOCK_TOKENS):
                out.append((turn_id, at, cut(seq.cache, at, at + BLOCK_TOKENS)))
        return tuple(out)

    # ------------------------------------------------------------ decode

    def _decode(self, paused: frozenset[int]) -> tuple[list[tuple[int, TokenOut]], list[SeqEnd]]:
        batch = [s for s in self.seqs.values() if s.decoding and s.turn_id not in paused]
        if not batch:
            return [], []
        inputs = [s.pending[0] for s in batch]
        constrained = [(s.constraint, i) for i, s in enumerate(batch) if s.constraint is not None]
        if self.ragged:
            logits = self.model(mx.array([[t] for t in inputs]), cache=ragged.ragged_caches([s.cache for s in batch]))
        else:  # one sequence at a time (models without the ragged seam)
            logits = mx.concatenate(
                [self.model(mx.array([[t]]), cache=s.cache) for t, s in zip(inputs, batch)], axis=0
            )
        logits = logits[:, -1, :]
        if constrained:
            bitmask = self._mask(len(batch))
            fill_rows(constrained, bitmask)
            logits = apply_bitmask(logits, bitmask, [row for _, row in constrained])
        picked = pick_tokens(logits, [s.sampler for s in batch], [s.recent for s in batch])
        out, ended = [], []
        for seq, token_in, p in zip(batch, inputs, picked):
            seq.tokens.append(token_in)
            seq.pending = [p.token]
            seq.recent = (seq.recent + [p.token])[-64:]
            seq.generated += 1
            out.append((seq.turn_id, TokenOut(p.token, p.logprob, p.top)))
            status = self._finish(seq, p.token)
            if status is not None:
                ended.append(self._end(seq, status))
        return out, ended

    def _finish(self, seq: _Seq, token: int) -> TurnStatus | None:
        if token in self.eos:
            return TurnStatus.FINISHED_STOPPED
        if seq.constraint is not None:
            if not seq.constraint.consume(token) or seq.constraint.finished:
                return TurnStatus.FINISHED_STOPPED
        if seq.generated >= seq.max_tokens:
            return TurnStatus.FINISHED_LENGTH
        return None

    def _mask(self, rows: int):
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            compiler = self.loaded.constraints
            self._bitmask = compiler.allocate_bitmask(max(rows, self.max_batch))
        return self._bitmask


# Chunks prefilled in one call are padded to the longest: a group keeps at least
# this share of its rows' positions real (a 24-token follow-up does not ride
# with a 256-token chunk, but follow-ups of 24 to 37 tokens go together).
MIN_GROUP_FILL = 0.75


def prefill_groups(work: list[tuple[_Seq, list[int]]]) -> list[list[tuple[_Seq, list[int]]]]:
    """Prefill chunks grouped for one model call each, longest first: a chunk joins
    the current group while the group's padded rows stay MIN_GROUP_FILL real."""
    groups: list[list] = []
    real = 0
    for item in sorted(work, key=lambda w: -len(w[1])):
        if groups:
            width = len(groups[-1][0][1])
            if real + len(item[1]) >= MIN_GROUP_FILL * width * (len(groups[-1]) + 1):
                groups[-1].append(item)
                real += len(item[1])
                continue
        groups.append([item])
        real = len(item[1])
    return groups


def _reserve(cache: list, tokens: int) -> None:
    """Grow each layer's arrays once for the `tokens` about to come (a whole prompt)
    instead of in 256-token steps, each of which copies the whole cache."""
    step = max(DECODE_GROWTH, -(-tokens // DECODE_GROWTH) * DECODE_GROWTH)
    for layer in cache:
        layer.step = step
