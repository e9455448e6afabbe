"""GET /openapi.json: an OpenAPI 3.1 document of greenroom's HTTP API.

The request bodies come from the pydantic models the gateways validate with
(gateway/openai_models.py, gateway/anthropic_models.py), so the document cannot
drift from what a request is checked against. The rest is written here: the
replies the handlers build by hand (OpenAI's completion objects, /health,
/metrics, /v1/models, GET /), the error shapes and which statuses each route
answers. tests/unit/test_openapi.py keeps the paths equal to the app's routes
and validates the document.

Component names carry their API as a prefix ("OpenAI.ToolDef",
"Anthropic.ToolDef"): both APIs have a Message, a ToolDef and a ToolChoice.
"""

from __future__ import annotations

import copy
import functools
from importlib import metadata
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway import anthropic_models, openai_models

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
SSE = "text/event-stream"

# The agent-id rule of actors.cachestore.validate_agent_id, as a pattern.
AGENT_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


# ---------------------------------------------------------------- schemas


def _model_schemas(prefix: str, models: list[tuple[type[BaseModel], str]]) -> dict[str, Any]:
    """The JSON Schemas of `models` and everything they use, named `<prefix>.<Model>`."""
    _, doc = models_json_schema(models, ref_template=f"#/components/schemas/{prefix}.{{model}}")
    return {f"{prefix}.{name}": _unions_as_any_of(schema) for name, schema in doc.get("$defs", {}).items()}


def _unions_as_any_of(node: Any) -> Any:
    """pydantic writes a union picked by a callable discriminator (Anthropic's content
    blocks) as oneOf, but its catch-all member (OtherBlock: any `type`) matches every
    block too, so a valid block would match two members and fail oneOf. Without a
    `discriminator` mapping such a union is anyOf."""
    if isinstance(node, list):
        return [_unions_as_any_of(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _unions_as_any_of(value) for key, value in node.items()}
    if "oneOf" in node and "discriminator" not in node:
        node["anyOf"] = node.pop("oneOf")
    return node


def _openai_schemas() -> dict[str, Any]:
    return _model_schemas(
        "OpenAI",
        [(openai_models.CHAT_REQUEST_MODEL, "validation"), (openai_models.COMPLETION_REQUEST_MODEL, "validation")],
    )


def _anthropic_schemas() -> dict[str, Any]:
    models = [(m, "validation") for m in anthropic_models.REQUEST_MODELS.values()]
    models += [(m, "serialization") for m in anthropic_models.RESPONSE_MODELS.values()]
    return _model_schemas("Anthropic", models)


_NULLABLE_STRING = {"type": ["string", "null"]}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "prompt_tokens_details": {
            "type": "object",
            "properties": {"cached_tokens": {"type": "integer", "description": "prompt tokens from the agent's cache"}},
        },
        "prefilled_tokens": {"type": "integer", "description": "greenroom: prompt tokens that went through the model"},
    },
}


def _completion_object(kind: str, choice: dict) -> dict:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": _ref("OpenAI.Usage"),
            "system_fingerprint": {"type": "string"},
        },
    }


_HAND_WRITTEN: dict[str, Any] = {
    "OpenAI.Error": {
        "type": "object",
        "description": "Every error outside /v1/messages.",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": _NULLABLE_STRING,
                    "code": _NULLABLE_STRING,
                },
            }
        },
    },
    "OpenAI.Usage": _USAGE,
    "OpenAI.ChatCompletion": _completion_object(
        "chat.completion",
        {
            "type": "object",
            "required": ["index", "message", "finish_reason"],
            "properties": {
                "index": {"type": "integer"},
                "message": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"const": "assistant"},
                        "content": _NULLABLE_STRING,
                        "reasoning_content": {"type": "string"},
                        "tool_calls": {"type": "array", "items": {"type": "object"}},
                        "function_call": {"type": "object"},
                    },
                },
                "finish_reason": _NULLABLE_STRING,
                "logprobs": {"type": ["object", "null"]},
            },
        },
    ),
    "OpenAI.Completion": _completion_object(
        "text_completion",
        {
            "type": "object",
            "required": ["index", "text", "finish_reason"],
            "properties": {
                "index": {"type": "integer"},
                "text": {"type": "string"},
                "finish_reason": _NULLABLE_STRING,
                "logprobs": {"type": ["object", "null"]},
            },
        },
    ),
    "OpenAI.ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "created", "owned_by"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string"},
                    },
                },
            },
        },
    },
    "Health": {
        "type": "object",
        "description": "Without the API key (when --api-key is set) only `status`.",
        "required": ["status"],
        "properties": {
            "status": {
                "type": "string",
                "description": "ok, draining, swapping, degraded (over the memory budget: 503), restarting (503)",
            },
            "detail": {"type": "string"},
            "model": {"type": "string"},
            "model_tag": {"type": "string"},
            "uptime_s": {"type": "number"},
            "running": {"type": "integer"},
            "waiting": {"type": "integer"},
            "pool": {"type": "object"},
        },
    },
    "Root": {
        "type": "object",
        "required": ["status", "service"],
        "properties": {"status": {"type": "string"}, "service": {"const": "greenroom"}},
    },
}


def component_schemas() -> dict[str, Any]:
    return {**_openai_schemas(), **_anthropic_schemas(), **copy.deepcopy(_HAND_WRITTEN)}


# ---------------------------------------------------------------- responses


# Statuses any route may answer before its handler runs (gateway/app.py's guard).
_GUARD_ERRORS = {
    "400": "Bad request: the body or a parameter is invalid, or no Host header",
    "401": "Missing or wrong API key (with --api-key)",
    "403": "A Host that is not a loopback name, or an Origin not listed with --cors-origin",
}
_BODY_ERRORS = {
    "413": "The body is larger than 8 MiB",
    "415": "The body is not application/json",
}
_TURN_ERRORS = {
    "429": "The agent has too many queued turns",
    "500": "The generation failed (the model step raised); the server serves on",
    "503": "The server is draining or switching models (after --drain-timeout; see Retry-After), or busy",
}


def _error_responses(api: str, statuses: dict[str, str]) -> dict:
    schema = _ref("OpenAI.Error" if api == "openai" else "Anthropic.ErrorResponse")
    return {status: {"description": text, "content": {JSON: {"schema": schema}}} for status, text in statuses.items()}


def _ok(description: str, content: dict) -> dict:
    return {"200": {"description": description, "content": content}}


def _json(schema: dict) -> dict:
    return {JSON: {"schema": schema}}


_STREAM = {SSE: {"schema": {"type": "string", "description": "with `stream: true`: server-sent events"}}}

_AGENT_HEADER = {
    "name": "X-Agent-Id",
    "in": "header",
    "required": False,
    "description": "The agent whose session (and KV cache) runs the turn; without it, OpenAI's `user`"
    " (Anthropic: Claude Code's session id), else a one-off session.",
    "schema": {"type": "string", "pattern": AGENT_ID_PATTERN},
}


def _turn_operation(api: str, summary: str, request: str, reply: dict, extra_errors: dict | None = None) -> dict:
    errors = {**_GUARD_ERRORS, **_BODY_ERRORS, **_TURN_ERRORS, **(extra_errors or {})}
    return {
        "summary": summary,
        "parameters": [_AGENT_HEADER],
        "requestBody": {"required": True, "content": _json(_ref(request))},
        "responses": {**_ok("The reply (a JSON object, or an event stream with `stream: true`)", reply),
                      **_error_responses(api, errors)},
    }


def _get(summary: str, ok: dict, errors: dict, api: str = "openai") -> dict:
    return {"summary": summary, "responses": {**ok, **_error_responses(api, errors)}}


def _paths() -> dict:
    guard_no_key = {k: v for k, v in _GUARD_ERRORS.items() if k != "401"}
    health_503 = {
        "503": {
            "description": "An actor is restarting, or the KV pool is over its budget (degraded)",
            "content": _json(_ref("Health")),
        }
    }
    paths = {
        "/v1/chat/completions": {
            "post": _turn_operation(
                "openai", "OpenAI chat completion", "OpenAI.ChatCompletionRequest",
                {**_json(_ref("OpenAI.ChatCompletion")), **_STREAM},
            )
        },
        "/v1/completions": {
            "post": _turn_operation(
                "openai", "OpenAI text completion", "OpenAI.CompletionRequest",
                {**_json(_ref("OpenAI.Completion")), **_STREAM},
            )
        },
        "/v1/models": {"get": _get("The served model", _ok("The model list", _json(_ref("OpenAI.ModelList"))), _GUARD_ERRORS)},
        "/v1/messages": {
            "post": _turn_operation(
                "anthropic", "Anthropic Messages", "Anthropic.MessagesRequest",
                {**_json(_ref("Anthropic.MessageResponse")), **_STREAM},
                {"529": "Overloaded: the server is busy, draining or switching models, or it ended the turn"},
            )
        },
        "/v1/messages/count_tokens": {
            "post": {
                "summary": "Anthropic token count of a Messages request (no model run)",
                "requestBody": {"required": True, "content": _json(_ref("Anthropic.CountTokensRequest"))},
                "responses": {
                    **_ok("The prompt's token count", _json(_ref("Anthropic.CountTokensResponse"))),
                    **_error_responses("anthropic", {**_GUARD_ERRORS, **_BODY_ERRORS}),
                },
            }
        },
        "/health": {
            "get": {
                "summary": "Liveness and load; the only route open without the API key",
                "security": [{}],
                "responses": {**_ok("Serving", _json(_ref("Health"))), **health_503,
                              **_error_responses("openai", guard_no_key)},
            }
        },
        "/metrics": {"get": _get("Prometheus metrics", _ok("Metrics in the text exposition format", {"text/plain": {"schema": {"type": "string"}}}), _GUARD_ERRORS)},
        "/": {"get": _get("Liveness probe (Claude Code and the SDKs call it)", _ok("Up", _json(_ref("Root"))), _GUARD_ERRORS)},
        "/openapi.json": {"get": _get("This document", _ok("OpenAPI 3.1", _json({"type": "object"})), _GUARD_ERRORS)},
    }
    for item in paths.values():  # aiohttp answers HEAD for every GET route
        if "get" in item:
            item["head"] = _head_of(item["get"])
    return paths


def _head_of(get: dict) -> dict:
    """HEAD: the GET's statuses and headers, no body."""
    responses = {status: {"description": r["description"]} for status, r in get["responses"].items()}
    return {**{k: v for k, v in get.items() if k != "responses"}, "responses": responses}


# ---------------------------------------------------------------- the document


def _version() -> str:
    try:
        return metadata.version("greenroom")
    except metadata.PackageNotFoundError:
        return "0"


@functools.cache
def _document() -> dict:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "greenroom",
            "version": _version(),
            "description": "A local LLM server for several coding agents: the OpenAI API under /v1 (errors "
            'as {"error": {...}}) and the Anthropic Messages API under /v1/messages (errors as '
            '{"type": "error", "error": {...}}).',
        },
        "servers": [{"url": "/"}],
        "security": [{}, {"ApiKeyHeader": []}, {"Bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def document() -> dict:
    """The OpenAPI document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())


@functools.cache
def _document_bytes() -> bytes:
    return orjson.dumps(_document())


async def serve_openapi(request: web.Request) -> web.Response:
    return web.Response(body=_document_bytes(), content_type=JSON)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", serve_openapi)
