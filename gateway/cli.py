"""`greenroom serve | ctl ...`"""

from __future__ import annotations

import argparse
import asyncio
import logging
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


def build_parser() -> argparse.ArgumentParser:
    from gateway.app import ServerConfig

    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="greenroom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API")
    serve.add_argument("--model", default=None, help="mlx-lm folder, repo id or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default=defaults.host)
    serve.add_argument("--port", type=int, default=defaults.port)
    serve.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    serve.add_argument("--cache-budget", type=parse_size, default=defaults.cache_budget_bytes, help="resident KV cache budget, e.g. 4G")
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch)
    serve.add_argument("--prefill-chunk", type=int, default=defaults.prefill_chunk)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/")
    serve.add_argument("--no-persist", action="store_true", help="keep KV caches in memory only")
    serve.add_argument("--log-level", default="INFO")
    return parser


async def serve(args) -> int:
    from aiohttp import web

    from gateway.app import SERVER, ServerConfig, build_app

    config = ServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        cache_dir=args.cache_dir.expanduser(),
        cache_budget_bytes=args.cache_budget,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
        api_key=args.api_key,
        persist=not args.no_persist,
    )
    started = time.perf_counter()
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()  # runs cleanup_ctx startup: loads the model
    server = app[SERVER]
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    print(
        f"greenroom serving {server.loaded.name} at http://{config.host}:{config.port}/v1 "
        f"(model loaded in {server.loaded.load_seconds:.2f}s, ready in {time.perf_counter() - started:.2f}s)",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    failed = asyncio.ensure_future(server.system.wait_failed())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({failed, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        failed.cancel()
    if failed.done() and not failed.cancelled():
        print(f"greenroom: giving up: {failed.result()}", file=sys.stderr, flush=True)
        code = 1
    else:
        print("greenroom: shutting down (saving caches)", flush=True)
        code = 0
    await runner.cleanup()  # stop accepting, then cleanup_ctx: save caches, stop actors
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        return runner(serve(args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
