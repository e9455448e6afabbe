"""The compute floor of follow-up turns that arrive together: N agents, each with a
`--depth`-token cache, each sending a `--suffix`-token follow-up. Measures, on the
embedded model as greenroom loads it (float32 on the CPU, greenroom's attention):

- one suffix prefilled alone,
- the N suffixes one model call each,
- the N suffixes as one batched call over equal-depth caches (the best a batched
  prefill could do);
- greenroom's engine step that starts the N turns (each cache assembled from
  64-token pool blocks, the suffixes prefilled, the first token of each decoded),
  with the prefill as one model call per sequence vs grouped into ragged calls
  (actors/ragged.py), side by side.

Whatever the scheduler does, N simultaneous follow-ups cost at least the batched
figure before the last of their first tokens; bounded steps (actors/prefill_budget.py)
let the first of them start after a fraction of it.

Usage: .venv/bin/python bench/bench_followup_prefill.py [--agents 5] [--depth 1900] [--suffix 29]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import actors  # noqa: E402,F401  (OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from actors import engine as engine_mod, loading  # noqa: E402
from actors.kvblocks import KVPieces, cut  # noqa: E402
from actors.messages import SamplingParams, SeqInsert, StepPlan  # noqa: E402


def filled(model, depth: int, rng: random.Random) -> list:
    cache = make_prompt_cache(model)
    model(mx.array([[rng.randrange(1000, 20000) for _ in range(depth)]]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def prefill(model, cache, rows: int, n: int) -> None:
    out = model(mx.array([[5] * n] * rows), cache=cache)
    mx.eval(out, [c.state for c in cache])
    for layer in cache:
        layer.trim(n)  # back to the same depth for the next rep


def engine_step(loaded, pieces, suffixes, grouped: bool) -> float:
    """Seconds of the engine step that starts one turn per (cached tokens, blocks) pair."""
    real = engine_mod.prefill_groups
    engine_mod.prefill_groups = real if grouped else (lambda work: [[w] for w in work])
    try:
        engine = engine_mod.BatchEngine(loaded, max_batch=8)
        inserts = tuple(SeqInsert(i, suffix, blocks, tokens, SamplingParams(temperature=0.0), 2)
                        for i, ((tokens, blocks), suffix) in enumerate(zip(pieces, suffixes)))
        plan = StepPlan(inserts=inserts, removes=(), prefill=tuple((i, len(s) - 1) for i, s in enumerate(suffixes)),
                        paused=(), publish=())
        started = time.perf_counter()
        engine.step(plan)
        return time.perf_counter() - started
    finally:
        engine_mod.prefill_groups = real


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--depth", type=int, default=1900)
    ap.add_argument("--suffix", type=int, default=29)
    ap.add_argument("--reps", type=int, default=3)
    C.add_env_flags(ap)
    args = ap.parse_args(argv)
    C.apply_env_flags(args)
    info = C.header()
    loaded = loading.load(None)  # the embedded model, with greenroom's CPU attention
    model, rng = loaded.model, random.Random(0)
    caches = [filled(model, args.depth, rng) for _ in range(args.agents)]
    batch = make_prompt_cache(model)
    for i, layer in enumerate(batch):
        layer.keys = mx.concatenate([c[i].keys[..., : args.depth, :] for c in caches], axis=0)
        layer.values = mx.concatenate([c[i].values[..., : args.depth, :] for c in caches], axis=0)
        layer.offset = args.depth
    mx.eval([c.state for c in batch])

    alone = timed(lambda: prefill(model, caches[0], 1, args.suffix), args.reps)
    serial = timed(lambda: [prefill(model, c, 1, args.suffix) for c in caches], args.reps)
    batched = timed(lambda: prefill(model, batch, args.agents, args.suffix), args.reps)
    # The engine's real path: caches from pool blocks, the same suffixes each rep.
    pieces = []
    for c in caches:
        tokens = tuple(rng.randrange(1000, 20000) for _ in range(args.depth))
        blocks = tuple((cut(c, at, min(at + 64, args.depth)), min(64, args.depth - at)) for at in range(0, args.depth, 64))
        pieces.append((tokens, KVPieces(blocks)))
    suffixes = [tuple(rng.randrange(1000, 20000) for _ in range(args.suffix)) for _ in caches]
    steps = {False: [], True: []}
    for _ in range(args.reps + 1):  # alternated, the first pair a warm-up
        for grouped in (False, True):
            steps[grouped].append(engine_step(loaded, pieces, suffixes, grouped))
    per_call, grouped = (min(steps[g][1:]) for g in (False, True))
    print(C.table(
        [["one alone", f"{alone:.3f}"], [f"{args.agents} one after another", f"{serial:.3f}"],
         [f"{args.agents} in one batched call", f"{batched:.3f}"],
         [f"engine step starting {args.agents} turns, one prefill call each", f"{per_call:.3f}"],
         [f"engine step starting {args.agents} turns, grouped prefill", f"{grouped:.3f}"]],
        [f"{args.suffix}-token prefill at depth {args.depth}", "seconds"],
    ))
    print(f"batched / one after another: {batched / serial:.3f}")
    print(f"engine step, grouped / one call each: {grouped / per_call:.3f}")
    C.write_result("followup_prefill", {**info, "args": vars(args), "alone_s": alone, "serial_s": serial,
                                        "batched_s": batched, "batched_over_serial": batched / serial,
                                        "engine_step_per_call_s": per_call, "engine_step_grouped_s": grouped,
                                        "engine_grouped_over_per_call": grouped / per_call})
    return 0


if __name__ == "__main__":
    sys.exit(main())
