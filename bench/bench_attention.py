"""greenroom's CPU attention (actors/cpu_attention.py) vs MLX's own kernel, side by side.

Both run in this one process, alternated rep by rep, on the exported float32
folder of the embedded model (mlx-lm's llama.Model):

  layer     one attention call at the model's shapes (9 query heads, 3 KV heads,
            head dim 64): prefill chunks at several offsets and batched decode;
  prefill   a ~1,400-token prompt prefilled in --chunk-token chunks (seconds);
  decode    tokens/s of batch 1 and batch 8 at a ~1,400-token context.

Usage: .venv/bin/python bench/bench_attention.py [--reps 3] [--chunk 256]
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
import mlx.core as mx  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from actors import cpu_attention  # noqa: E402

LAYER_CASES = [  # name, batch, query rows, keys
    ("prefill chunk 256 @ 0", 1, 256, 256),
    ("prefill chunk 256 @ 1024", 1, 256, 1280),
    ("prefill chunk 256 @ 2048", 1, 256, 2304),
    ("8 prefill chunks 256 @ 1024", 8, 256, 1280),
    ("decode batch 1 @ 1400", 1, 1, 1400),
    ("decode batch 8 @ 1400", 8, 1, 1400),
]


def timed(fn, reps: int) -> float:
    mx.eval(fn())
    started = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - started) / reps


def layer_case(batch: int, rows: int, keys: int, reps: int) -> dict:
    q = mx.random.normal((batch, 9, rows, 64))
    k = mx.random.normal((batch, 3, keys, 64))
    v = mx.random.normal((batch, 3, keys, 64))
    mask = "causal" if rows > 1 else None
    stock = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)  # noqa: E731
    ours = lambda: cpu_attention.cpu_attention(q, k, v, 0.125, mask)  # noqa: E731
    err = mx.abs(stock() - ours()).max().item()
    a, b = [], []
    for _ in range(reps):
        a.append(timed(stock, 5))
        b.append(timed(ours, 5))
    return {"stock_ms": 1e3 * statistics.median(a), "greenroom_ms": 1e3 * statistics.median(b), "max_abs_diff": err}


def model_prefill(model, tokens: list[int], chunk: int) -> float:
    cache = make_prompt_cache(model)
    x = mx.array(tokens)[None]
    started = time.perf_counter()
    for i in range(0, x.shape[1], chunk):
        model(x[:, i:i + chunk], cache=cache)
        mx.eval([c.state for c in cache])
    return time.perf_counter() - started


def filled_cache(model, tokens: list[int], batch: int) -> list:
    cache = make_prompt_cache(model)
    x = mx.array([tokens] * batch)
    for i in range(0, x.shape[1], 512):
        model(x[:, i:i + 512], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def model_decode(model, cache: list, batch: int, steps: int = 24) -> float:
    """Decode tokens/s from a filled cache, which is trimmed back afterwards."""
    y = mx.zeros((batch, 1), dtype=mx.int32) + 100
    started = time.perf_counter()
    for _ in range(steps):
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.eval(y)
    elapsed = time.perf_counter() - started
    for c in cache:
        c.trim(steps)
    return batch * steps / elapsed


def both(model, fn, reps: int) -> tuple[float, float]:
    """fn() under the stock kernel and under greenroom's, alternated; medians."""
    stock, ours = [], []
    for _ in range(reps):
        cpu_attention.uninstall_all()
        stock.append(fn())
        cpu_attention.install(model)
        ours.append(fn())
    cpu_attention.uninstall_all()
    return statistics.median(stock), statistics.median(ours)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--context", type=int, default=1400)
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args(argv)
    from export_model import ensure_model
    import mlx_lm

    if mx.default_device() != mx.cpu:
        print("MLX is not on the CPU here: greenroom keeps MLX's fused kernel; nothing to compare")
        return 0
    path = args.model or ensure_model()
    model, _ = mlx_lm.load(str(path))
    assert isinstance(model, llama.Model)
    out = C.header()
    out["settings"] = vars(args) | {"model": str(path)}

    rows, layers = [], {}
    for name, batch, q_rows, keys in LAYER_CASES:
        r = layer_case(batch, q_rows, keys, args.reps)
        layers[name] = r
        rows.append([name, r["stock_ms"], r["greenroom_ms"], r["stock_ms"] / r["greenroom_ms"], r["max_abs_diff"]])
    print(C.table(rows, ["one attention call", "mlx ms", "greenroom ms", "speed-up", "max |diff|"]))
    out["layer"] = layers

    tokens = [(i * 7919) % 40000 + 100 for i in range(args.context)]
    pre = both(model, lambda: model_prefill(model, tokens, args.chunk), args.reps)
    caches = {b: filled_cache(model, tokens, b) for b in (1, 8)}
    dec1 = both(model, lambda: model_decode(model, caches[1], 1), args.reps)
    dec8 = both(model, lambda: model_decode(model, caches[8], 8), args.reps)
    model_rows = [
        [f"prefill {args.context} tokens, chunks of {args.chunk} (s)", pre[0], pre[1], pre[0] / pre[1]],
        [f"decode batch 1 @ {args.context} (tok/s)", dec1[0], dec1[1], dec1[1] / dec1[0]],
        [f"decode batch 8 @ {args.context} (tok/s)", dec8[0], dec8[1], dec8[1] / dec8[0]],
    ]
    print()
    print(C.table(model_rows, ["whole model", "mlx attention", "greenroom attention", "speed-up"]))
    out["model"] = {"prefill_s": pre, "decode_b1_tok_s": dec1, "decode_b8_tok_s": dec8}
    print(f"results: {C.write_result('attention', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
