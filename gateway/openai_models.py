"""The OpenAI request shapes, declared once as pydantic v2 models.

One declaration gives the validation (a wrong type or an out-of-range value is
a 400 naming the field), the error text, and the JSON Schema that /openapi.json
serves (`CHAT_REQUEST_MODEL.model_json_schema()`).

The models only describe shapes and ranges. Rules that need more than one field
or the served model (a tool message must answer an earlier call, a logit_bias
id must be in the vocabulary, unsupported output-changing fields) live in
gateway/openai_request.py, which also translates a validated request into the
API-neutral actors.messages.ChatRequest.

Strict mode: "0.5" is not a number and "yes" is not a boolean, as in OpenAI's
own API. Unknown fields are kept (extra="allow") so that newer clients keep
working; openai_request.py logs each unknown name once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGES = 4096
MAX_TOOLS = 128
MAX_STOP = 4
MAX_STOP_LEN = 256
MAX_MAX_TOKENS = 1 << 20
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
# OpenAI's own rule is [a-zA-Z0-9_-]{1,64}; '.' and ':' are accepted too (MCP-style names).
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class Shape(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


# ---------------------------------------------------------------- messages


class ContentPart(Shape):
    """One part of a message's content. Only "text" parts reach the model;
    openai_request.py answers 400 naming any other type (image_url, input_audio, file)."""

    type: str
    text: str | None = None


Content = str | list[ContentPart] | None


class FunctionCall(Shape):
    """A call as the assistant made it; `arguments` is a JSON object as a string."""

    name: str
    arguments: str = ""


class ToolCall(Shape):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(Shape):
    role: Literal["system", "developer"]  # developer is the newer name of system
    content: Content = None
    name: str | None = None


class UserMessage(Shape):
    role: Literal["user"]
    content: Content = None
    name: str | None = None


class AssistantMessage(Shape):
    role: Literal["assistant"]
    content: Content = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # the deprecated single-call form
    reasoning_content: str | None = None
    name: str | None = None


class ToolMessage(Shape):
    role: Literal["tool"]
    content: Content = None
    tool_call_id: str
    name: str | None = None


class FunctionMessage(Shape):
    """The deprecated result of a `function_call`: answers the latest call of `name`."""

    role: Literal["function"]
    content: Content = None
    name: str


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


# ---------------------------------------------------------------- tools and formats


class FunctionDef(Shape):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of an object; None: no parameters
    strict: bool | None = None  # always honoured: constrained calls validate against the schema


class ToolDef(Shape):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Shape):
    name: str


class NamedToolChoice(Shape):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class TextFormat(Shape):
    type: Literal["text"]


class JsonObjectFormat(Shape):
    type: Literal["json_object"]


class JsonSchemaSpec(Shape):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None


class JsonSchemaFormat(Shape):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StreamOptions(Shape):
    include_usage: bool | None = None


# ---------------------------------------------------------------- the requests


class SamplingFields(Shape):
    """Sampling settings both endpoints accept. Unset stays None: the served
    model's generation_config.json applies then, not a default of ours."""

    model: str | None = None  # informational: the served model answers whatever the name
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_MAX_TOKENS)  # vLLM's extension; -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    max_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    n: int | None = Field(None, ge=1)  # only 1 is served; more is a 400 naming `n`
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # the agent id when no X-Agent-Id header is sent


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = Field(None, max_length=MAX_TOOLS)  # deprecated form of tools
    function_call: Literal["auto", "none"] | NamedFunction | None = None  # deprecated tool_choice
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    reasoning_effort: str | None = None  # a hint: "none"/"minimal" turn thinking off, others on
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension; enable_thinking is read
    # Hints and descriptions of the client: accepted, they change nothing here.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    # Output-changing features greenroom does not implement: set, they are a 400 naming them.
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None  # a "block" policy would change the output


class CompletionRequest(SamplingFields):
    """POST /v1/completions: a plain text prompt continued as is (editor autocompletion)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # legacy: the top-k count
    # Output-changing features greenroom does not implement: set, they are a 400 naming them.
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


# What /openapi.json describes (another issue serves it).
CHAT_REQUEST_MODEL = ChatCompletionRequest
COMPLETION_REQUEST_MODEL = CompletionRequest
