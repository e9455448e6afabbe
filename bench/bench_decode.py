"""Single-agent decode: greenroom over HTTP vs mlx-lm's own generate_step.

Same weights (the embedded model exported by export_model.py, loaded by both),
same prompt, greedy. Decode tokens/s excludes prefill:

  mlx-lm     (n - 1) / (time of the n-th token - time of the 1st), from
             mlx_lm.generate.generate_step in a separate worker process;
  greenroom  (completion_tokens - 1) / (finish chunk - first content chunk), from
             a streaming /v1/chat/completions request (temperature 0,
             stream_options.include_usage) to `greenroom serve` in a subprocess.

The two are measured alternately (A B A B ...) so that machine drift hits both,
and never at the same time: the worker is blocked on its stdin while greenroom
runs and the server is idle while the worker runs. The figure is the median of
each side; the target is greenroom / mlx-lm >= 0.9.

Usage: .venv/bin/python bench/bench_decode.py [--reps 5] [--max-tokens 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.9
MESSAGES = [
    {"role": "system", "content": "You are a helpful coding assistant. Explain your code in detail."},
    {"role": "user", "content": "Write a complete Python implementation of a singly linked list class with "
                                "append, prepend, insert, delete, find, reverse and __len__ methods. Explain "
                                "every method in detail and then show example usage."},
]


# ---------------------------------------------------------------- worker side


def worker_main(model_path: str) -> None:
    import actors  # noqa: F401  (OpenBLAS before mlx, exactly as greenroom does)
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, tokenizer = mlx_lm.load(model_path)
    eos = set(tokenizer.eos_token_ids)

    def decode(messages, max_tokens):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        tokens, times = [], []
        started = time.perf_counter()
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if token in eos:
                break
        n = len(tokens)
        rate = (n - 1) / (times[-1] - times[0]) if n > 1 else None
        text = tokenizer.decode([t for t in tokens if t not in eos])
        return {"prompt_tokens": len(prompt), "tokens": n, "ttft": times[0] - started,
                "decode_seconds": times[-1] - times[0], "decode_rate": rate, "text": text}

    C.serve_worker({"decode": decode})


# ---------------------------------------------------------------- driver


async def greenroom_decode(url: str, agent: str, max_tokens: int) -> C.StreamResult:
    async with C.client_session() as session:
        return await C.stream_chat(session, url, MESSAGES, agent=agent, max_tokens=max_tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="single-agent decode: greenroom HTTP vs mlx-lm generate_step")
    ap.add_argument("--reps", type=int, default=5, help="measurements per side (median)")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--model", type=Path, default=None, help="mlx-lm folder (default: the exported embedded model)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    C.add_env_flags(ap)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    model, out = C.setup_server_bench(args)
    print(f"model: {model}\nstarting greenroom and the mlx-lm worker ...", flush=True)
    server = C.Server("greenroom", model).start()
    worker = None
    runs = {"mlx_lm": [], "greenroom": []}
    try:
        worker = C.Worker([__file__, "--worker", str(model)])
        # Warm-up, not recorded: first-call compilation, allocator growth.
        worker.ask(op="decode", messages=MESSAGES, max_tokens=16)
        asyncio.run(greenroom_decode(server.url, "bench-decode-warmup", 16))
        for rep in range(args.reps):
            # A B, then B A: linear drift cancels over each pair of reps.
            for side in (("mlx_lm", "greenroom") if rep % 2 == 0 else ("greenroom", "mlx_lm")):
                if side == "mlx_lm":
                    runs["mlx_lm"].append(worker.ask(op="decode", messages=MESSAGES, max_tokens=args.max_tokens))
                    continue
                b = asyncio.run(greenroom_decode(server.url, f"bench-decode-{rep}", args.max_tokens))
                if b.error or b.status != 200:
                    raise RuntimeError(f"greenroom request failed: {b.status} {b.error}")
                runs["greenroom"].append(b.summary())
            a, b = runs["mlx_lm"][-1], runs["greenroom"][-1]
            print(f"  rep {rep + 1}/{args.reps}: mlx-lm {a['decode_rate']:.2f} tok/s ({a['tokens']} tokens)   "
                  f"greenroom {b['decode_rate']:.2f} tok/s ({b['usage']['completion_tokens']} tokens)   "
                  f"ratio {b['decode_rate'] / a['decode_rate']:.3f}", flush=True)
    finally:
        if worker:
            worker.close()
        server.stop()

    mlx_rate = C.median(r["decode_rate"] for r in runs["mlx_lm"])
    gr_rate = C.median(r["decode_rate"] for r in runs["greenroom"])
    ratio = gr_rate / mlx_rate
    paired = [b["decode_rate"] / a["decode_rate"] for a, b in zip(runs["mlx_lm"], runs["greenroom"])]
    same_text = all(a["text"] == b["text"] for a, b in zip(runs["mlx_lm"], runs["greenroom"]))
    rows = [
        ["mlx-lm generate_step", runs["mlx_lm"][0]["prompt_tokens"], C.median(r["tokens"] for r in runs["mlx_lm"]),
         C.median(r["ttft"] for r in runs["mlx_lm"]), mlx_rate],
        ["greenroom HTTP stream", runs["greenroom"][0]["usage"]["prompt_tokens"],
         C.median(r["usage"]["completion_tokens"] for r in runs["greenroom"]),
         C.median(r["ttft"] for r in runs["greenroom"]), gr_rate],
    ]
    print()
    print(C.table(rows, ["", "prompt tok", "gen tok", "TTFT s (med)", "decode tok/s (med)"]))
    print(f"\nratio greenroom / mlx-lm decode tok/s = {ratio:.3f}   (target >= {TARGET}: "
          f"{'MET' if ratio >= TARGET else 'NOT MET'})")
    print(f"per-rep ratios: {', '.join(f'{x:.3f}' for x in paired)} (median {C.median(paired):.3f})")
    print(f"identical greedy text on every rep: {same_text}")
    out.update({
        "model": str(model),
        "settings": {"reps": args.reps, "max_tokens": args.max_tokens, "messages": MESSAGES,
                     "greenroom_cmd": server.cmd, "order": "mlx_lm, greenroom on even reps; greenroom, mlx_lm on odd reps"},
        "mlx_lm_decode_tok_s": mlx_rate,
        "greenroom_decode_tok_s": gr_rate,
        "ratio": ratio,
        "paired_ratios": paired,
        "paired_ratio_median": C.median(paired),
        "target": TARGET,
        "met": ratio >= TARGET,
        "identical_text": same_text,
        "runs": runs,
    })
    path = C.write_result("decode", out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
