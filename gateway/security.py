"""What the HTTP guard checks, as plain functions (the middleware is in gateway.app).

A browser on the same machine is the threat: any web page can send "simple"
requests (a POST with a text/plain body, no preflight) to 127.0.0.1, and a page
on a name that resolves to 127.0.0.1 (DNS rebinding) can even read the answers.
So: the Host must be a loopback name (or the bound host), a request that carries
an Origin must come from an allowed origin, API bodies must be JSON (a browser
cannot send application/json cross-site without a preflight, which only allowed
origins pass), and with an API key every route but /health needs it.
"""

from __future__ import annotations

import hmac
import re

from yarl import URL

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Request headers the OpenAI and Anthropic SDKs send; a preflight may ask for these.
CORS_HEADERS = frozenset(
    {"content-type", "authorization", "x-api-key", "anthropic-version", "anthropic-beta", "x-agent-id"}
)
CORS_HEADER_PREFIXES = ("x-stainless-",)
CORS_METHODS = "GET, POST, OPTIONS"
CORS_EXPOSE = "X-Agent-Id"
CORS_MAX_AGE = "600"

# A Host header is a name or an address, an optional port: nothing else (no
# userinfo, path, query, fragment or spaces), as RFC 9110 says.
_HOST_CHARS = re.compile(r"[A-Za-z0-9.\-:\[\]]{1,300}")


def host_name(header: str | None) -> str | None:
    """The lowercase host name of a Host header (IPv6 without brackets), or None
    when the header is missing or not a plain host[:port]."""
    if not header or not _HOST_CHARS.fullmatch(header):
        return None
    try:
        url = URL("http://" + header)
        url.port  # noqa: B018  (raises on a port that is not a number in range)
    except ValueError:
        return None
    if url.user is not None or url.password is not None or not url.host:
        return None
    return url.host.lower()


def bind_names(bind_host: str) -> frozenset[str]:
    """The host names a server bound to `bind_host` answers to."""
    return LOOPBACK_NAMES | {bind_host.strip("[]").lower()}


def is_wildcard_bind(bind_host: str) -> bool:
    """Bound to every interface: clients may use any name for it (LAN, mDNS)."""
    return bind_host.strip("[]") in ("", "0.0.0.0", "::")


def normalize_origin(origin: str | None) -> str | None:
    """scheme://host[:port] in lowercase without a default port, or None when the
    value is not an origin (e.g. "null", sent by sandboxed frames and file pages)."""
    if not origin:
        return None
    try:
        url = URL(origin.strip())
        if not url.absolute or not url.host or url.user is not None:
            return None
        if url.raw_path not in ("", "/") or url.raw_query_string or url.raw_fragment:
            return None
        return str(url.origin())
    except ValueError:
        return None


def parse_origin_arg(text: str) -> str:
    """--cors-origin: an exact origin such as http://localhost:3000; never '*'."""
    origin = normalize_origin(text)
    if origin is None:
        raise ValueError(f"not an origin: {text!r} (write it as scheme://host[:port], e.g. http://localhost:3000)")
    return origin


def allowed_request_headers(requested: str) -> str:
    """The subset of a preflight's Access-Control-Request-Headers that is allowed."""
    names = [h.strip().lower() for h in requested.split(",") if h.strip()]
    allowed = [h for h in names if h in CORS_HEADERS or h.startswith(CORS_HEADER_PREFIXES)]
    return ", ".join(dict.fromkeys(allowed))


def presented_keys(headers) -> list[str]:
    """The API keys a request carries: `x-api-key: KEY` and/or `Authorization: Bearer KEY`
    (a client may send both, e.g. Claude Code with two variables set)."""
    keys = []
    if headers.get("x-api-key"):
        keys.append(headers["x-api-key"])
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    return keys


def key_matches(presented: list[str], key: str) -> bool:
    """Whether any presented key is the key; each comparison takes constant time
    (the time taken says nothing about how much of the key was right)."""
    want = key.encode("utf-8")
    found = False
    for candidate in presented:
        found |= hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), want)
    return found


def is_json(content_type: str) -> bool:
    """aiohttp's parsed media type (parameters such as charset already stripped)."""
    return content_type.lower() == "application/json"
