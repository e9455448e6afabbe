"""The control socket: newline-delimited JSON over a Unix domain socket (mode 0600).

Request:  {"cmd": "swap", "args": {"model": "/path", "drain_timeout": 30}}
Response: {"ok": true, "result": ...}  or  {"ok": false, "error": "..."}

Model loading and swapping happen only here, never over HTTP. A malformed line
gets an error response and the connection stays usable; nothing a client sends
can take the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import orjson

from actors.cachestore import InvalidAgentId, validate_agent_id
from actors.supervisor import (
    Agents,
    CommandError,
    Drain,
    Evict,
    Fault,
    RestartActor,
    Resume,
    Shutdown,
    Status,
    Swap,
)

log = logging.getLogger("greenroom.control")

MAX_LINE = 64 * 1024
MAX_DRAIN_TIMEOUT = 3600.0
ASK_TIMEOUT = 30.0
# A swap answers when done: drain (its own timeout) + saving + loading (the
# supervisor's load timeout, 600 s) + a first forward pass; past this the
# operator gets an error rather than a command that never returns.
SWAP_DEADLINE_S = 900.0


class BadCommand(Exception):
    pass


def _arg(args: dict, key: str, kind, default=None, required=False):
    if key not in args:
        if required:
            raise BadCommand(f"missing argument {key!r}")
        return default
    value = args[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadCommand(f"argument {key!r} must be {kind.__name__}")
    return value


def parse_command(request: Any):
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise BadCommand('a request is a JSON object like {"cmd": "status"}')
    args = request.get("args") or {}
    if not isinstance(args, dict):
        raise BadCommand("'args' must be an object")
    match request["cmd"]:
        case "status":
            return Status()
        case "agents":
            return Agents()
        case "swap":
            model = _arg(args, "model", str, required=True)
            timeout = _arg(args, "drain_timeout", float, 30.0)
            if not 0 <= timeout <= MAX_DRAIN_TIMEOUT:
                raise BadCommand(f"drain_timeout must be between 0 and {MAX_DRAIN_TIMEOUT}")
            # "default" names the embedded model.
            return Swap(None if model == "default" else model, timeout, _arg(args, "abort", bool, False))
        case "drain":
            return Drain()
        case "resume":
            return Resume()
        case "evict":
            try:
                return Evict(validate_agent_id(_arg(args, "agent", str, required=True)))
            except InvalidAgentId as exc:
                raise BadCommand(str(exc))
        case "restart":
            return RestartActor(_arg(args, "actor", str, required=True))
        case "fault":
            return Fault(_arg(args, "actor", str, "model"))
        case "shutdown":
            return Shutdown()
    raise BadCommand(f"unknown command {request['cmd']!r}")


class ControlServer:
    def __init__(self, path: Path, supervisor: Any):
        self.path = Path(path)
        self.supervisor = supervisor  # ActorRef
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise RuntimeError(f"{self.path} exists and is not a socket")
            if _socket_alive(self.path):
                raise RuntimeError(f"another greenroom is listening on {self.path}")
            self.path.unlink()
        # The umask makes the socket 0600 from birth: no window where others could connect.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _send(writer, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    break
                if not line:
                    break
                if line.strip():
                    await _send(writer, await self._answer(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict:
        try:
            command = parse_command(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        except BadCommand as exc:
            return {"ok": False, "error": str(exc)}
        try:
            result = await self.supervisor.ask(command, timeout=ASK_TIMEOUT)
            if isinstance(result, asyncio.Future):  # a swap: wait for it outside the actor
                async with asyncio.timeout(SWAP_DEADLINE_S + command.drain_timeout):
                    result = await asyncio.shield(result)
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %r failed", command)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        ok = not (isinstance(result, dict) and result.get("ok") is False)
        return {"ok": ok, "result": result} if ok else {"ok": False, "error": result.get("error"), "result": result}


async def _send(writer: asyncio.StreamWriter, response: dict) -> None:
    writer.write(orjson.dumps(response) + b"\n")
    await writer.drain()


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def request(path: Path, cmd: str, args: dict | None = None, timeout: float = 900.0) -> dict:
    """Blocking client: send one command, return the decoded response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(orjson.dumps({"cmd": cmd, "args": args or {}}) + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return orjson.loads(buf)
