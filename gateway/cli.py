"""`greenroom serve | ctl ...`"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger("greenroom")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'4G', '512MiB', '1000000' -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4G or 512M)")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def parse_disk_budget(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError("the disk budget must be more than 0 (--no-persist keeps nothing on disk)")
    return size


def parse_origin(text: str) -> str:
    from gateway.security import parse_origin_arg

    try:
        return parse_origin_arg(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def human_size(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def build_parser() -> argparse.ArgumentParser:
    from gateway.app import ServerConfig

    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="greenroom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API")
    serve.add_argument("--model", default=None, help="mlx-lm folder, repo id or .gguf file ('default': the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default=defaults.host)
    serve.add_argument("--port", type=int, default=defaults.port)
    serve.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    serve.add_argument("--cache-budget", type=parse_size, default=defaults.cache_budget_bytes, help="resident KV cache budget, e.g. 4G")
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch)
    serve.add_argument("--prefill-chunk", type=int, default=defaults.prefill_chunk)
    serve.add_argument("--api-key", default=None, help="require the key on every route but /health ('x-api-key: KEY' or 'Authorization: Bearer KEY')")
    serve.add_argument("--metrics-public", action="store_true", help="with --api-key: serve /metrics without the key")
    serve.add_argument("--cors-origin", action="append", type=parse_origin, default=[], metavar="ORIGIN", help="a browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable; default none)")
    serve.add_argument("--disk-budget", type=parse_disk_budget, default=None, help="cap on the KV cache files on disk, e.g. 20G (default: 25%% of the cache dir's free space at startup, 256M..32G)")
    serve.add_argument("--no-persist", action="store_true", help="keep KV caches in memory only")
    serve.add_argument("--control-socket", type=Path, default=None, help="default: CACHE_DIR/control.sock")
    serve.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout,
                       help="seconds running turns may finish on shutdown, and new ones may wait during a drain or swap (then 503)")
    serve.add_argument("--branches", type=int, default=defaults.max_branches,
                       help="conversations cached per agent id (least recently used out first)")
    serve.add_argument("--no-shared-prefix", action="store_true",
                       help="never reuse one agent's cached prompt prefix for another")
    serve.add_argument("--stall-timeout", type=float, default=defaults.stall_timeout,
                       help="a turn with nothing prefilled or generated for this long ends with an error")
    serve.add_argument("--log-level", default="INFO")

    ctl = sub.add_parser("ctl", help="admin commands over the control socket")
    ctl.add_argument("--socket", type=Path, default=None, help="default: CACHE_DIR/control.sock")
    ctl.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    cmds = ctl.add_subparsers(dest="ctl_command", required=True)
    cmds.add_parser("status", help="model, state, pool usage, running and waiting turns")
    cmds.add_parser("agents", help="every session: state, cached tokens, bytes, last use")
    swap = cmds.add_parser("swap", help="switch the served model live ('default' = embedded)")
    swap.add_argument("model")
    swap.add_argument("--drain-timeout", type=float, default=30.0)
    swap.add_argument("--abort", action="store_true", help="end running turns now instead of draining")
    cmds.add_parser("drain", help="stop admitting new turns (they wait)")
    cmds.add_parser("resume", help="admit new turns again")
    evict = cmds.add_parser("evict", help="hibernate one agent's session to disk now")
    evict.add_argument("agent")
    restart = cmds.add_parser("restart", help="restart the model actor or the scheduler")
    restart.add_argument("actor", choices=["model", "scheduler"])
    fault = cmds.add_parser("fault", help=argparse.SUPPRESS)  # tests: GREENROOM_ENABLE_FAULTS=1
    fault.add_argument("actor", nargs="?", default="model")
    cmds.add_parser("shutdown", help="graceful shutdown, as SIGTERM")
    return parser


def ctl(args) -> int:
    import json

    from gateway.control import request

    path = (args.socket or args.cache_dir / "control.sock").expanduser()
    payload = {
        "swap": lambda: {"model": args.model, "drain_timeout": args.drain_timeout, "abort": args.abort},
        "evict": lambda: {"agent": args.agent},
        "restart": lambda: {"actor": args.actor},
        "fault": lambda: {"actor": args.actor},
    }.get(args.ctl_command, dict)()
    try:
        response = request(path, args.ctl_command, payload)
    except OSError as exc:
        print(f"greenroom ctl: cannot reach {path}: {exc}", file=sys.stderr)
        return 2
    if response.get("ok"):
        print(json.dumps(response.get("result"), indent=2))
        return 0
    print(f"greenroom ctl: {response.get('error')}", file=sys.stderr)
    return 1


async def serve(args) -> int:
    from aiohttp import web

    from gateway.app import SERVER, ServerConfig, build_app

    config = ServerConfig(
        model=None if args.model in (None, "default") else args.model,
        host=args.host,
        port=args.port,
        cache_dir=args.cache_dir.expanduser(),
        cache_budget_bytes=args.cache_budget,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
        api_key=args.api_key,
        persist=not args.no_persist,
        control_socket=args.control_socket,
        drain_timeout=args.drain_timeout,
        stall_timeout=args.stall_timeout,
        shared_prefix=not args.no_shared_prefix,
        max_branches=max(1, args.branches),
        cors_origins=tuple(dict.fromkeys(args.cors_origin)),
        disk_budget_bytes=args.disk_budget,
        metrics_public=args.metrics_public,
    )
    started = time.perf_counter()
    app = build_app(config)
    # shutdown_timeout: how long in-flight requests may finish after we stop listening.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=config.drain_timeout)
    await runner.setup()  # runs cleanup_ctx startup: loads the model
    server = app[SERVER]
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    print(
        f"greenroom serving {server.loaded.name} at http://{config.host}:{config.port}/v1 "
        f"(model loaded in {server.loaded.load_seconds:.2f}s, ready in {time.perf_counter() - started:.2f}s)",
        flush=True,
    )
    print(f"control socket: {config.control_path}", flush=True)
    persistence = server.pool.persistence
    if persistence is not None and persistence.stats()["budget_bytes"] is not None:
        stats = persistence.stats()
        how = "--disk-budget" if args.disk_budget else "25% of free space at startup; set it with --disk-budget"
        print(
            f"disk budget: {human_size(stats['budget_bytes'])} for KV cache files in "
            f"{persistence.store.dir} ({how}); {human_size(stats['used_bytes'])} used",
            flush=True,
        )
    stop = server.shutdown_requested
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    failure = await _first_of(server.system.wait_failed(), stop.wait())
    if isinstance(failure, BaseException):
        print(f"greenroom: giving up: {failure}", file=sys.stderr, flush=True)
        code = 1
    else:
        print("greenroom: shutting down (saving caches)", flush=True)
        code = 0
    await runner.cleanup()  # stop accepting, then cleanup_ctx: save caches, stop actors
    return code


async def _first_of(*coros):
    """The result of whichever finishes first; the others are cancelled."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(c) for c in coros]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    return next(iter(done)).result()


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """On glibc, cap malloc's per-thread arenas (what MALLOC_ARENA_MAX does) unless the
    user set that. The server's I/O and tokenizer threads each get an arena by
    default; their fragments kept RSS creeping up over thousands of requests
    (tests/stress/test_rss.py: ~65 MB more over 1,200 short requests with the default,
    half that capped, levelling off either way)."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


M_ARENA_MAX = -8  # glibc's malloc.h


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        limit_malloc_arenas()
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        return runner(serve(args))
    if args.command == "ctl":
        return ctl(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
