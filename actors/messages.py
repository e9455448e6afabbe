"""Every message between greenroom's actors, as frozen slotted dataclasses.

The data is immutable. A turn itself (actors/turn.py) is an object that moves
from owner to owner (gateway, session, scheduler); the KV a turn starts from
is a reference to immutable arrays (pool blocks, a branch's tail), and a running
sequence's own KV cache lives in the engine until the turn ends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling settings of one turn. None means "not set by the request": the
    served model's own defaults (generation_config.json) apply, else OpenAI's."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    max_tokens: int | None = None  # None: up to the context limit / server default
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: each token's logprob and its top k alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---------------------------------------------------------------- the API-neutral chat request


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; `parameters` is a JSON Schema of an object."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}}, compare=False)


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """Constrained output: "json_object" (any JSON object) or "json_schema" (`schema`)."""

    kind: str
    schema: dict | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One turn as both APIs ask for it, after validation (gateway/openai.py and
    gateway/anthropic.py only translate shapes into this).

    `messages` are chat-template messages: {"role": system|user|assistant|tool,
    "content": str, optional "tool_calls": [{"id", "type": "function",
    "function": {"name", "arguments": dict}}], "tool_call_id", "name",
    "reasoning_content"}. `prompt` replaces the template (/v1/completions).
    """

    messages: tuple[dict, ...] = ()
    params: SamplingParams = SamplingParams()
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"  # auto | none | required | function (then tool_name)
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    output_format: OutputFormat | None = None
    thinking: bool | None = None  # None: the template's default
    thinking_budget: int | None = None  # tokens of reasoning before the answer is forced
    prompt: str | None = None


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


# ---------------------------------------------------------------- what a turn tells its client


@dataclass(frozen=True, slots=True)
class TurnRejected:
    """The turn never started: `status` is the HTTP status the gateway answers."""

    status: int
    message: str
    code: str = "invalid_request_error"
    # For code "context_length_exceeded": the prompt's tokens and the model's limit
    # (each API words this error its own way; Claude Code compacts on Anthropic's).
    prompt_tokens: int | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log probability and its `top` alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Text inside the model's thinking block (never part of the answer's content)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """One complete tool call, parsed; `arguments` is a JSON object as a string."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class TurnDone:
    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the session's KV cache
    prefilled_tokens: int  # prompt tokens that went through the model this turn
    model: str
    error: str | None = None
    stop_sequence: str | None = None  # the stop string that ended the turn, if one did


# ---------------------------------------------------------------- model -> scheduler -> turn


@dataclass(frozen=True, slots=True)
class TokenOut:
    token: int
    logprob: float | None = None  # when the turn asked for logprobs
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) alternatives, best first


# ---------------------------------------------------------------- scheduler <-> model


@dataclass(frozen=True, slots=True)
class SeqInsert:
    turn_id: int
    suffix: tuple[int, ...]
    cache: Any = field(compare=False)  # actors.kvblocks.KVPieces of `cached` (or KVCache list), or None
    cached: tuple[int, ...]
    params: SamplingParams
    max_tokens: int
    constraint: Any = field(default=None, compare=False)  # actors.constraint.Constraint


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One tick, all decided by the scheduler: who leaves, who joins, how many prompt
    tokens each prefilling sequence processes; then every sequence whose prompt is in
    its cache decodes one token."""

    inserts: tuple[SeqInsert, ...] = ()
    removes: tuple[int, ...] = ()
    prefill: tuple[tuple[int, int], ...] = ()  # (turn id, tokens) chunks, in this order
    paused: tuple[int, ...] = ()  # decoding turns that skip this step (their client reads slowly)
    # (turn id, start, end): copy these prefilled prompt tokens out as pool blocks
    # (actors/prefix_pool.py), so turns sharing the prefix can start from them.
    publish: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class SeqEnd:
    turn_id: int
    status: TurnStatus
    cache: list[Any] | None = field(compare=False)
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StepResult:
    tokens: tuple[tuple[int, TokenOut], ...]  # (turn_id, token) generated this step
    ended: tuple[SeqEnd, ...]  # finished or removed sequences, with their caches
    prefill_tokens: int
    decode_tokens: int
    seconds: float
    prefill_seconds: float = 0.0  # of `seconds`, the prefill chunks'
    published: tuple[tuple[int, int, Any], ...] = ()  # (turn id, start, block kv) per block


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
