"""The aiohttp application: lifecycle of the actor system, middleware, routes.

`build_app(config)` returns an app whose cleanup_ctx starts the actor system
(model actor first, then the scheduler; stopped in reverse order) and the
session pool, and on shutdown saves every session's cache before the model
goes away.

Every request passes one guard first (see gateway.security for why): a Host that
is a loopback name (or the bound host), no Origin outside --cors-origin (403,
before the body is read), CORS preflights answered only for allowed origins, the
API key on every route but /health (and /metrics with --metrics-public), and JSON
bodies only (415). Errors come in the shape of the API the path belongs to:
`error_response` picks Anthropic's for /v1/messages*, OpenAI's otherwise.
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

from actors.diskbudget import default_disk_budget
from actors.messages import AbortAll, GetModel
from actors.model import ModelActor, ModelSlot
from actors.prefix_pool import PrefixPool
from actors.pool import IO_THREADS, Persistence, SessionPool, close_io
from actors.scheduler import SchedulerActor
from actors.session import SessionActor
from actors.supervisor import Admission, Status, SupervisorActor
from gateway import security
from gateway.control import ControlServer
from runtime.errors import ActorError
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
    drain_timeout: float = 30.0  # graceful shutdown, drain, swap: how long turns may finish or wait
    stall_timeout: float = 600.0  # a turn with no progress for this long is ended with an error
    shared_prefix: bool = True  # agents share cached prompt prefixes (--no-shared-prefix: each its own)
    max_branches: int = 4  # conversations cached per agent id
    cors_origins: tuple[str, ...] = ()  # normalized origins (security.parse_origin_arg); never "*"
    disk_budget_bytes: int | None = None  # cap on the KV cache files; None: default_disk_budget
    metrics_public: bool = False  # /metrics without the API key

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
            "pool": {**status["pool"], **self.disk()},
            "memory": mlx_memory(),
        }

    def disk(self) -> dict:
        """The loaded tag's cache files against the disk budget, from the store's
        in-memory index (no directory read); {} with --no-persist."""
        persistence = self.pool.persistence
        if persistence is None:
            return {}
        stats = persistence.stats()
        return {
            "disk_budget_bytes": stats["budget_bytes"],
            "disk_used_bytes": stats["used_bytes"],
            "disk_files": stats["files"],
            "disk_agent_files": stats["agent_files"],
            "disk_shared_blocks": stats["blocks"],
            "disk_junk_files": stats["junk_files"],
            "disk_evictions": stats["evictions"],
        }


def mlx_memory() -> dict:
    """MLX's allocator: arrays alive (weights, KV, a step's temporaries), freed buffers
    it keeps for reuse, and the peak. Counters only."""
    import mlx.core as mx  # here, not at the top: actors/ must load OpenBLAS before MLX

    return {
        "mlx_active_bytes": mx.get_active_memory(),
        "mlx_cache_bytes": mx.get_cache_memory(),
        "mlx_peak_bytes": mx.get_peak_memory(),
    }


SERVER = web.AppKey("server", Server)


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


AUTHENTICATED = web.RequestKey("authenticated", bool)

# Anthropic's error types by HTTP status; any other 4xx is invalid_request_error.
ANTHROPIC_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def speaks_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(
    status: int,
    message: str,
    code: str = "invalid_request_error",
    param=None,
    request: web.Request | None = None,
    headers: dict | None = None,
) -> web.Response:
    """An error in the shape of the API `request`'s path belongs to: Anthropic's
    {"type": "error", "error": {"type", "message"}} under /v1/messages, OpenAI's
    {"error": {"message", "type", "param", "code"}} otherwise (and without a request)."""
    if request is not None and speaks_anthropic(request.path):
        body = anthropic_error_body(status, message)
    else:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json_response(body, status=status, headers=headers)


def api_error(request: web.Request, status: int, message: str, code: str = "invalid_request_error", param=None):
    """`error_response` in the shape of `request`'s API."""
    return error_response(status, message, code, param, request=request)


def make_middlewares(config: ServerConfig):
    names = security.bind_names(config.host)
    # A server bound to all interfaces answers to names we cannot know: only the
    # Host's form is checked then.
    check_names = not security.is_wildcard_bind(config.host)
    origins = frozenset(config.cors_origins)

    def host_refusal(request: web.Request) -> web.Response | None:
        # DNS rebinding: a web page must not reach a loopback-bound server via its own name.
        header = request.headers.get("Host")
        if header is None:
            return api_error(request, 400, "a Host header is required", "host_required")
        name = security.host_name(header)
        if name is None or (check_names and name not in names):
            return api_error(request, 403, f"host {header!r} not allowed", "host_not_allowed")
        return None

    def origin_refusal(request: web.Request) -> web.Response | None:
        # A browser names the page's origin; only the ones listed with --cors-origin may
        # make it run anything (a "simple" text/plain POST needs no preflight).
        origin = request.headers.get("Origin")
        if origin is not None and security.normalize_origin(origin) not in origins:
            return api_error(
                request, 403, f"origin {origin!r} not allowed (see --cors-origin)", "origin_not_allowed"
            )
        return None

    def preflight(request: web.Request) -> web.Response:
        headers = {
            "Access-Control-Allow-Methods": security.CORS_METHODS,
            "Access-Control-Allow-Headers": security.allowed_request_headers(
                request.headers.get("Access-Control-Request-Headers", "")
            ),
            "Access-Control-Max-Age": security.CORS_MAX_AGE,
        }
        return web.Response(status=204, headers=headers)  # origin headers: on_response_prepare

    def key_refusal(request: web.Request) -> web.Response | None:
        presented = security.presented_keys(request.headers)
        request[AUTHENTICATED] = config.api_key is None or security.key_matches(presented, config.api_key)
        open_route = request.path == "/health" or (config.metrics_public and request.path == "/metrics")
        if request[AUTHENTICATED] or open_route:
            return None
        return error_response(
            401,
            "invalid or missing API key (send 'x-api-key: KEY' or 'Authorization: Bearer KEY')",
            "invalid_api_key",
            request=request,
            headers={"WWW-Authenticate": "Bearer"},
        )

    def body_refusal(request: web.Request) -> web.Response | None:
        if request.method in security.BODY_METHODS and not security.is_json(request.content_type):
            return api_error(
                request,
                415,
                f"the body must be application/json, not {request.headers.get('Content-Type', 'none')!r}",
                "unsupported_media_type",
            )
        return None

    @web.middleware
    async def guard(request: web.Request, handler):
        for check in (host_refusal, origin_refusal):
            refusal = check(request)
            if refusal is not None:
                return refusal
        if request.method == "OPTIONS" and "Origin" in request.headers:
            return preflight(request)  # the origin is allowed: origin_refusal passed it
        for check in (key_refusal, body_refusal):
            refusal = check(request)
            if refusal is not None:
                return refusal
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return api_error(request, 413, f"request body larger than {MAX_BODY_BYTES} bytes", "request_too_large")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            code = exc.reason.lower().replace(" ", "_")
            return error_response(exc.status, f"{exc.reason}: {request.method} {request.path}", code, request=request, headers=allow)

    return [guard]


def make_cors_headers(config: ServerConfig):
    """on_response_prepare: an allowed origin may read the response (streams too,
    whose headers go out before any middleware sees them)."""
    origins = frozenset(config.cors_origins)

    async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        if not origins:
            return
        response.headers.add("Vary", "Origin")
        origin = security.normalize_origin(request.headers.get("Origin"))
        if origin in origins:
            response.headers["Access-Control-Allow-Origin"] = request.headers["Origin"]
            response.headers["Access-Control-Expose-Headers"] = security.CORS_EXPOSE

    return add_cors_headers


async def health(request: web.Request) -> web.Response:
    try:
        data = await request.app[SERVER].health()
    except (ActorError, TimeoutError) as exc:
        # An actor is restarting (or too busy to answer): unhealthy for now, in JSON.
        body = {"status": "restarting"}
        if request[AUTHENTICATED]:
            body["detail"] = f"{type(exc).__name__}: {exc}"
        return json_response(body, status=503, headers={"Retry-After": "1"})
    # Draining and swapping still accept requests (they wait); degraded is over budget.
    status = 503 if data["status"] == "degraded" else 200
    if not request[AUTHENTICATED]:  # --api-key set, none given: up or not, nothing more
        data = {"status": data["status"]}
    return json_response(data, status=status)


async def metrics(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    registry = server.registry
    pool = server.pool.stats()
    registry.gauge("greenroom_pool_resident_bytes", "Resident KV cache bytes").set(pool.resident_bytes)
    registry.gauge("greenroom_pool_budget_bytes", "KV cache budget").set(pool.budget_bytes)
    registry.gauge("greenroom_active_sessions", "Sessions in memory").set(pool.active)
    persistence = server.pool.persistence
    if persistence is not None:  # all from the store's in-memory index: no directory read
        stats = persistence.stats()
        registry.gauge("greenroom_disk_used_bytes", "Bytes of the loaded model's KV cache files").set(stats["used_bytes"])
        registry.gauge("greenroom_disk_files", "KV cache files of the loaded model, junk included").set(stats["files"])
        registry.gauge("greenroom_disk_shared_blocks", "KV blocks on disk, each written once").set(stats["blocks"])
        registry.gauge("greenroom_disk_junk_files", "Corrupt or stale cache files (removed first)").set(stats["junk_files"])
        if stats["budget_bytes"] is not None:
            registry.gauge("greenroom_disk_budget_bytes", "Cap on the KV cache files (--disk-budget)").set(stats["budget_bytes"])
        registry.counter("greenroom_disk_evictions_total", "Files removed to stay under the disk budget").value = stats["evictions"]
        registry.counter("greenroom_disk_evicted_bytes_total", "Bytes removed to stay under the disk budget").value = stats["evicted_bytes"]
        registry.counter("greenroom_disk_writes_refused_total", "Cache saves that could not fit the disk budget").value = stats["refused"]
    memory = mlx_memory()
    registry.gauge("greenroom_mlx_active_bytes", "Bytes of live MLX arrays (weights, KV, temporaries)").set(memory["mlx_active_bytes"])
    registry.gauge("greenroom_mlx_cache_bytes", "Freed MLX buffers kept for reuse").set(memory["mlx_cache_bytes"])
    registry.gauge("greenroom_mlx_peak_bytes", "Peak bytes of live MLX arrays").set(memory["mlx_peak_bytes"])
    prefixes = server.pool.prefixes
    if prefixes is not None:
        registry.gauge("greenroom_shared_prefix_bytes", "KV bytes of the prefix pool (each block once)").set(prefixes.nbytes)
        registry.gauge("greenroom_shared_prefix_blocks", "Blocks in the prefix pool").set(len(prefixes.blocks))
        registry.counter("greenroom_shared_prefix_block_hits_total", "Blocks a turn started from instead of prefilling").value = prefixes.hits
    return web.Response(text=registry.render(), content_type="text/plain")


def build_app(config: ServerConfig) -> web.Application:
    from gateway import anthropic, openai, openapi

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=make_middlewares(config))
    app.on_response_prepare.append(make_cors_headers(config))
    app.cleanup_ctx.append(lambda app: _lifecycle(app, config))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    openai.add_routes(app)
    anthropic.add_routes(app)  # POST /v1/messages, /v1/messages/count_tokens; GET|HEAD /
    openapi.add_routes(app)  # GET|HEAD /openapi.json
    return app


async def _lifecycle(app: web.Application, config: ServerConfig):
    registry = Registry()
    slot = ModelSlot(config.model)
    prefixes = PrefixPool("")  # one copy of every cached prefix; keyed by the model tag below
    children = [
        ChildSpec(
            "model",
            lambda: ModelActor(slot, max_batch=config.max_batch, prefill_chunk=config.prefill_chunk),
            restart=Restart.PERMANENT,
        ),
        ChildSpec(
            "scheduler",
            lambda: SchedulerActor(
                system.ref("model"),
                max_batch=config.max_batch,
                prefill_chunk=config.prefill_chunk,
                registry=registry,
                prefixes=prefixes,
            ),
            restart=Restart.PERMANENT,
        ),
    ]
    system = ActorSystem(children, intensity=RestartIntensity(max_restarts=3, period=60))
    io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="greenroom-io")
    # The KV copies an agent's next turn waits for (filing the last turn's cache into
    # blocks) get their own threads: a burst of saves (0.25-0.4 s each, fsync) would
    # otherwise hold both I/O threads.
    kv_copies = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="greenroom-kv")
    async with system:
        loaded = await system.ref("model").ask(GetModel(), timeout=10)
        prefixes.reset(loaded.tag)
        persistence = None
        if config.persist:
            persistence = await _open_persistence(config, loaded.tag, io)

        def make_session(agent_id: str, persistence):
            return SessionActor(
                agent_id,
                scheduler=system.ref("scheduler"),
                loaded=pool.loaded,
                prefixes=prefixes,
                # One scope shares prefixes between agents (greenroom serves one API key);
                # --no-shared-prefix gives every agent its own.
                scope="" if config.shared_prefix else agent_id,
                persistence=persistence,
                io=kv_copies,
                default_max_tokens=config.default_max_tokens,
                max_branches=config.max_branches,
                on_filed=pool.want_room,
            )

        pool = SessionPool(
            system,
            scheduler=system.ref("scheduler"),
            loaded=loaded,
            persistence=persistence,
            budget_bytes=config.cache_budget_bytes,
            session_factory=make_session,
            prefixes=prefixes,
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
    close_io(kv_copies)


async def _open_persistence(config: ServerConfig, tag: str, io) -> Persistence:
    """The block store opens off the loop: it sweeps temp files and indexes the tag dir."""
    budget = config.disk_budget_bytes
    if budget is None:
        budget = await asyncio.get_running_loop().run_in_executor(io, default_disk_budget, Path(config.cache_dir))
    return await Persistence.open(Path(config.cache_dir) / "kv", tag, io, budget)


async def _save_everything(system: ActorSystem, admission: Admission, pool: SessionPool) -> None:
    admission.open.clear()
    if not await admission.wait_idle(0.1):
        with contextlib.suppress(Exception):
            await system.ref("scheduler").ask(AbortAll("the server is shutting down"), timeout=5)
        await admission.wait_idle(10)
    try:
        async with asyncio.timeout(120):
            await pool.save_all()
    except Exception as exc:
        log.error("saving caches at shutdown failed: %s: %s", type(exc).__name__, exc)
