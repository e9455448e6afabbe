"""Many agents at once: greenroom vs mlx_lm.server on a coding-agent workload.

Both servers load the same folder (the embedded model exported by
export_model.py) and run side by side in one run; each level runs on one server
and then the other (the order alternates between levels), so drift hits both.

Phases, per number of agents N (default 1, 2, 4, 8):

  workload  N agents in parallel; each has a ~1,200-token system prompt (shared
            coding-agent instructions + its own project) and runs --turns turns;
            each turn appends the previous answer and a new user message and
            streams a greedy reply of --max-tokens tokens. Reported: wall time,
            median TTFT of first turns and of later turns, aggregate generated
            tokens/s (all completion tokens / wall time).
  decode    (N in --decode-agents, default 1 and 8) N agents send a short prompt asking for a long reply at the same time
            (--decode-tokens each). Aggregate decode tokens/s = the sum over the
            streams of (tokens - 1) / (last token - first token).

Then, in a separate process while both servers are idle: the bare batched decode
of the model (mlx-lm BatchGenerator with greenroom's CPU attention, as greenroom
runs it; the same prompts, batch 1 and batch 8, no HTTP), to compare greenroom's 8-agent over 1-agent decode speed-up with the
model's own (target >= 0.9 x), and the prefill time of one --prefill-chunk chunk.

Finally the stall: agent A streams a long reply; once it is going, agent B sends
a ~4,000-token prompt. The longest gap between two of A's streamed tokens during
B's prefill is compared with one chunk's prefill time measured in the separate
process (target <= 2 x).

Usage: .venv/bin/python bench/bench_agents.py [--agents 1,2,4,8] [--turns 3]
       [--max-tokens 64] [--decode-tokens 96] [--servers greenroom,mlx_lm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import workload as W  # noqa: E402

SPEEDUP_TARGET = 0.9
STALL_TARGET = 2.0
MLX_LM_SETTINGS = [
    # mlx_lm.server batches every request whose model is batchable (llama's
    # KVCache is) and has no seed. decode/prompt concurrency are the batch
    # sizes of its BatchGenerator (its defaults, >= 8 agents); a prefill step of
    # 2048 prefills each ~1,300-token first turn in one pass; the prompt cache
    # must hold every agent's conversation (it keeps a system-prompt entry and
    # a full-conversation entry per agent, and evicts LRU beyond this count).
    "--decode-concurrency", "32",
    "--prompt-concurrency", "8",
    "--prefill-step-size", "2048",
    "--prompt-cache-size", "256",
]


# ---------------------------------------------------------------- worker (bare model)


def worker_main(model_path: str) -> None:
    import actors  # noqa: F401  (OpenBLAS before mlx, exactly as greenroom does)
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = mlx_lm.load(model_path)
    if not os.environ.get("GREENROOM_STOCK_ATTENTION"):
        from actors import cpu_attention

        cpu_attention.install(model)  # the forward pass greenroom runs (a no-op off the CPU)

    def bare_decode(batch: int, tokens: int, prefill_chunk: int):
        """Decode tokens/s of `batch` sequences through BatchGenerator, prefill excluded."""
        prompts = [tokenizer.apply_chat_template(W.decode_messages(i), add_generation_prompt=True)
                   for i in range(batch)]
        gen = BatchGenerator(model, stop_tokens=None, completion_batch_size=max(8, batch),
                             prefill_batch_size=max(8, batch), prefill_step_size=prefill_chunk)
        gen.insert(prompts, max_tokens=[tokens] * batch)
        counted, started, steps = 0, None, 0
        while True:
            _, responses = gen.next()
            if not responses and started is not None:
                break
            if started is None:
                if len(responses) == batch:  # every sequence is decoding from now on
                    started = time.perf_counter()
                continue
            counted += len(responses)
            steps += 1
            if all(r.finish_reason for r in responses):
                break
        elapsed = time.perf_counter() - started
        gen.close()
        return {"batch": batch, "tokens": counted, "steps": steps, "seconds": elapsed,
                "tok_s": counted / elapsed, "step_s": elapsed / steps}

    def chunk_prefill(prompt_tokens: int, chunk: int, nonce: str):
        """Prefill a ~prompt_tokens prompt in chunks of `chunk`; seconds per chunk."""
        messages = W.long_prompt_messages(tokenizer, prompt_tokens, nonce)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        cache = make_prompt_cache(model)
        x = mx.array(prompt)[None]
        times = []
        for start in range(0, x.shape[1], chunk):
            t = time.perf_counter()
            model(x[:, start:start + chunk], cache=cache)
            mx.eval([c.state for c in cache])
            times.append(time.perf_counter() - t)
        full = [t for t in times if t]  # every chunk, the last one may be partial
        return {"prompt_tokens": len(prompt), "chunk": chunk, "chunk_seconds": times,
                "mean_s": statistics.mean(full[:-1] or full), "max_s": max(full),
                "first_s": full[0], "total_s": sum(full)}

    C.serve_worker({"bare_decode": bare_decode, "chunk_prefill": chunk_prefill})


# ---------------------------------------------------------------- phases (client side)


async def run_agent(session, url, kind, agent: int, nonce: str, turns: int, max_tokens: int, rows: list,
                    shared: bool = False):
    agent_id = f"bench-{nonce}-a{agent}"
    if shared:  # one system prompt for all; the agent's project in its first message
        messages = [{"role": "system", "content": W.shared_system_prompt(nonce)}]
    else:
        messages = [{"role": "system", "content": W.system_prompt(agent, nonce)}]
    for turn in range(turns):
        text = W.user_message(agent, turn)
        if shared and turn == 0:
            text = W.project_context(agent) + text
        messages.append({"role": "user", "content": text})
        r = await C.stream_chat(session, url, messages, agent=agent_id if kind == "greenroom" else None,
                                max_tokens=max_tokens)
        if r.status != 200 or r.error:
            raise RuntimeError(f"{kind} agent {agent} turn {turn}: HTTP {r.status}: {r.error}")
        usage = r.usage or {}
        rows.append({"agent": agent, "turn": turn, "sent": r.sent, "ttft": r.ttft, "end": r.end,
                     "completion_tokens": r.completion_tokens, "prompt_tokens": usage.get("prompt_tokens"),
                     "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                     "prefilled_tokens": usage.get("prefilled_tokens"), "finish_reason": r.finish_reason,
                     "decode_rate": r.decode_rate})
        messages.append({"role": "assistant", "content": r.text})


async def workload(url: str, kind: str, n: int, nonce: str, turns: int, max_tokens: int,
                   shared: bool = False) -> dict:
    rows: list[dict] = []
    async with C.client_session() as session:
        started = time.perf_counter()
        await asyncio.gather(*(run_agent(session, url, kind, a, nonce, turns, max_tokens, rows, shared)
                               for a in range(n)))
        wall = time.perf_counter() - started
    generated = sum(r["completion_tokens"] for r in rows)
    first = [r["ttft"] for r in rows if r["turn"] == 0]
    later = [r["ttft"] for r in rows if r["turn"] > 0]
    for r in rows:
        r["sent"] -= started
        r["end"] = r["end"] - started if r["end"] else None
    return {"agents": n, "wall_s": wall, "generated_tokens": generated, "agg_tok_s": generated / wall,
            "ttft_first_median_s": C.median(first), "ttft_later_median_s": C.median(later),
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
            "cached_tokens": sum(r["cached_tokens"] or 0 for r in rows),
            "requests": sorted(rows, key=lambda r: (r["agent"], r["turn"]))}


async def decode_phase(url: str, kind: str, n: int, nonce: str, tokens: int) -> dict:
    async with C.client_session() as session:
        results = await asyncio.gather(*(
            C.stream_chat(session, url, W.decode_messages(a), agent=f"bench-{nonce}-d{a}" if kind == "greenroom" else None,
                          max_tokens=tokens)
            for a in range(n)))
    for r in results:
        if r.status != 200 or r.error:
            raise RuntimeError(f"{kind} decode phase: HTTP {r.status}: {r.error}")
    rates = [r.decode_rate for r in results]
    return {"agents": n, "agg_decode_tok_s": sum(x for x in rates if x), "per_stream_tok_s": rates,
            "completion_tokens": [r.completion_tokens for r in results],
            "early_stops": sum(1 for r in results if r.finish_reason != "length")}


async def stall_phase(url: str, kind: str, nonce: str, long_messages: list[dict], a_tokens: int) -> dict:
    """A decodes; B sends a long prompt; A's longest inter-token gap during B's prefill."""
    a = C.StreamResult(sent=0.0)
    b = C.StreamResult(sent=0.0)
    agent = (lambda s: f"bench-{nonce}-{s}") if kind == "greenroom" else (lambda s: None)
    async with C.client_session() as session:
        task_a = asyncio.create_task(C.stream_chat(session, url, W.decode_messages(0), agent=agent("stallA"),
                                                   max_tokens=a_tokens, res=a))
        while len(a.chunk_times) < 8:
            if task_a.done():
                break
            await asyncio.sleep(0.01)
        await C.stream_chat(session, url, long_messages, agent=agent("stallB"), max_tokens=2, res=b)
        # Let A stream a few more tokens after B's prefill, then stop it.
        mark = len(a.chunk_times)
        deadline = time.perf_counter() + 60
        while not task_a.done() and len(a.chunk_times) < mark + 3 and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        task_a.cancel()
        try:
            await task_a
        except (asyncio.CancelledError, Exception):
            pass
    if b.first is None or b.status != 200:
        raise RuntimeError(f"{kind} stall phase: B failed: {b.status} {b.error}")
    times = a.chunk_times
    before = [t2 - t1 for t1, t2 in zip(times, times[1:]) if t2 <= b.sent]
    during = [t2 - t1 for t1, t2 in zip(times, times[1:]) if t2 > b.sent and t1 < b.first]
    covered = bool(times) and times[-1] >= b.first
    return {
        "b_prompt_tokens": (b.usage or {}).get("prompt_tokens"),
        "b_prefill_s": b.first - b.sent,
        "a_gaps_during_b_prefill": during,
        "longest_gap_s": max(during) if during else None,
        "a_median_gap_before_s": C.median(before),
        "a_tokens_during_b_prefill": len(during),
        "a_kept_decoding_through_b_prefill": covered,
    }


# ---------------------------------------------------------------- driver


async def memory_phase(server, model: Path, n: int, nonce: str) -> dict:
    """n agents, one turn each, all with the shared system prompt: greenroom's resident KV
    at rest against one copy of the prefix plus each agent's own suffix (from /health)."""
    tag = f"{nonce}mem"
    rows: list[dict] = []
    async with C.client_session() as session:
        for a in range(n):  # one after another: every agent's turn ends before the next
            await run_agent(session, server.url, "greenroom", a, tag, 1, 16, rows, shared=True)
    health = _settled_health(server, n)
    tok = _tokenizer(model)
    per_token = _kv_bytes_per_token(model)
    prefix_tokens = len(tok.apply_chat_template(
        [{"role": "system", "content": W.shared_system_prompt(tag)}], add_generation_prompt=False))
    own_tokens = sum(r["prompt_tokens"] + r["completion_tokens"] - 1 - prefix_tokens for r in rows)
    ideal = (prefix_tokens + own_tokens) * per_token
    resident = health["pool"]["resident_bytes"]
    out = {"agents": n, "prefix_tokens": prefix_tokens, "own_tokens": own_tokens, "kv_bytes_per_token": per_token,
           "resident_bytes": resident, "ideal_bytes": ideal, "ratio": resident / ideal,
           "copies_if_unshared_bytes": sum(r["prompt_tokens"] + r["completion_tokens"] - 1 for r in rows) * per_token,
           "pool": health["pool"]}
    print(f"  memory: {n} agents sharing a {prefix_tokens}-token prefix: resident {resident / 2**20:.1f} MiB vs "
          f"one prefix + own suffixes {ideal / 2**20:.1f} MiB = {out['ratio']:.3f} (target <= 1.1); "
          f"unshared it would be {out['copies_if_unshared_bytes'] / 2**20:.1f} MiB", flush=True)
    return out


def _settled_health(server, agents: int, timeout: float = 60.0) -> dict:
    """/health once every agent's turn is filed: a reply goes out before its session
    swaps the turn's working cache for a branch (blocks + tail) and saves it, and
    until then that working copy counts in full."""
    deadline = time.monotonic() + timeout
    health = server.health()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = server.health()
        filed = again["pool"].get("disk_agent_files", agents) >= agents
        if filed and again["pool"]["resident_bytes"] == health["pool"]["resident_bytes"]:
            return again
        health = again
    return health


def _kv_bytes_per_token(model: Path) -> int:
    """K and V of every layer for one token, float32 (the CPU runs models in float32)."""
    config = json.loads((Path(model) / "config.json").read_text())
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * 4


def parse_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def plot(levels: list[int], data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"greenroom": "tab:green", "mlx_lm": "tab:blue"}
    labels = {"greenroom": "greenroom", "mlx_lm": "mlx_lm.server"}
    for kind, per in data.items():
        xs = [n for n in levels if n in per["workload"]]
        ax.plot(xs, [per["workload"][n]["agg_tok_s"] for n in xs], "o-", color=colors[kind],
                label=f"{labels[kind]}: coding-agent workload (generated tok/s)")
        xs = [n for n in levels if n in per["decode"]]
        ax.plot(xs, [per["decode"][n]["agg_decode_tok_s"] for n in xs], "s--", color=colors[kind], alpha=0.6,
                label=f"{labels[kind]}: decode phase (decode tok/s)")
    ax.set_xlabel("agents in parallel")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_xticks(levels)
    ax.set_title("SmolLM2-135M-Instruct float32, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="multi-agent workload: greenroom vs mlx_lm.server")
    ap.add_argument("--agents", type=parse_list, default=[1, 2, 4, 8], help="comma list (default 1,2,4,8)")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64, help="reply tokens per workload turn")
    ap.add_argument("--decode-tokens", type=int, default=96, help="reply tokens per stream in the decode phase")
    ap.add_argument("--decode-agents", type=parse_list, default=[1, 8],
                    help="agent counts of the decode phase (default 1,8: what the batching ratio needs)")
    ap.add_argument("--servers", default="greenroom,mlx_lm")
    ap.add_argument("--max-batch", type=int, default=8, help="greenroom --max-batch")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="greenroom --prefill-chunk")
    ap.add_argument("--stall-prompt", type=int, default=4000, help="prompt tokens of the stall phase's agent B")
    ap.add_argument("--bare-reps", type=int, default=2)
    ap.add_argument("--skip-stall", action="store_true")
    ap.add_argument("--skip-bare", action="store_true")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--mlx-lm-args", default=" ".join(MLX_LM_SETTINGS), help="mlx_lm.server flags")
    ap.add_argument("--greenroom-args", default="", help="extra `greenroom serve` flags, e.g. --no-persist")
    ap.add_argument("--name", default="agents", help="results file stem: bench/results/NAME.json and NAME.png")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--shared-prefix", action="store_true",
                    help="one identical system prompt for every agent (~1.6k tokens), each agent's project in "
                         "its first user turn; also measures resident KV of --memory-agents agents sharing it")
    ap.add_argument("--memory-agents", type=int, default=8, help="agents of the shared-prefix memory phase")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    C.add_env_flags(ap)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    model, out = C.setup_server_bench(args)
    kinds = [k for k in args.servers.split(",") if k]
    nonce = f"{int(time.time()) % 100000:05d}{random.randrange(100):02d}"
    out.update({"model": str(model), "nonce": nonce, "settings": vars(args) | {"model": str(model)}})
    extras = {"greenroom": ["--max-batch", str(args.max_batch), "--prefill-chunk", str(args.prefill_chunk),
                            *args.greenroom_args.split()],
              "mlx_lm": args.mlx_lm_args.split()}

    # 1. The bare model in its own process, before any server exists.
    bare, chunk = None, None
    if not args.skip_bare or not args.skip_stall:
        print("bare model (separate process): batched decode and chunk prefill ...", flush=True)
        worker = C.Worker([__file__, "--worker", str(model)])
        try:
            if not args.skip_bare:
                worker.ask(op="bare_decode", batch=1, tokens=8, prefill_chunk=args.prefill_chunk)  # warm-up
                runs = {1: [], 8: []}
                for _ in range(args.bare_reps):
                    for b in (1, 8):
                        runs[b].append(worker.ask(op="bare_decode", batch=b, tokens=args.decode_tokens,
                                                  prefill_chunk=args.prefill_chunk))
                b1 = C.median(r["tok_s"] for r in runs[1])
                b8 = C.median(r["tok_s"] for r in runs[8])
                bare = {"batch1_tok_s": b1, "batch8_tok_s": b8, "speedup": b8 / b1, "runs": runs}
                print(f"  bare decode: batch 1 {b1:.2f} tok/s, batch 8 {b8:.2f} tok/s, speed-up {b8 / b1:.2f}x")
            if not args.skip_stall:
                chunk = worker.ask(op="chunk_prefill", prompt_tokens=args.stall_prompt, chunk=args.prefill_chunk,
                                   nonce=nonce)
                print(f"  prefill of one {args.prefill_chunk}-token chunk over a {chunk['prompt_tokens']}-token "
                      f"prompt: mean {chunk['mean_s']:.3f}s, max {chunk['max_s']:.3f}s")
        finally:
            worker.close()
    out["bare_decode"] = bare
    out["chunk_prefill"] = chunk

    # 2. Both servers, measured in turn.
    servers = {}
    data = {k: {"workload": {}, "decode": {}, "stall": None} for k in kinds}
    try:
        for k in kinds:
            print(f"starting {k} ...", flush=True)
            servers[k] = C.Server(k, model, extra=extras[k]).start()
        out["server_commands"] = {k: s.cmd for k, s in servers.items()}
        # Warm-up (first-call costs), not recorded.
        for k, s in servers.items():
            asyncio.run(workload(s.url, k, 1, f"{nonce}w", 1, 8))
        for i, n in enumerate(args.agents):
            order = kinds if i % 2 == 0 else kinds[::-1]
            for k in order:
                r = asyncio.run(workload(servers[k].url, k, n, f"{nonce}n{n}", args.turns, args.max_tokens,
                                         args.shared_prefix))
                data[k]["workload"][n] = r
                print(f"  {k:9s} {n} agents: workload {r['wall_s']:.1f}s, {r['agg_tok_s']:.2f} tok/s, TTFT first "
                      f"{r['ttft_first_median_s']:.2f}s later {C.fmt(r['ttft_later_median_s'])}s", flush=True)
            for k in order[::-1] if n in args.decode_agents else ():
                d = asyncio.run(decode_phase(servers[k].url, k, n, f"{nonce}n{n}", args.decode_tokens))
                data[k]["decode"][n] = d
                print(f"  {k:9s} {n} agents: decode {d['agg_decode_tok_s']:.2f} tok/s "
                      f"({d['early_stops']} early stops)", flush=True)
        if not args.skip_stall:
            tok = _tokenizer(model)
            long_messages = W.long_prompt_messages(tok, args.stall_prompt, nonce)
            for k in kinds:
                st = asyncio.run(stall_phase(servers[k].url, k, nonce, long_messages, 400))
                data[k]["stall"] = st
                print(f"  {k:9s} stall: longest gap {C.fmt(st['longest_gap_s'], 3)}s during a "
                      f"{st['b_prefill_s']:.2f}s prefill of {st['b_prompt_tokens']} tokens", flush=True)
        if "greenroom" in servers:
            out["greenroom_metrics"] = servers["greenroom"].metrics()
        if args.shared_prefix and "greenroom" in servers:
            # A server of its own: the workload's agents (whose system prompt shares
            # most of its blocks with this one) would blur what this phase holds.
            servers.pop("greenroom").stop()
            servers["greenroom-memory"] = C.Server("greenroom", model, extra=extras["greenroom"]).start()
            out["memory"] = asyncio.run(memory_phase(servers["greenroom-memory"], model, args.memory_agents, nonce))
    finally:
        for s in servers.values():
            s.stop()

    # 3. Report.
    out["servers"] = data
    summary = report(args, kinds, data, bare, chunk)
    out["summary"] = summary
    path = C.write_result(args.name, out)
    if not args.no_plot:
        png = C.RESULTS / f"{args.name}.png"
        plot(args.agents, data, png)
        print(f"plot: {png}")
    print(f"results: {path}")
    return 0


def _tokenizer(model: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(model)


def report(args, kinds, data, bare, chunk) -> dict:
    summary: dict = {}
    rows = []
    for n in args.agents:
        row = [n]
        for k in kinds:
            w = data[k]["workload"].get(n)
            d = data[k]["decode"].get(n)
            row += [w["wall_s"], w["ttft_first_median_s"], w["ttft_later_median_s"], w["agg_tok_s"],
                    d["agg_decode_tok_s"] if d else None]
        rows.append(row)
    heads = ["agents"]
    for k in kinds:
        short = "gr" if k == "greenroom" else "mlx"
        heads += [f"{short} wall s", f"{short} TTFT1 s", f"{short} TTFT2+ s", f"{short} gen tok/s",
                  f"{short} dec tok/s"]
    print("\nworkload: %d turns x %d tokens per agent; decode phase: %d tokens per stream" %
          (args.turns, args.max_tokens, args.decode_tokens))
    print(C.table(rows, heads))
    if len(kinds) == 2 and "greenroom" in kinds:
        print("\nratios greenroom / mlx_lm.server (wall: mlx/gr, so > 1 means greenroom is faster)")
        rrows = []
        for n in args.agents:
            g, m = data["greenroom"]["workload"][n], data["mlx_lm"]["workload"][n]
            gd, md = data["greenroom"]["decode"].get(n), data["mlx_lm"]["decode"].get(n)
            r = {"wall_speedup": m["wall_s"] / g["wall_s"], "gen_tok_s": g["agg_tok_s"] / m["agg_tok_s"],
                 "ttft_first": m["ttft_first_median_s"] / g["ttft_first_median_s"],
                 "ttft_later": (m["ttft_later_median_s"] / g["ttft_later_median_s"])
                 if g["ttft_later_median_s"] else None,
                 "decode_tok_s": gd["agg_decode_tok_s"] / md["agg_decode_tok_s"] if gd and md else None}
            summary[f"ratios_{n}_agents"] = r
            rrows.append([n, r["wall_speedup"], r["gen_tok_s"], r["ttft_first"], r["ttft_later"], r["decode_tok_s"]])
        print(C.table(rrows, ["agents", "wall speed-up", "gen tok/s", "TTFT1 (mlx/gr)", "TTFT2+ (mlx/gr)",
                              "decode tok/s"]))
    if bare and "greenroom" in kinds and 1 in data["greenroom"]["decode"] and 8 in data["greenroom"]["decode"]:
        g1 = data["greenroom"]["decode"][1]["agg_decode_tok_s"]
        g8 = data["greenroom"]["decode"][8]["agg_decode_tok_s"]
        gs = g8 / g1
        rel = gs / bare["speedup"]
        summary["batching"] = {"greenroom_1": g1, "greenroom_8": g8, "greenroom_speedup": gs,
                               "bare_1": bare["batch1_tok_s"], "bare_8": bare["batch8_tok_s"],
                               "bare_speedup": bare["speedup"], "relative": rel, "target": SPEEDUP_TARGET,
                               "met": rel >= SPEEDUP_TARGET}
        print(f"\nbatching: greenroom decode 8 agents / 1 agent = {g8:.2f} / {g1:.2f} = {gs:.2f}x; bare model "
              f"batch 8 / batch 1 = {bare['batch8_tok_s']:.2f} / {bare['batch1_tok_s']:.2f} = {bare['speedup']:.2f}x")
        print(f"  greenroom speed-up / bare speed-up = {rel:.3f}   (target >= {SPEEDUP_TARGET}: "
              f"{'MET' if rel >= SPEEDUP_TARGET else 'NOT MET'})")
    if chunk:
        for k in kinds:
            st = data[k]["stall"]
            if not st or st["longest_gap_s"] is None:
                continue
            entry = {"longest_gap_s": st["longest_gap_s"], "chunk_mean_s": chunk["mean_s"],
                     "chunk_max_s": chunk["max_s"], "gap_over_chunk_mean": st["longest_gap_s"] / chunk["mean_s"],
                     "gap_over_chunk_max": st["longest_gap_s"] / chunk["max_s"],
                     "b_prefill_s": st["b_prefill_s"], "a_median_gap_before_s": st["a_median_gap_before_s"],
                     "covered": st["a_kept_decoding_through_b_prefill"]}
            if k == "greenroom":
                entry["target"] = STALL_TARGET
                entry["met"] = entry["gap_over_chunk_mean"] <= STALL_TARGET
            summary[f"stall_{k}"] = entry
            print(f"\nstall ({k}): longest gap {st['longest_gap_s']:.3f}s while B prefilled {st['b_prompt_tokens']} "
                  f"tokens in {st['b_prefill_s']:.2f}s (A's median gap before: "
                  f"{C.fmt(st['a_median_gap_before_s'], 3)}s)")
            print(f"  one {args.prefill_chunk}-token chunk (separate process): mean {chunk['mean_s']:.3f}s, "
                  f"max {chunk['max_s']:.3f}s -> gap = {entry['gap_over_chunk_mean']:.2f} x mean chunk, "
                  f"{entry['gap_over_chunk_max']:.2f} x max chunk"
                  + (f"   (target <= {STALL_TARGET} x: {'MET' if entry['met'] else 'NOT MET'})"
                     if k == "greenroom" else "   (mlx_lm.server: --prefill-step-size "
                     f"{_flag(args.mlx_lm_args, '--prefill-step-size')}, for context)"))
            if not st["a_kept_decoding_through_b_prefill"]:
                print("  warning: A stopped before B's prefill ended; the gap covers only part of it")
    return summary


def _flag(argstr: str, name: str):
    parts = argstr.split()
    return parts[parts.index(name) + 1] if name in parts else "default"


if __name__ == "__main__":
    sys.exit(main())
