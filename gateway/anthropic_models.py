"""The Anthropic Messages API's shapes, as pydantic v2 models.

One declaration gives validation (a wrong shape is a 400 naming the field), the
JSON Schema a future /openapi.json serves, and documentation of what greenroom
reads. Every model allows extra fields: the API grows often (Claude Code sends
fields this file has never heard of) and an unknown field must never be a 400.
Fields greenroom accepts but does not act on are declared `Any` so they are
visibly known (cache_control, context_management, container, ...).

Request content blocks are a union keyed on `type`; a type this file does not
model lands in `OtherBlock`, so gateway/anthropic_translate.py can answer with a
400 that names it instead of pydantic's list of every union member.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

MAX_MESSAGES = 20_000
MAX_TOOLS = 1024
MAX_STOP_SEQUENCES = 16
MAX_STOP_LEN = 256
MAX_MAX_TOKENS = 1 << 20
MAX_NAME_LEN = 256


class Shape(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ---------------------------------------------------------------- content blocks


class TextBlock(Shape):
    type: Literal["text"]
    text: str
    cache_control: Any = None


class ImageBlock(Shape):
    type: Literal["image"]


class DocumentBlock(Shape):
    type: Literal["document"]


class ThinkingBlock(Shape):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Shape):
    type: Literal["redacted_thinking"]
    data: str | None = None


class ToolUseBlock(Shape):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=MAX_NAME_LEN)
    name: str = Field(min_length=1, max_length=MAX_NAME_LEN)
    input: dict[str, Any]
    cache_control: Any = None


class OtherBlock(Shape):
    """Any block type not modelled above (search_result, server tool blocks, ...)."""

    type: str


def _block_tag(known: frozenset[str]):
    def tag(value) -> str:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        return kind if kind in known else "other"

    return tag


_RESULT_TYPES = frozenset({"text", "image", "document"})
ToolResultPart = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ImageBlock, Tag("image")]
    | Annotated[DocumentBlock, Tag("document")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_tag(_RESULT_TYPES)),
]


class ToolResultBlock(Shape):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=MAX_NAME_LEN)
    content: str | list[ToolResultPart] | None = None
    is_error: bool = False
    cache_control: Any = None


_BLOCK_TYPES = frozenset(
    {"text", "image", "document", "thinking", "redacted_thinking", "tool_use", "tool_result"}
)
ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ImageBlock, Tag("image")]
    | Annotated[DocumentBlock, Tag("document")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_tag(_BLOCK_TYPES)),
]


# Every tag of the two block unions (pydantic puts the tag into an error's location).
BLOCK_TAGS = _BLOCK_TYPES | {"other"}


class Message(Shape):
    # "system" is not in Anthropic's published schema, but Claude Code sends it
    # between user turns; it is folded into a user turn (see anthropic_translate).
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


# ---------------------------------------------------------------- tools and options


class ToolDef(Shape):
    name: str = Field(min_length=1, max_length=MAX_NAME_LEN)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    # None / "custom": a function the client runs. Anthropic's own tool types
    # (bash_20250124, web_search_..., ...) have no schema and are refused by name.
    type: str | None = None
    cache_control: Any = None


class ToolChoice(Shape):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_LEN)
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _tool_needs_name(self):
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs a 'name'")
        return self


class ThinkingConfig(Shape):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(default=None, ge=1, le=MAX_MAX_TOKENS)

    @model_validator(mode="after")
    def _enabled_needs_budget(self):
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("thinking of type 'enabled' needs 'budget_tokens'")
        return self


class JsonSchemaFormat(Shape):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Shape):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonSchemaFormat | None = None


class Metadata(Shape):
    user_id: str | None = Field(default=None, max_length=4096)


# ---------------------------------------------------------------- requests


class CountTokensRequest(Shape):
    """POST /v1/messages/count_tokens: a message request without max_tokens/stream."""

    model: str = Field(min_length=1, max_length=MAX_NAME_LEN)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDef] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    # The structured-outputs beta's name for output_config.format.
    output_format: JsonSchemaFormat | None = None
    # Accepted from older clients; None lets the served model's defaults apply.
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1 << 16)
    stop_sequences: list[Annotated[str, Field(max_length=MAX_STOP_LEN)]] | None = Field(
        default=None, max_length=MAX_STOP_SEQUENCES
    )
    metadata: Metadata | None = None
    # Accepted and ignored: greenroom caches every agent's prefix on its own, and
    # has no containers, MCP connector or service tiers.
    cache_control: Any = None
    context_management: Any = None
    container: Any = None
    mcp_servers: Any = None
    service_tier: Any = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=1, le=MAX_MAX_TOKENS)
    stream: bool = False


# ---------------------------------------------------------------- responses


class Usage(Shape):
    # input_tokens is the whole prompt (what count_tokens answers); of it,
    # cache_read came from the agent's KV cache and cache_creation went through
    # the model this turn (and is now cached for the agent's next turn).
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class ResponseTextBlock(Shape):
    type: Literal["text"]
    text: str


class ResponseThinkingBlock(Shape):
    type: Literal["thinking"]
    thinking: str
    signature: str


class ResponseToolUseBlock(Shape):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class MessageResponse(Shape):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ResponseThinkingBlock | ResponseTextBlock | ResponseToolUseBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: Usage


class CountTokensResponse(Shape):
    input_tokens: int


class ErrorDetail(Shape):
    type: str
    message: str


class ErrorResponse(Shape):
    type: Literal["error"] = "error"
    error: ErrorDetail


# What a future /openapi.json lists for the Anthropic side.
REQUEST_MODELS = {"MessagesRequest": MessagesRequest, "CountTokensRequest": CountTokensRequest}
RESPONSE_MODELS = {
    "MessageResponse": MessageResponse,
    "CountTokensResponse": CountTokensResponse,
    "ErrorResponse": ErrorResponse,
}
