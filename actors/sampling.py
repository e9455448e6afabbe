"""Choosing each sequence's next token inside a batch.

Every sequence of the running batch brings its own settings: temperature and
the truncations (top_k, min_p, top_p), penalties and logit_bias (mlx-lm's logits
processors), a grammar (actors/constraint.py) and whether it wants logprobs. A
decode step hands this module the batch's logits and gets one token per row.

Rows that only want the greedy token of the raw logits are chosen with one
argmax over all of them, which also keeps a greedy sequence's tokens identical
whatever else shares its batch. Sampled rows each draw from their own PRNG key,
so a seeded request gives the same tokens in any batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from actors.messages import SamplingParams

PENALTY_CONTEXT = 64  # tokens the repetition / presence / frequency penalties look back over
MAX_TOP_LOGPROBS = 20


@dataclass(slots=True)
class SeqSampler:
    """One sequence's sampling state (its PRNG key advances with every draw)."""

    params: SamplingParams  # resolved: temperature and top_p are set
    processors: list = field(default_factory=list)
    key: mx.array | None = None

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and not self.processors


def make_seq_sampler(params: SamplingParams) -> SeqSampler:
    processors = make_logits_processors(
        logit_bias=dict(params.logit_bias) or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty not in (None, 1.0) else None,
        repetition_context_size=PENALTY_CONTEXT,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=PENALTY_CONTEXT,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=PENALTY_CONTEXT,
    )
    key = None
    if not params.greedy:
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        key = mx.random.key(seed)
    return SeqSampler(params, processors, key)


@dataclass(frozen=True, slots=True)
class Picked:
    """Row i's token, and its logprob and top alternatives when the sequence asked."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def pick_tokens(logits: mx.array, samplers: list[SeqSampler], contexts: list) -> list[Picked]:
    """One token per row of `logits` (B, V), already masked by any grammar.

    `contexts[i]` is row i's recent tokens (a list of ints) for the penalties."""
    rows = []
    for i, s in enumerate(samplers):
        row = logits[i : i + 1]
        if s.processors:
            ctx = mx.array(contexts[i][-PENALTY_CONTEXT:], dtype=mx.int32)
            for process in s.processors:
                row = process(ctx, row)
        rows.append(row)
    processed = rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=0)
    logprobs = processed - mx.logsumexp(processed, axis=-1, keepdims=True)
    greedy = mx.argmax(logprobs, axis=-1)
    chosen = []
    for i, s in enumerate(samplers):
        if s.params.greedy:
            chosen.append(greedy[i : i + 1])
        else:
            chosen.append(_draw(logprobs[i : i + 1], s))
    tokens = chosen[0] if len(chosen) == 1 else mx.concatenate(chosen, axis=0)
    wanted = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    extra = []
    if wanted:
        k = max(1, max(samplers[i].params.logprobs for i in wanted))
        top_ids = mx.argpartition(-logprobs[mx.array(wanted)], kth=k - 1, axis=-1)[:, :k]
        top_lps = mx.take_along_axis(logprobs[mx.array(wanted)], top_ids, axis=-1)
        chosen_lps = mx.take_along_axis(logprobs[mx.array(wanted)], tokens[mx.array(wanted)][:, None], axis=-1)
        extra = [top_ids, top_lps, chosen_lps]
    mx.eval(tokens, *extra)
    out = [Picked(t) for t in tokens.tolist()]
    if wanted:
        ids, lps, chosen_lp = (a.tolist() for a in extra)
        for j, i in enumerate(wanted):
            k = samplers[i].params.logprobs
            top = sorted(zip(ids[j], lps[j]), key=lambda p: -p[1])[:k]
            out[i] = Picked(out[i].token, chosen_lp[j][0], tuple(top))
    return out


def _draw(logprobs: mx.array, s: SeqSampler) -> mx.array:
    p = s.params
    if p.top_k:
        logprobs = apply_top_k(logprobs, p.top_k)
    if p.min_p:
        logprobs = apply_min_p(logprobs, p.min_p)
    if p.top_p is not None and 0.0 < p.top_p < 1.0:
        logprobs = apply_top_p(logprobs, p.top_p)
    s.key, key = mx.random.split(s.key)
    return mx.random.categorical(logprobs * (1.0 / p.temperature), key=key)


# OpenAI's defaults, for what neither the request nor the model's generation_config sets.
API_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


def resolve(params: SamplingParams, model_defaults: dict) -> SamplingParams:
    """Fill what the request left unset from the model's generation_config.json, then
    from the API's defaults. A request that sets any sampling field keeps the rest of
    the model's defaults too (as vLLM does)."""
    from dataclasses import replace

    fields = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(params, name) is None:
            value = model_defaults.get(name, API_DEFAULTS.get(name))
            if value is not None:
                fields[name] = value
    return replace(params, **fields) if fields else params
