"""What a supervisor is told about its children, and the handle it gives back.

Import these from runtime.supervision; they live here to keep that module short.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.actor import Actor


class Restart(enum.Enum):
    PERMANENT = "permanent"  # always restarted, even after a normal stop
    TRANSIENT = "transient"  # restarted only after an abnormal exit (an exception)
    TEMPORARY = "temporary"  # never restarted


class Strategy(enum.Enum):
    ONE_FOR_ONE = "one_for_one"  # only the child that exited is restarted


@dataclass(frozen=True, slots=True)
class ChildSpec:
    name: str
    factory: Callable[[], Actor]  # a fresh instance per (re)start: no state survives a crash
    restart: Restart = Restart.PERMANENT
    shutdown_timeout: float = 10.0  # then the child's run() is cancelled


@dataclass(slots=True)
class RestartIntensity:
    """Erlang's intensity/period: more than ``max_restarts`` restarts within ``period``
    seconds means restarting does not help, so the supervisor gives up."""

    max_restarts: int = 3
    period: float = 5.0
    _times: collections.deque[float] = field(
        default_factory=collections.deque, init=False, repr=False, compare=False
    )

    def record(self, now: float) -> bool:
        """Record a restart at ``now``; True if the limit is now exceeded."""
        self._times.append(now)
        while now - self._times[0] > self.period:
            self._times.popleft()
        return len(self._times) > self.max_restarts


class ActorRef:
    """A stable handle on a supervised child: it follows the child across restarts.

    Between a crash and the end of the restart (the new incarnation's on_start),
    tell/ask raise ActorStopped, as they do after the child is stopped for good.
    """

    __slots__ = ("name", "_actor")

    def __init__(self, name: str, actor: Actor) -> None:
        self.name = name
        self._actor = actor

    @property
    def actor(self) -> Actor:
        """The current incarnation."""
        return self._actor

    def tell(self, message: Any) -> None:
        self._actor.tell(message)

    async def ask(self, message: Any, *, timeout: float) -> Any:
        return await self._actor.ask(message, timeout=timeout)

    def _bind(self, actor: Actor) -> None:  # for the supervisor, on restart
        self._actor = actor

    def __repr__(self) -> str:
        return f"<ActorRef {self.name!r} -> {self._actor!r}>"
