"""Per-token cost of constrained decoding (actors/constraint.py) beside a decode step.

A batch of 8 rows with the embedded model's vocabulary, 4 rows constrained by a small
JSON schema. Each step: fill_rows (the 4 masks, llguidance threads) and apply_bitmask
on (8, vocab) float32 logits, evaluated; tokens are then drawn from random logits under
the mask (not timed) and consumed; a row whose output finishes starts a fresh one.

Usage: .venv/bin/python bench/bench_constraint.py [--steps 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import actors  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np

from actors import loading
from actors.constraint import ConstraintCompiler, apply_bitmask, fill_rows
from actors.messages import ChatRequest, OutputFormat

BATCH, CONSTRAINED = 8, [1, 3, 4, 6]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}


def ms(samples: list[float]) -> str:
    values = sorted(s * 1e3 for s in samples)
    p90 = values[int(0.9 * (len(values) - 1))]
    return f"median {statistics.median(values):.3f} ms  p90 {p90:.3f} ms  max {values[-1]:.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    _, meta = mx.load(str(loading.embedded_gguf_path()), return_metadata=True)
    compiler = ConstraintCompiler(loading._gguf_tokenizer(meta))
    started = time.perf_counter()
    compiler.warm_up()
    table_s = time.perf_counter() - started
    request = ChatRequest(output_format=OutputFormat("json_schema", SCHEMA))
    grammar = compiler.grammar_for(request, "<tool_call>", "</tool_call>")
    started = time.perf_counter()
    compiler.compile(grammar)
    compile_s = time.perf_counter() - started

    vocab = compiler.vocab_size
    rng = np.random.default_rng(args.seed)
    bitmask = compiler.allocate_bitmask(BATCH)
    rows = {row: compiler.compile(grammar) for row in CONSTRAINED}
    fills, applies, totals, finished = [], [], [], 0
    for _ in range(args.steps):
        logits = mx.array(rng.standard_normal((BATCH, vocab)).astype(np.float32))
        mx.eval(logits)
        t0 = time.perf_counter()
        fill_rows([(c, row) for row, c in rows.items()], bitmask)
        t1 = time.perf_counter()
        masked = apply_bitmask(logits, bitmask, CONSTRAINED)
        mx.eval(masked)
        t2 = time.perf_counter()
        fills.append(t1 - t0)
        applies.append(t2 - t1)
        totals.append(t2 - t0)
        tokens = np.array(mx.argmax(masked, axis=-1))
        for row, constraint in rows.items():
            if not constraint.consume(int(tokens[row])):
                raise SystemExit(f"row {row}: {constraint.error}")
            if constraint.finished or int(tokens[row]) in compiler.eos_ids:
                rows[row] = compiler.compile(grammar)
                finished += 1

    print(f"vocab {vocab}, batch {BATCH}, constrained rows {len(CONSTRAINED)}, steps {args.steps}")
    print(f"token table (once per model): {table_s:.3f} s; first compile of the schema: "
          f"{compile_s * 1e3:.2f} ms; outputs finished: {finished}")
    print(f"fill_rows (4 rows):        {ms(fills)}")
    print(f"apply_bitmask (8 x vocab): {ms(applies)}")
    print(f"fill + apply per token:    {ms(totals)}")


if __name__ == "__main__":
    main()
