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

from actors import loading
from actors.engine import BatchEngine
from actors.messages import ExecuteStep, GetModel, RunOnModelThread
from runtime.actor import Actor

log = logging.getLogger("greenroom.model")


class ModelActor(Actor):
    def __init__(
        self,
        source: str | None,
        *,
        max_batch: int = 8,
        prefill_chunk: int = 256,
        name: str = "model",
    ):
        super().__init__(name, mailbox_size=64)
        self.source = source
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.loaded: loading.LoadedModel | None = None
        self._engine: BatchEngine | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="greenroom-model")

    async def on_start(self) -> None:
        self.loaded = await self._on_thread(loading.load, self.source)
        self._engine = await self._on_thread(
            BatchEngine, self.loaded, max_batch=self.max_batch, prefill_chunk=self.prefill_chunk
        )
        log.info(
            "loaded %s (tag %s, %s) in %.2fs",
            self.loaded.name,
            self.loaded.tag,
            self.loaded.dtype,
            self.loaded.load_seconds,
        )

    async def on_stop(self) -> None:
        # A step in flight finishes on its own; the thread is not reused after this.
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def handle(self, message: Any) -> Any:
        match message:
            case ExecuteStep(plan=plan):
                return await self._on_thread(self._engine.step, plan)
            case GetModel():
                return self.loaded
            case RunOnModelThread(fn=fn):
                return await self._on_thread(fn)
        raise TypeError(f"model actor cannot handle {type(message).__name__}")

    async def _on_thread(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))
