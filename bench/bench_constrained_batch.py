"""Step time of a decoding batch of 8 where 4 sequences follow a JSON schema, over the
same batch unconstrained (issue 9's target: <= 1.15).

The real BatchEngine on the embedded model (float32 on the CPU), greedy. Each rep
inserts 8 short prompts, prefills them, then times decode steps; the constrained
variant gives sequences 1, 3, 4 and 6 a json_schema grammar (actors/constraint.py).
Only steps with all 8 sequences decoding (and no prefill) are counted, so a
constrained sequence that finishes early does not make its variant look cheaper.
The two variants alternate rep by rep in this one process.

Usage: .venv/bin/python bench/bench_constrained_batch.py [--reps 4] [--steps 24]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import actors  # noqa: E402,F401  (OpenBLAS before mlx)

from actors import loading  # noqa: E402
from actors.engine import BatchEngine  # noqa: E402
from actors.messages import ChatRequest, OutputFormat, SamplingParams, SeqInsert, StepPlan  # noqa: E402

CONSTRAINED = (1, 3, 4, 6)
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "string"}},
        "notes": {"type": "string"},
    },
    "required": ["title", "steps", "notes"],
}
QUESTIONS = [
    "How do I bake bread?", "Plan a trip to Rome.", "Explain binary search.", "Describe a cat.",
    "How does a compiler work?", "Give a workout plan.", "Summarise the water cycle.", "Write a recipe.",
]


def one_rep(loaded, engine, constrained: bool, steps: int, turn_base: int) -> list[float]:
    tokenizer = loaded.tokenizer
    grammar = loaded.constraints.grammar_for(
        ChatRequest(output_format=OutputFormat("json_schema", SCHEMA)), "", ""
    )
    inserts = []
    for i, q in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": q + " Answer in JSON."}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        constraint = loaded.constraints.compile(grammar) if constrained and i in CONSTRAINED else None
        inserts.append(SeqInsert(turn_base + i, tuple(prompt), None, (), SamplingParams(temperature=0.0),
                                 steps + 8, constraint))
    plan = StepPlan(inserts=tuple(inserts), prefill=tuple((s.turn_id, len(s.suffix) - 1) for s in inserts))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        result = engine.step(plan)
        took = time.perf_counter() - started
        if result.decode_tokens == len(QUESTIONS) and not result.prefill_tokens:
            times.append(took)
        plan = StepPlan()
    engine.abort_all()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    C.add_env_flags(ap)
    args = ap.parse_args()
    C.apply_env_flags(args)
    info = C.header()
    loaded = loading.load(None)
    engine = BatchEngine(loaded, max_batch=8)
    loaded.constraints.warm_up()
    one_rep(loaded, engine, True, 4, 10_000)  # warm-up: grammar cache, allocator
    plain, constrained = [], []
    for rep in range(args.reps):
        plain += one_rep(loaded, engine, False, args.steps, 100 * rep)
        constrained += one_rep(loaded, engine, True, args.steps, 100 * rep + 50)
    a, b = statistics.median(plain), statistics.median(constrained)
    print(C.table([["unconstrained", len(plain), C.fmt(a * 1e3)], ["4 of 8 constrained", len(constrained), C.fmt(b * 1e3)]],
                  ["batch of 8", "steps", "median step ms"]))
    print(f"ratio constrained / unconstrained: {b / a:.3f} (target <= 1.15)")
    C.write_result("constrained_batch", {**info, "args": vars(args), "steps_plain": len(plain),
                                         "steps_constrained": len(constrained), "median_step_s_plain": a,
                                         "median_step_s_constrained": b, "ratio": b / a})
    return 0


if __name__ == "__main__":
    sys.exit(main())
