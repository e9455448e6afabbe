"""Every message between greenroom's actors, as frozen slotted dataclasses.

Reply channels (asyncio queues / futures) travel inside messages; the data
itself is immutable. A KV cache slice (a list of mlx-lm KVCache objects) is the
one mutable thing that moves: it belongs to exactly one owner at a time (the
session at rest, the scheduler's batch during a turn).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None  # None: up to the context limit / server default
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TurnStatus(enum.IntEnum):
    """Ordered like vLLM's request status: everything >= FINISHED_STOPPED is final."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4
    FINISHED_ERROR = 5

    @property
    def finished(self) -> bool:
        return self >= TurnStatus.FINISHED_STOPPED


# ---------------------------------------------------------------- gateway <-> session


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """Ask a session to run one chat turn.

    The session answers on `events` (TurnRejected, or TextDelta... then TurnDone).
    `inbox` is the session's channel for this turn: the scheduler's TokenOut and
    SequenceEnded arrive there, and the gateway puts CancelRequested there when
    the client goes away.
    """

    messages: tuple[dict, ...]
    params: SamplingParams
    events: asyncio.Queue = field(compare=False)
    inbox: asyncio.Queue = field(compare=False)


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """The client went away (or asked to stop): end the turn at the next step."""


@dataclass(frozen=True, slots=True)
class TurnRejected:
    """The turn never started: `status` is the HTTP status the gateway answers."""

    status: int
    message: str
    code: str = "invalid_request_error"


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class TurnDone:
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the session's KV cache
    prefilled_tokens: int  # prompt tokens that went through the model this turn
    model: str
    error: str | None = None


# ---------------------------------------------------------------- session <-> scheduler


@dataclass(frozen=True, slots=True)
class SubmitTurn:
    turn_id: int
    agent_id: str
    suffix: tuple[int, ...]  # tokens to prefill (never empty)
    cache: list[Any] | None = field(compare=False)  # the session's KV slice, len == len(cached)
    cached: tuple[int, ...]  # tokens the slice holds
    params: SamplingParams
    max_tokens: int
    sink: asyncio.Queue = field(compare=False)  # gets TokenOut ... then SequenceEnded


@dataclass(frozen=True, slots=True)
class CancelTurn:
    turn_id: int


@dataclass(frozen=True, slots=True)
class TokenOut:
    token: int


@dataclass(frozen=True, slots=True)
class SequenceEnded:
    status: TurnStatus
    cache: list[Any] | None = field(compare=False)  # ownership returns to the session
    tokens: tuple[int, ...]  # what `cache` holds
    error: str | None = None


# ---------------------------------------------------------------- scheduler <-> model


@dataclass(frozen=True, slots=True)
class SeqInsert:
    turn_id: int
    suffix: tuple[int, ...]
    cache: list[Any] | None = field(compare=False)
    cached: tuple[int, ...]
    params: SamplingParams
    max_tokens: int


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One tick: who leaves, who joins, then one batched step of the model."""

    inserts: tuple[SeqInsert, ...] = ()
    removes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SeqEnd:
    turn_id: int
    status: TurnStatus
    cache: list[Any] | None = field(compare=False)
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StepResult:
    tokens: tuple[tuple[int, int], ...]  # (turn_id, token) generated this step
    ended: tuple[SeqEnd, ...]  # finished or removed sequences, with their caches
    prefill_tokens: int
    decode_tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class ExecuteStep:
    plan: StepPlan


@dataclass(frozen=True, slots=True)
class GetModel:
    """Reply: the LoadedModel being served."""


@dataclass(frozen=True, slots=True)
class RunOnModelThread:
    """Run fn() on the model thread (MLX work that must not touch the loop)."""

    fn: Any = field(compare=False)


@dataclass(frozen=True, slots=True)
class LoadModel:
    """Load `source` next to the current model and switch to it; on any failure the
    current model keeps serving and the error goes back to the asker (rollback)."""

    source: str | None


@dataclass(frozen=True, slots=True)
class Crash:
    """Told to an actor to make it fail, so its supervisor restarts it (`ctl restart`)."""

    reason: str


@dataclass(frozen=True, slots=True)
class InjectFault:
    """Tests only (GREENROOM_ENABLE_FAULTS=1): the model's next step raises inside MLX work."""


@dataclass(frozen=True, slots=True)
class AbortAll:
    """End every waiting and running turn now (drain deadline, shutdown); caches go back."""

    reason: str
