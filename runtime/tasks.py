"""Waiting for a task during cleanup without abandoning it half way."""

from __future__ import annotations

import asyncio
from typing import Any


async def finish(task: asyncio.Future[Any], timeout: float | None) -> bool:
    """Wait for ``task`` to end; past ``timeout`` seconds, cancel it and wait for it to unwind.

    Cleanup must not be abandoned half way (the task, and whatever it holds, would
    outlive its owner), so a cancellation of the caller is held back until ``task``
    has ended, then re-raised. Never raises ``task``'s own exception: the caller
    inspects the task if it cares.

    Returns True if the task ended by itself, False if it had to be cancelled.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    forced = False
    held_back: asyncio.CancelledError | None = None
    while not task.done():
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            task.cancel()
            forced, deadline, remaining = True, None, None
        try:
            await asyncio.wait([task], timeout=remaining)
        except asyncio.CancelledError as exc:
            held_back = exc
    if held_back is not None:
        raise held_back
    return not forced
