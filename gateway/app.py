"""The aiohttp application: lifecycle of the actor system, middleware, routes.

`build_app(config)` returns an app whose cleanup_ctx starts the actor system
(model actor first, then the scheduler; stopped in reverse order) and the
session pool, and on shutdown saves every session's cache before the model
goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from actors.cachestore import CacheStore
from actors.messages import AbortAll, GetModel
from actors.model import ModelActor, ModelSlot
from actors.pool import IO_THREADS, Persistence, SessionPool, close_io
from actors.scheduler import SchedulerActor
from actors.session import SessionActor
from actors.supervisor import Admission, Status, SupervisorActor
from gateway.control import ControlServer
from runtime.metrics import Registry
from runtime.supervision import ChildSpec, Restart, RestartIntensity
from runtime.system import ActorSystem

log = logging.getLogger("greenroom.gateway")

MAX_BODY_BYTES = 8 * 1024 * 1024


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    if os.uname().sysname == "Darwin":
        base = Path.home() / "Library" / "Caches"
    return Path(base) / "greenroom"


def default_budget_bytes() -> int:
    # A quarter of physical memory: the model, the OS and the agents' tools need the rest.
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return total // 4


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    host: str = "127.0.0.1"
    port: int = 8000
    cache_dir: Path = default_cache_dir()
    cache_budget_bytes: int = default_budget_bytes()
    max_batch: int = 8
    prefill_chunk: int = 256
    default_max_tokens: int = 2048
    api_key: str | None = None
    persist: bool = True
    control_socket: Path | None = None  # default: <cache_dir>/control.sock
    drain_timeout: float = 30.0  # graceful shutdown: how long running turns may finish

    @property
    def control_path(self) -> Path:
        return Path(self.control_socket or Path(self.cache_dir) / "control.sock")


@dataclass(slots=True)
class Server:
    """What the handlers need; one per app."""

    config: ServerConfig
    system: ActorSystem
    pool: SessionPool
    admission: Admission
    registry: Registry
    shutdown_requested: asyncio.Event
    started: float  # monotonic, for uptime
    started_wall: float  # epoch seconds, for `created` fields

    @property
    def loaded(self):
        """The model being served (changes with a swap)."""
        return self.pool.loaded

    @property
    def supervisor(self):
        return self.system.ref("supervisor")

    async def health(self) -> dict:
        status = await self.supervisor.ask(Status(), timeout=2)
        state = status["state"]
        return {
            "status": "ok" if state == "serving" else state,
            "model": status["model"],
            "model_tag": status["model_tag"],
            "uptime_s": status["uptime_s"],
            "running": status["running"],
            "waiting": status["waiting"],
            "pool": status["pool"],
        }


SERVER = web.AppKey("server", Server)


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _allowed_hosts(config: ServerConfig) -> set[str]:
    hosts = {"localhost", "127.0.0.1", "[::1]", "::1", config.host}
    return {h.lower() for h in hosts}


def make_middlewares(config: ServerConfig):
    allowed = _allowed_hosts(config)
    loopback_only = config.host in ("127.0.0.1", "localhost", "::1")

    @web.middleware
    async def guard(request: web.Request, handler):
        # DNS rebinding: a web page must not reach a loopback-bound server via its own name.
        host = (request.host or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if loopback_only and name not in allowed:
            return error_response(403, f"host {host!r} not allowed", "forbidden")
        if config.api_key and request.path.startswith("/v1/"):
            if request.headers.get("Authorization", "") != f"Bearer {config.api_key}":
                return error_response(401, "invalid or missing API key", "invalid_api_key")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body larger than {MAX_BODY_BYTES} bytes")

    return [guard]


def error_response(status: int, message: str, code: str = "invalid_request_error", param=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json_response(body, status=status)


async def health(request: web.Request) -> web.Response:
    data = await request.app[SERVER].health()
    # Draining and swapping still accept requests (they wait); degraded is over budget.
    return json_response(data, status=503 if data["status"] == "degraded" else 200)


async def metrics(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    pool = server.pool.stats()
    server.registry.gauge("greenroom_pool_resident_bytes", "Resident KV cache bytes").set(pool.resident_bytes)
    server.registry.gauge("greenroom_pool_budget_bytes", "KV cache budget").set(pool.budget_bytes)
    server.registry.gauge("greenroom_active_sessions", "Sessions in memory").set(pool.active)
    return web.Response(text=server.registry.render(), content_type="text/plain")


def build_app(config: ServerConfig) -> web.Application:
    from gateway import openai

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=make_middlewares(config))
    app.cleanup_ctx.append(lambda app: _lifecycle(app, config))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    openai.add_routes(app)
    return app


async def _lifecycle(app: web.Application, config: ServerConfig):
    registry = Registry()
    slot = ModelSlot(config.model)
    children = [
        ChildSpec(
            "model",
            lambda: ModelActor(slot, max_batch=config.max_batch, prefill_chunk=config.prefill_chunk),
            restart=Restart.PERMANENT,
        ),
        ChildSpec(
            "scheduler",
            lambda: SchedulerActor(system.ref("model"), max_batch=config.max_batch, registry=registry),
            restart=Restart.PERMANENT,
        ),
    ]
    system = ActorSystem(children, intensity=RestartIntensity(max_restarts=3, period=60))
    io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="greenroom-io")
    async with system:
        loaded = await system.ref("model").ask(GetModel(), timeout=10)
        persistence = None
        if config.persist:
            store = CacheStore(Path(config.cache_dir) / "kv")
            persistence = Persistence(store, system.ref("model"), loaded.tag, io)

        def make_session(agent_id: str, persistence):
            return SessionActor(
                agent_id,
                scheduler=system.ref("scheduler"),
                loaded=pool.loaded,
                persistence=persistence,
                default_max_tokens=config.default_max_tokens,
            )

        pool = SessionPool(
            system,
            scheduler=system.ref("scheduler"),
            loaded=loaded,
            persistence=persistence,
            budget_bytes=config.cache_budget_bytes,
            session_factory=make_session,
        )
        admission = Admission()
        shutdown = asyncio.Event()
        started = time.monotonic()
        await system.start_child(
            ChildSpec(
                "supervisor",
                lambda: SupervisorActor(
                    system=system,
                    slot=slot,
                    pool=pool,
                    admission=admission,
                    started=started,
                    request_shutdown=shutdown.set,
                    faults_enabled=os.environ.get("GREENROOM_ENABLE_FAULTS") == "1",
                ),
                restart=Restart.PERMANENT,
            )
        )
        control = ControlServer(config.control_path, system.ref("supervisor"))
        await control.start()
        app[SERVER] = Server(
            config, system, pool, admission, registry, shutdown, started, time.time()
        )
        try:
            yield
        finally:
            await control.close()
            # Turns still running after the HTTP drain end now, then every session
            # saves its cache while the model (which evaluates them) still runs.
            await asyncio.shield(_save_everything(system, admission, pool))
    close_io(io)  # waits for the writes; frees MLX's streams on the I/O threads


async def _save_everything(system: ActorSystem, admission: Admission, pool: SessionPool) -> None:
    admission.open.clear()
    if not await admission.wait_idle(0.1):
        with contextlib.suppress(Exception):
            await system.ref("scheduler").ask(AbortAll("the server is shutting down"), timeout=5)
        await admission.wait_idle(10)
    try:
        await asyncio.wait_for(pool.save_all(), timeout=120)
    except Exception as exc:
        log.error("saving caches at shutdown failed: %s: %s", type(exc).__name__, exc)
