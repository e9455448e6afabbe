"""Live model swap: its time broken down, next to plain mlx_lm.load of the same model.

greenroom serves the embedded model (GGUF) while three agents stream; then
`greenroom ctl swap FOLDER` switches to the embedded model exported as an mlx-lm
folder (export_model.py), and back, several times. The control socket reports
drain, save, load and first-token times. In the same run a separate worker
process times `mlx_lm.load(FOLDER)` (while the server is idle). The target:

    swap total <= 1.3 x (drain wait + mlx_lm.load time)

Usage: .venv/bin/python bench/bench_swap.py [--reps 3] [--agents 3] [--max-tokens 40]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 1.3


def worker_main() -> None:
    import actors  # noqa: F401  (OpenBLAS first, as greenroom does)

    def load(path: str) -> dict:
        import mlx.core as mx
        from mlx_lm import load as mlx_load

        started = time.perf_counter()
        model, _ = mlx_load(path)
        mx.eval(model.parameters())
        seconds = time.perf_counter() - started
        del model
        return {"seconds": seconds}

    C.serve_worker({"load": load})


async def streams_during_swap(server: C.Server, folder: str, args) -> dict:
    from gateway.control import request

    messages = [{"role": "user", "content": "Write a long story about a robot learning to paint."}]
    async with C.client_session() as session:
        tasks = [
            asyncio.create_task(
                C.stream_chat(session, server.url, messages, agent=f"swap-agent-{i}", max_tokens=args.max_tokens)
            )
            for i in range(args.agents)
        ]
        await asyncio.sleep(1.0)  # let them get going
        sock = server.tmp / "cache" / "control.sock"
        reply = await asyncio.to_thread(request, sock, "swap", {"model": folder, "drain_timeout": 300})
        results = await asyncio.gather(*tasks)
    finished = sum(1 for r in results if r.finish_reason in ("stop", "length") and not r.error)
    return {"reply": reply, "streams_completed": finished}


def main() -> None:
    if "--worker" in sys.argv:
        return worker_main()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()

    from export_model import ensure_model

    folder = str(ensure_model())
    result = C.header()
    worker = C.Worker([__file__, "--worker"])
    rows, swaps, loads = [], [], []
    with C.Server("greenroom", Path("default")) as server:
        for rep in range(args.reps):
            for target in (folder, "default"):
                out = C.run_async(streams_during_swap(server, target, args))
                reply = out["reply"]
                if not reply.get("ok"):
                    raise SystemExit(f"swap failed: {reply}")
                s = reply["result"]["seconds"]
                swaps.append({"to": target, **s, "streams_completed": out["streams_completed"]})
                if target == folder:
                    load = worker.ask(op="load", path=folder)["seconds"]
                    loads.append(load)
                    ratio = s["total"] / (s["drain"] + load)
                    rows.append([rep, s["drain"], s["save"], s["load"], s["first_token"], s["total"], load, ratio])
    worker.close()
    print(C.table(rows, ["rep", "drain s", "save s", "load s", "1st tok s", "swap total s",
                         "mlx_lm.load s", "total/(drain+load)"]))
    ratios = [r[-1] for r in rows]
    median = C.median(ratios)
    verdict = "meets" if median <= TARGET else "misses"
    print(f"\nswap total / (drain + mlx_lm.load): median {median:.2f} ({verdict} target <= {TARGET})")
    result.update(
        model_folder=folder,
        settings=vars(args),
        swaps=swaps,
        mlx_lm_load_seconds=loads,
        ratios=ratios,
        median_ratio=median,
        target=TARGET,
    )
    print("wrote", C.write_result("swap", result))


if __name__ == "__main__":
    main()
