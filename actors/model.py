"""ModelActor: owns the loaded model and runs ALL MLX work on one dedicated thread.

MLX streams and the BatchGenerator's state are not shared across threads, and
the event loop must never block on compute, so every call that touches MLX goes
through `_on_thread`. The actor's mailbox serialises steps: the scheduler sends
one ExecuteStep at a time and waits for its StepResult.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import mlx.core as mx

from actors import loading
from actors.engine import BatchEngine
from actors.messages import AbortAll, Crash, ExecuteStep, GetModel, InjectFault, LoadModel, RunOnModelThread
from runtime.actor import Actor

log = logging.getLogger("greenroom.model")


class ModelSlot:
    """Which model the model actor loads when it (re)starts. The supervisor changes
    it after a successful swap, so a restart reloads the model being served."""

    def __init__(self, source: str | None):
        self.source = source


class ModelActor(Actor):
    def __init__(
        self,
        slot: ModelSlot,
        *,
        max_batch: int = 8,
        prefill_chunk: int = 256,
        name: str = "model",
    ):
        super().__init__(name, mailbox_size=64)
        self.slot = slot
        self._fault_next_step = False
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.loaded: loading.LoadedModel | None = None
        self._engine: BatchEngine | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="greenroom-model")

    async def on_start(self) -> None:
        self.loaded, self._engine = await self._on_thread(self._load, self.slot.source)
        self._log_loaded()

    def _load(self, source: str | None):
        loaded = loading.load(source)
        return loaded, BatchEngine(loaded, max_batch=self.max_batch, prefill_chunk=self.prefill_chunk)

    def _log_loaded(self) -> None:
        log.info(
            "loaded %s (tag %s, %s) in %.2fs",
            self.loaded.name,
            self.loaded.tag,
            self.loaded.dtype,
            self.loaded.load_seconds,
        )

    async def on_stop(self) -> None:
        # MLX's per-thread streams must be freed on their own thread before it ends:
        # left to process exit they abort it now and then (mlx#3126, "terminate called
        # without an active exception"). Queued behind a step in flight, so bounded.
        try:
            async with asyncio.timeout(5):
                await self._on_thread(mx.clear_streams)
        except Exception as exc:
            log.warning("could not free the model thread's MLX streams: %s: %s", type(exc).__name__, exc)
        # The thread is not reused after this.
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def handle(self, message: Any) -> Any:
        match message:
            case ExecuteStep(plan=plan):
                return await self._step(plan)
            case GetModel():
                return self.loaded
            case RunOnModelThread(fn=fn):
                return await self._on_thread(fn)
            case LoadModel(source=source):
                if len(self._engine):
                    raise RuntimeError("cannot switch models while sequences are running")
                # The old model stays referenced until the new one is fully loaded:
                # any failure leaves it serving.
                self.loaded, self._engine = await self._on_thread(self._load, source)
                self._log_loaded()
                return self.loaded
            case AbortAll():
                # A (re)started scheduler does not know the engine's sequences: drop them.
                return len(await self._on_thread(self._engine.abort_all))
            case InjectFault():
                self._fault_next_step = True
                return None
            case Crash(reason=reason):
                raise RuntimeError(f"crash requested: {reason}")
        raise TypeError(f"model actor cannot handle {type(message).__name__}")

    async def _step(self, plan):
        fault, self._fault_next_step = self._fault_next_step, False
        try:
            return await self._on_thread(self._engine.step, plan, fault=fault)
        except Exception as exc:
            # A failed step leaves the batch's caches in an unknown state, not the
            # weights: drop every sequence (the scheduler ends their turns with an
            # error, the sessions fall back to their saved caches) and keep serving.
            dropped = await self._on_thread(self._engine.reset)
            log.error("model step failed (%s: %s); dropped the batch of %d", type(exc).__name__, exc, dropped)
            raise

    async def _on_thread(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))

