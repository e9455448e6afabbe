"""Names and file primitives shared by the on-disk KV store (actors/blockstore.py,
actors/blockfile.py) and the gateway: which agent ids and model tags are valid,
the file name of an agent, temp-file names, atomic writes, and the checksum
primitives. The files themselves are described in actors/blockfile.py.

Ids. An agent id is 1-128 characters from ``A-Z a-z 0-9 . _ -``, not starting
with ``.``; a model tag is 1-64 characters from ``a-z 0-9 -``. Both are checked
before they touch a path (``InvalidAgentId`` otherwise), and neither can hold a
path separator.

File names. Agent ids are ASCII only, so Unicode normalisation cannot make two
ids one name; case can, on a case-insensitive file system (macOS by default):
``CAPS`` and ``caps`` would be the same file. So the name is the id in
lowercase, plus, if the id has uppercase letters, ``^`` and the positions of
those letters as a base-36 bit mask: ``caps`` -> ``caps``, ``CAPS`` -> ``caps^f``,
``MyAgent`` -> ``myagent^5``. The mapping is injective, every name is lowercase
(so distinct names stay distinct when the file system folds case), ``^`` is not
an id character, and the longest name (a 128-letter id, its mask, the suffixes
of a temp or ``.corrupt`` file) stays under 255 bytes. A name no id maps to
(``agent_for_stem`` is None), e.g. ``CAPS.safetensors`` under an older naming,
is never loaded: the store counts it as junk.

Writes. ``write_atomic`` writes a temp file ``.<stem>.<pid>-<random>.tmp.safetensors``
next to the target (0600, never through a symlink), fsyncs it (F_FULLFSYNC on
macOS), renames it over the target and fsyncs the directory: a reader finds the
old file or the new one, never a torn one, even after kill -9 or power loss. A
temp file whose writer is dead (or that is over an hour old: the pid may have
been reused) is stale, ``stale_temp_file``; the store removes those at open.
Directories are made 0700 (``make_dir``).

Checksums. A file carries a CRC-32 per array (``digest``) under a SHA-256 over
its header. Why CRC-32 per array rather than one SHA-256/blake2b over
everything: the checksum guards against truncation, torn writes and bit rot,
not against an attacker (the files are 0600 in a 0700 dir), and hashing
dominated load time. Measured on the 2-vCPU dev box for a 92 MB cache with the
page cache warm: ``mx.load`` + eval 9 ms; blake2b ~1.0 GB/s and SHA-256
~1.25 GB/s per core; zlib.crc32 ~2.3 GB/s per core. Per-array digests let a
small thread pool hash arrays in parallel (zlib releases the GIL:
``digests``). CRC-32 detects every single-bit flip and every burst up to 32
bits, and misses random damage with probability 2**-32 per array.

Threads. The hash pool's threads never call MLX: they only read memoryviews of
evaluated arrays. (Since MLX 0.31.2 default streams are thread-local, and
evaluating a *lazy* array on a thread other than the one that built its graph
fails with "There is no Stream(cpu, N) in current thread"; evaluated arrays
carry no graph and may be read from any thread.)
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

try:  # POSIX only; the server does not run on Windows.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "AGENT_ID_RE",
    "MODEL_TAG_RE",
    "SUFFIX",
    "CORRUPT_SUFFIX",
    "TEMP_RE",
    "TEMP_MAX_AGE_S",
    "InvalidAgentId",
    "PathEscape",
    "validate_agent_id",
    "validate_model_tag",
    "file_stem",
    "file_name",
    "agent_for_stem",
    "temp_path",
    "stale_temp_file",
    "pid_alive",
    "make_dir",
    "fsync",
    "fsync_dir",
    "write_atomic",
    "hash_pool",
    "digest",
    "digests",
]

AGENT_ID_RE = r"[A-Za-z0-9._-]{1,128}"
MODEL_TAG_RE = r"[a-z0-9-]{1,64}"
_AGENT_ID = re.compile(AGENT_ID_RE)
_MODEL_TAG = re.compile(MODEL_TAG_RE)

SUFFIX = ".safetensors"
CORRUPT_SUFFIX = ".corrupt"
_STEM = re.compile(r"(?P<lower>[a-z0-9._-]{1,128})(?:\^(?P<mask>[1-9a-z][0-9a-z]{0,24}))?")
_UPPER_MASK = re.compile(r"[A-Z]")
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
TEMP_RE = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)-[0-9a-f]+\.tmp\.safetensors$")
TEMP_MAX_AGE_S = 3600.0

_PARALLEL_HASH_MIN_BYTES = 4 << 20
_F_FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", None) if fcntl is not None else None


class InvalidAgentId(ValueError):
    """An agent id (or model tag) that cannot be used as a file name."""


class PathEscape(ValueError):
    """A cache path resolves outside the store root (symlink in the tree)."""


# --------------------------------------------------------------------------- ids and names


def validate_agent_id(agent_id: str) -> str:
    if not isinstance(agent_id, str):
        raise InvalidAgentId(f"agent id must be a string, got {type(agent_id).__name__}")
    if not _AGENT_ID.fullmatch(agent_id):
        raise InvalidAgentId(
            f"invalid agent id {agent_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -"
        )
    if agent_id.startswith("."):
        raise InvalidAgentId(f"invalid agent id {agent_id!r}: must not start with '.'")
    return agent_id


def validate_model_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _MODEL_TAG.fullmatch(tag):
        raise InvalidAgentId(f"invalid model tag {tag!r}: use 1-64 characters from a-z 0-9 -")
    return tag


def file_stem(agent_id: str) -> str:
    """The file name (without suffix) of an agent: see the module docstring."""
    validate_agent_id(agent_id)
    mask = sum(1 << m.start() for m in _UPPER_MASK.finditer(agent_id))
    if not mask:
        return agent_id
    digits = []
    while mask:
        mask, r = divmod(mask, 36)
        digits.append(_BASE36[r])
    return f"{agent_id.lower()}^{''.join(reversed(digits))}"


def file_name(agent_id: str) -> str:
    """The name of an agent's file inside its dir (no file system access)."""
    return file_stem(agent_id) + SUFFIX


def agent_for_stem(stem: str) -> str | None:
    """The agent id whose file stem this is, or None if no id maps to it."""
    m = _STEM.fullmatch(stem)
    if m is None:
        return None
    chars = list(m.group("lower"))
    mask = int(m.group("mask") or "0", 36)
    for i in range(len(chars)):
        if mask >> i & 1:
            if not chars[i].isalpha():
                return None
            chars[i] = chars[i].upper()
    agent = "".join(chars)
    if mask >> len(chars) or not _AGENT_ID.fullmatch(agent) or agent.startswith("."):
        return None
    return agent


# --------------------------------------------------------------------------- temp files


def temp_path(path: Path) -> Path:
    """A fresh temp file name for a write of `path` (``<stem>.safetensors``), in its dir."""
    stem = path.name.removesuffix(SUFFIX)
    return path.with_name(f".{stem}.{os.getpid()}-{secrets.token_hex(6)}.tmp{SUFFIX}")


def stale_temp_file(name: str, mtime: float, now: float | None = None) -> bool:
    """Whether `name` is a temp file a crashed write left: its writer is dead, or it is
    older than TEMP_MAX_AGE_S. Never one of this process's (its write may be under way)."""
    m = TEMP_RE.match(name)
    if m is None:
        return False
    pid = int(m.group("pid"))
    if pid == os.getpid():
        return False
    age = (time.time() if now is None else now) - mtime
    return not pid_alive(pid) or age > TEMP_MAX_AGE_S


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError included: it exists, owned by someone else
        return True
    return True


# --------------------------------------------------------------------------- directories and writes


def make_dir(d: Path) -> None:
    """mkdir -p, giving every directory this call creates mode 0700."""
    missing = []
    p = d
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            continue
        os.chmod(p, 0o700)  # mkdir's mode is filtered by the umask


def fsync(fd: int) -> None:
    # On macOS fsync() only reaches the drive's cache; F_FULLFSYNC flushes it.
    if _F_FULLFSYNC is not None:
        try:
            fcntl.fcntl(fd, _F_FULLFSYNC)
            return
        except OSError:
            pass  # not supported by this filesystem: fall back
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> int:
    """Replace `path` by what `write(file)` writes: temp file (0600, created new, not
    through a symlink), fsync, rename over `path`, fsync the dir. The size written.
    If anything fails, the temp file is removed and `path` is as it was."""
    tmp = temp_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # the open mode is filtered by the umask
            write(f)
            f.flush()
            fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return size


# --------------------------------------------------------------------------- checksums

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def hash_pool() -> ThreadPoolExecutor:
    """The process's checksum threads (created on first use; they never call MLX)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(8, os.cpu_count() or 1))
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="greenroom-cachehash")
        return _pool


def digest(buf) -> bytes:
    """CRC-32 of a buffer, 4 bytes big-endian."""
    # zlib.crc32 releases the GIL for buffers > 5 KiB, so pool threads run in parallel.
    return zlib.crc32(buf).to_bytes(4, "big")


def digests(bufs: Sequence) -> list[bytes]:
    """`digest` of each buffer, on the hash pool when there are enough bytes to gain."""
    if sum(memoryview(b).nbytes for b in bufs) >= _PARALLEL_HASH_MIN_BYTES:
        return list(hash_pool().map(digest, bufs))
    return [digest(b) for b in bufs]
