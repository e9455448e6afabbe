"""/openapi.json stays true: every route the app registers is documented, every
documented operation is a route, the document is valid OpenAPI 3.1, and the
request schemas accept and refuse what the gateways' pydantic models do."""

from __future__ import annotations

import jsonschema
import pytest
from aiohttp import web

from gateway.app import ServerConfig, build_app
from gateway.openapi import document

DOCUMENTED_METHODS = {"get", "head", "post", "put", "patch", "delete", "options"}


def app_routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every route build_app registers (the actor system is not started)."""
    app = build_app(ServerConfig())
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert path, f"a route without a plain path: {route!r}"
        if route.method != "*":
            routes.add((route.method, path))
    return routes


def documented_routes(doc: dict) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in DOCUMENTED_METHODS
    }


def test_every_route_is_documented_and_every_documented_path_is_a_route():
    routes, documented = app_routes(), documented_routes(document())
    assert routes - documented == set(), "routes missing from /openapi.json"
    assert documented - routes == set(), "documented operations the app does not serve"
    assert ("GET", "/openapi.json") in routes


def test_the_document_is_valid_openapi_3_1():
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation import OpenAPIV31SpecValidator

    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc, cls=OpenAPIV31SpecValidator)  # raises on any structural error


def test_every_reference_resolves():
    doc = document()
    schemas = doc["components"]["schemas"]
    refs = []

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                refs.append(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs
    prefix = "#/components/schemas/"
    assert all(r.startswith(prefix) and r[len(prefix):] in schemas for r in refs), sorted(
        r for r in refs if r[len(prefix):] not in schemas
    )


def _request_validator(doc: dict, path: str):
    """A JSON Schema validator of `path`'s request body, resolving the document's refs."""
    schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


CHAT_OK = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0.5}
MESSAGE_OK = {
    "model": "claude",
    "max_tokens": 5,
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "search_result", "x": 1}]},
    ],
}


@pytest.mark.parametrize(
    "path, body, valid",
    [
        ("/v1/chat/completions", CHAT_OK, True),
        ("/v1/chat/completions", {**CHAT_OK, "messages": []}, False),
        ("/v1/chat/completions", {**CHAT_OK, "temperature": 3}, False),
        ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "robot", "content": "x"}]}, False),
        ("/v1/completions", {"prompt": "def f(", "max_tokens": 3}, True),
        ("/v1/completions", {"max_tokens": 3}, False),
        ("/v1/messages", MESSAGE_OK, True),  # an unknown block type is valid (a clear 400 later)
        ("/v1/messages", {k: v for k, v in MESSAGE_OK.items() if k != "max_tokens"}, False),
        ("/v1/messages/count_tokens", {"model": "c", "messages": [{"role": "user", "content": "hi"}]}, True),
    ],
)
def test_request_schemas_agree_with_the_gateways_models(path, body, valid):
    from gateway.anthropic_models import REQUEST_MODELS
    from gateway.openai_models import CHAT_REQUEST_MODEL, COMPLETION_REQUEST_MODEL

    model = {
        "/v1/chat/completions": CHAT_REQUEST_MODEL,
        "/v1/completions": COMPLETION_REQUEST_MODEL,
        "/v1/messages": REQUEST_MODELS["MessagesRequest"],
        "/v1/messages/count_tokens": REQUEST_MODELS["CountTokensRequest"],
    }[path]
    schema_says = _request_validator(document(), path).is_valid(body)
    try:
        model.model_validate(body)
        model_says = True
    except ValueError:
        model_says = False
    assert (schema_says, model_says) == (valid, valid)


def test_errors_are_documented_in_each_apis_own_shape():
    doc = document()
    for path, item in doc["paths"].items():
        anthropic = path.startswith("/v1/messages")
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if not status.startswith(("4", "5")) or method == "head":
                    continue
                schema = response["content"]["application/json"]["schema"]
                if status == "503" and path == "/health":
                    continue
                expected = "Anthropic.ErrorResponse" if anthropic else "OpenAI.Error"
                assert schema == {"$ref": f"#/components/schemas/{expected}"}, (path, method, status)


async def test_the_route_serves_the_document():
    from gateway.openapi import add_routes

    app = web.Application()
    add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        import aiohttp

        port = site._server.sockets[0].getsockname()[1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/openapi.json") as resp:
                assert resp.status == 200 and resp.content_type == "application/json"
                assert await resp.json() == document()
    finally:
        await runner.cleanup()
