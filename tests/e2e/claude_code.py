"""Claude Code itself (npm `@anthropic-ai/claude-code`), pinned, installed into a
git-ignored folder and run headless against a greenroom server.

    binary = install()                      # once; reused while the version matches
    claude = ClaudeCode(binary, tmp_path, server.url, ANTHROPIC_API_KEY="...")
    run = claude.run("-p", "hi", "--output-format", "json", timeout=120)
    run.json()["result"]

The package ships a native binary per platform (the npm postinstall copies it over
bin/claude.exe), so node is only needed by npm to install it, not to run it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "@anthropic-ai/claude-code"
# Pinned: the test asserts on what this version sends and prints. 2.1.332 is the
# version whose traffic ../shared/DESIGN.md describes ("What Claude Code sends").
VERSION = "2.1.332"
INSTALL_DIR = Path(__file__).resolve().parent / ".claude-code"
INSTALL_TIMEOUT_S = 600

# Keep a headless run local and quiet: no update checks, telemetry, error reports,
# or other calls home (the test machines may have no network at all), and no
# hidden retries that would mask a server error.
QUIET_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_MAX_RETRIES": "0",
}


class ClaudeCodeUnavailable(RuntimeError):
    """node/npm are missing or the pinned Claude Code could not be installed."""


@dataclass(frozen=True, repr=False)
class Run:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> dict:
        """The one JSON object `--output-format json` prints."""
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"Claude Code printed no JSON ({exc}):\n{self}") from None

    def events(self) -> list[dict]:
        """The JSON lines `--output-format stream-json --verbose` prints."""
        try:
            return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise AssertionError(f"Claude Code printed a line that is not JSON ({exc}):\n{self}") from None

    def __repr__(self) -> str:  # what a failed assertion shows
        return (
            f"$ claude {' '.join(self.args)}\n"
            f"exit {self.returncode} after {self.seconds:.1f}s\n"
            f"--- stdout\n{self.stdout[-6000:]}\n--- stderr\n{self.stderr[-3000:]}"
        )


# ---------------------------------------------------------------- install


def installed_version(binary: Path) -> str | None:
    """What `claude --version` says ("2.1.332 (Claude Code)" -> "2.1.332"), or None."""
    if not binary.exists():
        return None
    with tempfile.TemporaryDirectory() as home:
        try:
            done = subprocess.run(
                [str(binary), "--version"], capture_output=True, text=True, timeout=60,
                env={"PATH": os.environ.get("PATH", ""), "HOME": home, **QUIET_ENV},
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
    words = done.stdout.split()
    return words[0] if done.returncode == 0 and words else None


@contextlib.contextmanager
def _install_lock(folder: Path):
    """Two test runs in one checkout must not run npm into the same folder at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def install(folder: Path = INSTALL_DIR, version: str = VERSION) -> Path:
    """The `claude` binary of `version`, installed into `folder` by npm if it is not
    there yet. Raises ClaudeCodeUnavailable, saying why."""
    binary = folder / "node_modules" / ".bin" / "claude"
    with _install_lock(folder):
        if installed_version(binary) == version:
            return binary
        npm, node = shutil.which("npm"), shutil.which("node")
        if not npm or not node:
            raise ClaudeCodeUnavailable(
                f"Claude Code {version} is not installed in {folder} and cannot be: "
                f"{'npm' if node else 'node'} is not on PATH. These tests run Claude Code itself "
                f"against greenroom; install Node.js with npm (https://nodejs.org), then run the "
                f"tests again (they run `npm install --prefix {folder} {PACKAGE}@{version}`)."
            )
        cmd = [npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund",
               # The package asks for node >= 22 but runs a native binary; npm warns
               # on an older node unless engine-strict is set somewhere.
               "--engine-strict=false", f"{PACKAGE}@{version}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ClaudeCodeUnavailable(f"`{' '.join(cmd)}` took more than {INSTALL_TIMEOUT_S}s") from None
        found = installed_version(binary)
        if done.returncode != 0 or found != version:
            raise ClaudeCodeUnavailable(
                f"`{' '.join(cmd)}` exited {done.returncode}; `claude --version` says {found!r}, "
                f"expected {version!r}\n--- npm stdout\n{done.stdout[-3000:]}\n--- npm stderr\n{done.stderr[-3000:]}"
            )
    return binary


# ---------------------------------------------------------------- running it


class ClaudeCode:
    """Runs `claude` with its own HOME and config dir under `root`, from the project
    folder `root/project` (where `--continue` finds the last conversation), against
    the server at `base_url`. `env` adds variables (the key, CLAUDE_CODE_EXTRA_BODY...)."""

    def __init__(self, binary: Path, root: Path, base_url: str, *, max_output_tokens: int = 64, **env: str):
        self.binary = binary
        self.home = root / "home"
        self.project = root / "project"
        self.home.mkdir(parents=True, exist_ok=True)
        self.project.mkdir(parents=True, exist_ok=True)
        self.env = {
            # Only what Claude Code needs: a developer's own ANTHROPIC_* / CLAUDE_*
            # settings, proxies or ~/.claude must not reach the test.
            "PATH": os.environ.get("PATH", ""),
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "CLAUDE_CONFIG_DIR": str(self.home / ".claude"),
            "ANTHROPIC_BASE_URL": base_url,
            # The embedded model writes ~10 tokens/s on a busy CPU: a small cap
            # bounds every request (Claude Code asks for 32,000 by default).
            "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output_tokens),
            **QUIET_ENV,
            **env,
        }

    def run(self, *args: str, timeout: float, env: dict[str, str] | None = None) -> Run:
        """One headless run; a run past `timeout` is killed and fails the test."""
        started = time.monotonic()
        try:
            done = subprocess.run(
                [str(self.binary), *args], cwd=self.project, env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            run = Run(args, -1, _text(exc.stdout), _text(exc.stderr), time.monotonic() - started)
            raise AssertionError(f"Claude Code did not finish in {timeout:.0f}s (it hung):\n{run}") from None
        return Run(args, done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")
