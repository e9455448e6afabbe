"""On-disk store for per-agent KV caches.

Layout: ``<root>/<model_tag>/<file_stem(agent_id)>.safetensors`` (dirs 0700,
files 0600).

File names. Agent ids are ASCII only (letters, digits, ``. _ -``), so Unicode
normalisation cannot make two ids one name; case can, on a case-insensitive file
system (macOS by default): ``CAPS`` and ``caps`` would be the same file. So the
name is the id in lowercase, plus, if the id has uppercase letters, ``^`` and the
positions of those letters as a base-36 bit mask: ``caps`` -> ``caps``,
``CAPS`` -> ``caps^f``, ``MyAgent`` -> ``myagent^5``. The mapping is injective,
every name is lowercase (so distinct names stay distinct when the file system
folds case), ``^`` is not an id character, and the longest name (a 128-letter id,
its mask, the suffixes of a temp or ``.corrupt`` file) stays under 255 bytes.
Files of lowercase-only ids keep the names they had before this mapping; a file
saved under the old naming for an id with uppercase letters (``CAPS.safetensors``)
is never loaded again: it counts as junk for the disk budget and goes first.

Every file under a tag dir is kept in an in-memory index (``DiskIndex``: name,
size, last use, owning agent, junk or not), built when the store opens and
updated on every save, load, quarantine and removal, so usage and listings never
read the directory again. One server owns a cache dir (the control socket makes
sure), so the index is the directory.

A file is a plain safetensors file written by ``mx.save_safetensors``:

* arrays ``tokens`` (int32, shape ``(T,)``), ``l{i}.k`` and ``l{i}.v``
  (shape ``(1, n_kv_heads, T, head_dim)``, float32 / float16 / bfloat16);
* string metadata ``format_version``, ``model_tag``, ``agent_id``,
  ``n_layers``, ``n_tokens``, ``checksum``.

``checksum`` is ``"crc32:<hex>"``: SHA-256 over a canonical JSON descriptor
(version, tag, agent, counts, every array's name/dtype/shape) followed by one
CRC-32 per array (tokens first, then l0.k, l0.v, ...). Why CRC-32 per array
rather than one SHA-256/blake2b over everything: the checksum guards against
truncation, torn writes and bit rot, not against an attacker (the files are
0600 in a 0700 dir), and hashing dominated load time. Measured on the 2-vCPU
dev box for a 92 MB cache with the page cache warm: ``mx.load`` + eval 9 ms;
blake2b ~1.0 GB/s and SHA-256 ~1.25 GB/s per core; zlib.crc32 ~2.3 GB/s per
core. Per-array digests let a small thread pool hash arrays in parallel
(zlib/hashlib release the GIL), and the load overlaps reading group *g+1*
with hashing group *g*. CRC-32 detects every single-bit flip and every burst
up to 32 bits, and misses random damage with probability 2**-32 per array.

Nothing is ever pickled: the only parsers involved are MLX's safetensors
reader (JSON header + raw little-endian buffers) and ``json``.

Threads (checked on MLX 0.32, CPU build; the rule is the same on Metal):
since MLX 0.31.2 default streams are thread-local, and evaluating a *lazy*
array on a thread other than the one that built its graph fails with
"There is no Stream(cpu, N) in current thread". Arrays that are already
evaluated carry no graph and may be used from any thread. Hence:

* ``snapshot_from_cache`` slices, compacts and ``mx.eval``s on the calling
  thread (the server calls it on an I/O thread: the caches it is given are
  evaluated, which the engine guarantees when a turn ends), so a snapshot holds
  only evaluated arrays;
* ``save`` only reads evaluated buffers (plus, for hand-built snapshots with
  lazy/non-contiguous arrays, builds and evaluates copies on its own thread);
* ``load`` evaluates everything ``mx.load`` returns before returning, so the
  arrays are plain buffers the caller's thread can use.

The hash pool threads never call MLX; they only read memoryviews of
evaluated arrays.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import mlx.core as mx
import numpy as np

from actors.diskbudget import DiskBudget, DiskFile, DiskIndex

if TYPE_CHECKING:
    from mlx_lm.models.cache import KVCache

try:  # POSIX only; the server does not run on Windows.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_VERSION",
    "AGENT_ID_RE",
    "MODEL_TAG_RE",
    "InvalidAgentId",
    "validate_agent_id",
    "validate_model_tag",
    "CacheSnapshot",
    "snapshot_from_cache",
    "cache_from_snapshot",
    "CacheStore",
    "file_stem",
    "file_name",
    "agent_for_stem",
    "estimated_file_size",
]

log = logging.getLogger("greenroom.cachestore")

FORMAT_VERSION = 1
AGENT_ID_RE = r"[A-Za-z0-9._-]{1,128}"
MODEL_TAG_RE = r"[a-z0-9-]{1,64}"
_AGENT_ID = re.compile(AGENT_ID_RE)
_MODEL_TAG = re.compile(MODEL_TAG_RE)

SUFFIX = ".safetensors"
CORRUPT_SUFFIX = ".corrupt"
_STEM = re.compile(r"(?P<lower>[a-z0-9._-]{1,128})(?:\^(?P<mask>[1-9a-z][0-9a-z]{0,24}))?")
_UPPER_MASK = re.compile(r"[A-Z]")
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_TMP_RE = re.compile(r"^\.(?P<agent>.+)\.(?P<pid>\d+)-[0-9a-f]+\.tmp\.safetensors$")
_TMP_MAX_AGE_S = 3600.0

_CHECKSUM_ALGO = "crc32"
_CHECKSUM_DOMAIN = b"greenroom-kvcache\x00"
# Stable names for the descriptor that is hashed (independent of str(mx.dtype)).
_KV_DTYPES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
_PARALLEL_HASH_MIN_BYTES = 4 << 20
_LOAD_GROUP_BYTES = 12 << 20

_F_FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", None) if fcntl is not None else None


class InvalidAgentId(ValueError):
    """An agent id (or model tag) that cannot be used as a file name."""


class _PathEscape(ValueError):
    """A cache path resolves outside the store root (symlink in the tree)."""


class _BadFile(Exception):
    """Internal: file content rejected; the message is the reason."""


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


def file_stem(agent_id: str) -> str:
    """The file name (without suffix) of an agent's cache: see the module docstring."""
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
    """The name of an agent's cache file inside its tag dir (no file system access)."""
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


def estimated_file_size(snap: "CacheSnapshot") -> int:
    """An upper bound of the bytes ``save`` writes for ``snap``: the arrays plus the
    safetensors JSON header (under 128 bytes an array, plus the metadata)."""
    n_arrays = 1 + 2 * len(snap.layers)
    return snap.nbytes + 2048 + 128 * n_arrays


def validate_model_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _MODEL_TAG.fullmatch(tag):
        raise InvalidAgentId(f"invalid model tag {tag!r}: use 1-64 characters from a-z 0-9 -")
    return tag


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    """An evaluated, compact copy of one agent's KV cache.

    ``layers[i] == (keys, values)``, each ``(1, n_kv_heads, len(tokens), head_dim)``.
    """

    agent_id: str
    model_tag: str
    tokens: tuple[int, ...]
    layers: tuple[tuple[mx.array, mx.array], ...]

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (keys + values of every layer, plus int32 tokens)."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers) + 4 * len(self.tokens)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def snapshot_from_cache(
    agent_id: str, model_tag: str, tokens: Sequence[int], cache: list[KVCache]
) -> CacheSnapshot:
    """Copy the valid part (``[:offset]``) of each layer into a snapshot.

    Call on the thread that runs the model: the slices are made contiguous and
    evaluated here, so the snapshot can be handed to any other thread. The
    compact copies also stop the snapshot from pinning the (longer) cache buffers.
    """
    from mlx_lm.models.cache import KVCache  # lazy: importing mlx_lm costs ~0.6 s

    validate_agent_id(agent_id)
    validate_model_tag(model_tag)
    toks = _check_tokens(tokens)
    n = len(toks)
    if not cache:
        raise ValueError("cannot snapshot an empty layer list")
    layers = []
    for i, c in enumerate(cache):
        if not isinstance(c, KVCache):
            raise TypeError(f"layer {i}: only mlx_lm KVCache is supported, got {type(c).__name__}")
        if c.keys is None or c.values is None:
            raise ValueError(f"layer {i}: cache is empty")
        if c.offset != n:
            raise ValueError(f"layer {i}: cache offset {c.offset} != {n} tokens")
        k = mx.contiguous(c.keys[:, :, :n, :])
        v = mx.contiguous(c.values[:, :, :n, :])
        layers.append((k, v))
    mx.eval(layers)
    snap = CacheSnapshot(agent_id, model_tag, toks, tuple(layers))
    _check_layers(snap)
    return snap


def cache_from_snapshot(snap: CacheSnapshot) -> list[KVCache]:
    """Fresh mlx-lm ``KVCache`` objects holding the snapshot (no data copy).

    Each cache gets its *own* array objects (views of the snapshot's buffers):
    ``KVCache.update_and_fetch`` assigns into ``self.keys[...]`` in place, which
    mutates that Python array object, so sharing the snapshot's objects would
    make later prefill silently rewrite the snapshot. The buffers themselves
    are shared copy-on-write (MLX never donates a buffer that is still referenced).
    """
    from mlx_lm.models.cache import KVCache

    out = []
    n = len(snap.tokens)
    views = []
    for k, v in snap.layers:
        c = KVCache()
        c.keys = k[:, :, :n, :]
        c.values = v[:, :, :n, :]
        c.offset = n
        views.extend((c.keys, c.values))
        out.append(c)
    mx.eval(views)
    return out


def _check_tokens(tokens: Sequence[int]) -> tuple[int, ...]:
    toks = tuple(int(t) for t in tokens)
    if toks:
        arr = np.fromiter(toks, dtype=np.int64, count=len(toks))
        if int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.int32).max:
            raise ValueError("token ids must be in [0, 2**31)")
    return toks


def _check_layers(snap: CacheSnapshot) -> None:
    n = len(snap.tokens)
    if not snap.layers:
        raise ValueError("snapshot has no layers")
    for i, kv in enumerate(snap.layers):
        if len(kv) != 2:
            raise ValueError(f"layer {i}: expected (keys, values)")
        for name, a in zip("kv", kv):
            if not isinstance(a, mx.array):
                raise TypeError(f"layer {i} {name}: expected mx.array, got {type(a).__name__}")
            if a.ndim != 4 or a.shape[0] != 1 or a.shape[2] != n:
                raise ValueError(
                    f"layer {i} {name}: shape {tuple(a.shape)} is not (1, heads, {n}, dim)"
                )
            if a.dtype not in _KV_DTYPES:
                raise ValueError(f"layer {i} {name}: unsupported dtype {a.dtype}")
        if kv[0].shape[1] != kv[1].shape[1]:
            raise ValueError(f"layer {i}: keys and values have different head counts")


# --------------------------------------------------------------------------- hashing

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(8, os.cpu_count() or 1))
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="greenroom-cachehash")
        return _pool


def _digest(buf) -> bytes:
    # zlib.crc32 releases the GIL for buffers > 5 KiB, so pool threads run in parallel.
    return zlib.crc32(buf).to_bytes(4, "big")


def _descriptor(agent_id, model_tag, n_layers, n_tokens, entries) -> bytes:
    desc = {
        "format_version": FORMAT_VERSION,
        "model_tag": model_tag,
        "agent_id": agent_id,
        "n_layers": n_layers,
        "n_tokens": n_tokens,
        "algo": _CHECKSUM_ALGO,
        "arrays": [[name, dtype, list(shape)] for name, dtype, shape in entries],
    }
    return _CHECKSUM_DOMAIN + json.dumps(desc, sort_keys=True, separators=(",", ":")).encode()


def _combine(descriptor: bytes, digests: Sequence[bytes]) -> str:
    h = hashlib.sha256(descriptor)
    for d in digests:
        h.update(d)
    return f"{_CHECKSUM_ALGO}:{h.hexdigest()}"


def _array_names(n_layers: int) -> list[str]:
    names = ["tokens"]
    for i in range(n_layers):
        names += [f"l{i}.k", f"l{i}.v"]
    return names


def _buffer(a: mx.array) -> memoryview:
    """Read-only byte view of an evaluated, row-contiguous array (no copy)."""
    m = memoryview(a)
    if not m.c_contiguous:  # pragma: no cover - callers pass contiguous arrays
        raise ValueError("array is not row-contiguous")
    return m


# --------------------------------------------------------------------------- fs helpers


def _fsync(fd: int) -> None:
    # On macOS fsync() only reaches the drive's cache; F_FULLFSYNC flushes it.
    if _F_FULLFSYNC is not None:
        try:
            fcntl.fcntl(fd, _F_FULLFSYNC)
            return
        except OSError:
            pass  # not supported by this filesystem: fall back
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        _fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _classify(name: str, size: int, mtime: float) -> DiskFile:
    """What a file found in a tag dir is: an agent's cache, junk (a .corrupt file, a
    cache under the old naming of an id with uppercase letters), or neither (a
    live writer's temp file, a file greenroom did not write): never removed."""
    if name.endswith(CORRUPT_SUFFIX):
        return DiskFile(name, size, mtime, junk=True)
    if _TMP_RE.match(name) or not name.endswith(SUFFIX):
        return DiskFile(name, size, mtime)
    agent = agent_for_stem(name[: -len(SUFFIX)])
    if agent is None:
        return DiskFile(name, size, mtime, junk=True)
    return DiskFile(name, size, mtime, agent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


# --------------------------------------------------------------------------- store


class CacheStore:
    """Persists ``CacheSnapshot``s under ``root``.

    ``save``/``load``/``delete`` are synchronous (run them in an executor) and
    serialised per (model_tag, agent_id) within the process. Different agents
    proceed in parallel.
    """

    def __init__(self, root: Path, disk_budget_bytes: int | None = None):
        """Blocking: sweeps dead temp files and indexes every tag dir (run it off the
        event loop). `disk_budget_bytes` caps each tag dir (see actors.diskbudget);
        the store only keeps the cap, its user (Persistence) applies it."""
        self.root = Path(root).expanduser()
        self._make_dir(self.root)
        self._root_resolved = self.root.resolve()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.budget = DiskBudget(disk_budget_bytes) if disk_budget_bytes else None
        self._sweep_temp_files()
        self._indexes: dict[str, DiskIndex] = {}
        self._indexes_guard = threading.Lock()
        for tag in self._tag_names():
            self._indexes[tag] = DiskIndex(self._scan(self._root_resolved / tag))

    # ---- paths

    def path_for(self, agent_id: str, model_tag: str) -> Path:
        validate_agent_id(agent_id)
        validate_model_tag(model_tag)
        path = self._root_resolved / model_tag / file_name(agent_id)
        # Defense in depth: the ids cannot contain separators, but a symlinked
        # tag dir or file could still point elsewhere.
        resolved = path.resolve()
        if resolved.parent.parent != self._root_resolved or resolved.name != path.name:
            raise _PathEscape(f"cache path {path} resolves outside {self._root_resolved}")
        return path

    def _tag_dir(self, model_tag: str) -> Path:
        validate_model_tag(model_tag)
        d = self._root_resolved / model_tag
        if d.is_symlink():
            raise _PathEscape(f"cache dir {d} is a symlink")
        return d

    @staticmethod
    def _make_dir(d: Path) -> None:
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

    def _lock(self, agent_id: str, model_tag: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((model_tag, agent_id), threading.Lock())

    # ---- save

    def save(self, snap: CacheSnapshot) -> int:
        """Atomically write ``snap``; returns the file size in bytes."""
        path = self.path_for(snap.agent_id, snap.model_tag)
        _check_tokens(snap.tokens)
        _check_layers(snap)
        n_layers, n_tokens = len(snap.layers), len(snap.tokens)

        arrays: dict[str, mx.array] = {
            "tokens": mx.array(np.asarray(snap.tokens, dtype=np.int32).reshape(n_tokens))
        }
        for i, (k, v) in enumerate(snap.layers):
            arrays[f"l{i}.k"] = k
            arrays[f"l{i}.v"] = v
        # Hand-built snapshots may hold lazy or strided arrays: compact them here
        # (built and evaluated on this thread, so no cross-thread stream issue).
        fix = {n: a for n, a in arrays.items() if not memoryview(a).c_contiguous}
        if fix:
            fix = {n: mx.contiguous(a) for n, a in fix.items()}
            mx.eval(list(fix.values()))
            arrays.update(fix)

        names = _array_names(n_layers)
        entries = [
            (n, "int32" if n == "tokens" else _KV_DTYPES[arrays[n].dtype], arrays[n].shape)
            for n in names
        ]
        bufs = [_buffer(arrays[n]) for n in names]
        if sum(b.nbytes for b in bufs) >= _PARALLEL_HASH_MIN_BYTES:
            digests = list(_hash_pool().map(_digest, bufs))
        else:
            digests = [_digest(b) for b in bufs]
        checksum = _combine(
            _descriptor(snap.agent_id, snap.model_tag, n_layers, n_tokens, entries), digests
        )
        metadata = {
            "format_version": str(FORMAT_VERSION),
            "model_tag": snap.model_tag,
            "agent_id": snap.agent_id,
            "n_layers": str(n_layers),
            "n_tokens": str(n_tokens),
            "checksum": checksum,
        }

        with self._lock(snap.agent_id, snap.model_tag):
            self._make_dir(path.parent)
            tmp = path.parent / (
                f".{file_stem(snap.agent_id)}.{os.getpid()}-{secrets.token_hex(6)}.tmp{SUFFIX}"
            )
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(tmp, flags, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), 0o600)
                    mx.save_safetensors(f, arrays, metadata=metadata)
                    f.flush()
                    _fsync(f.fileno())
                    size = os.fstat(f.fileno()).st_size
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            _fsync_dir(path.parent)
            self.index(snap.model_tag).put(DiskFile(path.name, size, time.time(), snap.agent_id))
        return size

    # ---- load

    def load(self, agent_id: str, model_tag: str) -> CacheSnapshot | None:
        """The saved snapshot, or None if absent or unusable (logged, moved aside)."""
        try:
            path = self.path_for(agent_id, model_tag)
        except _PathEscape as e:
            log.warning("ignoring KV cache for %s/%s: %s", model_tag, agent_id, e)
            return None
        with self._lock(agent_id, model_tag):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            except OSError as e:
                log.warning("cannot read KV cache file %s: %s", path, e)
                return None
            try:
                if not stat.S_ISREG(st.st_mode):
                    raise _BadFile("not a regular file")
                snap = self._read(path, agent_id, model_tag)
                self.index(model_tag).put(DiskFile(path.name, st.st_size, time.time(), agent_id))
                return snap
            except _BadFile as e:
                reason = str(e)
            except Exception as e:  # mx.load / eval errors on damaged files
                reason = f"{type(e).__name__}: {e}"
            moved = self._move_aside(path)
            index = self.index(model_tag)
            index.pop(path.name)
            if stat.S_ISREG(st.st_mode):  # junk now: first to go when room is needed
                kept = moved or path
                index.put(DiskFile(kept.name, st.st_size, st.st_mtime, junk=True))
            log.warning(
                "discarding KV cache file %s: %s%s",
                path,
                reason,
                f" (moved to {moved.name})" if moved else "",
            )
            return None

    def _read(self, path: Path, agent_id: str, model_tag: str) -> CacheSnapshot:
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
        except Exception as e:
            raise _BadFile(f"unreadable safetensors: {e}") from None
        if not isinstance(arrays, dict) or not isinstance(meta, dict):
            raise _BadFile("not a safetensors file")

        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise _BadFile(f"format_version {version!r}, expected {FORMAT_VERSION!r}")
        if meta.get("model_tag") != model_tag:
            raise _BadFile(f"model tag {meta.get('model_tag')!r} != {model_tag!r}")
        if meta.get("agent_id") != agent_id:
            raise _BadFile(f"agent id {meta.get('agent_id')!r} != {agent_id!r}")
        try:
            n_layers = int(meta["n_layers"])
            n_tokens = int(meta["n_tokens"])
            algo, want = meta["checksum"].split(":", 1)
        except (KeyError, ValueError) as e:
            raise _BadFile(f"bad metadata: {e!r}") from None
        if algo != _CHECKSUM_ALGO:
            raise _BadFile(f"unknown checksum algorithm {algo!r}")
        if n_layers < 1 or n_tokens < 0:
            raise _BadFile(f"bad counts n_layers={n_layers} n_tokens={n_tokens}")
        names = _array_names(n_layers)
        if set(arrays) != set(names):
            raise _BadFile(f"array names do not match n_layers={n_layers}")

        tok = arrays["tokens"]
        if tok.dtype != mx.int32 or tuple(tok.shape) != (n_tokens,):
            raise _BadFile(f"tokens array {tok.dtype} {tuple(tok.shape)} != int32 ({n_tokens},)")
        entries = [("tokens", "int32", tok.shape)]
        for i in range(n_layers):
            k, v = arrays[f"l{i}.k"], arrays[f"l{i}.v"]
            for name, a in ((f"l{i}.k", k), (f"l{i}.v", v)):
                if a.dtype not in _KV_DTYPES:
                    raise _BadFile(f"{name}: unsupported dtype {a.dtype}")
                if a.ndim != 4 or a.shape[0] != 1 or a.shape[2] != n_tokens:
                    raise _BadFile(
                        f"{name}: shape {tuple(a.shape)} inconsistent with {n_tokens} tokens"
                    )
                entries.append((name, _KV_DTYPES[a.dtype], a.shape))
            if k.shape[1] != v.shape[1]:
                raise _BadFile(f"layer {i}: keys/values head counts differ")

        # mx.load is lazy. Evaluate it in groups of ~_LOAD_GROUP_BYTES (this
        # thread reads the file; one eval per array was 2x slower than a
        # grouped eval) while the pool hashes the groups already read.
        pool = _hash_pool()
        futures = []
        group: list[mx.array] = []
        group_bytes = 0
        for i, name in enumerate(names):
            group.append(arrays[name])
            group_bytes += arrays[name].nbytes
            if group_bytes >= _LOAD_GROUP_BYTES or i == len(names) - 1:
                mx.eval(group)
                futures += [pool.submit(_digest, _buffer(a)) for a in group]
                group, group_bytes = [], 0
        got = _combine(
            _descriptor(agent_id, model_tag, n_layers, n_tokens, entries),
            [f.result() for f in futures],
        )
        if not hmac.compare_digest(got.encode(), f"{algo}:{want}".encode()):
            raise _BadFile("checksum mismatch")

        tokens = tuple(np.asarray(_buffer(tok)).tolist())
        layers = tuple((arrays[f"l{i}.k"], arrays[f"l{i}.v"]) for i in range(n_layers))
        return CacheSnapshot(agent_id, model_tag, tokens, layers)

    def _move_aside(self, path: Path) -> Path | None:
        dest = path.with_name(path.name + CORRUPT_SUFFIX)
        try:
            os.replace(path, dest)
        except OSError:
            return None
        return dest

    # ---- housekeeping

    def delete(self, agent_id: str, model_tag: str) -> None:
        path = self.path_for(agent_id, model_tag)
        index = self.index(model_tag)
        with self._lock(agent_id, model_tag):
            for p in (path, path.with_name(path.name + CORRUPT_SUFFIX)):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
                index.pop(p.name)

    def remove(self, model_tag: str, files: Sequence[DiskFile]) -> int:
        """Remove these files of the tag dir (chosen by a DiskBudget) and forget them;
        the bytes freed. Blocking. A file already gone counts as removed."""
        d = self._tag_dir(model_tag)
        index = self.index(model_tag)
        freed = 0
        for file in files:
            if "/" in file.name or file.name in (".", ".."):
                raise ValueError(f"not a file name: {file.name!r}")
            lock = self._lock(file.owner, model_tag) if file.owner else contextlib.nullcontext()
            with lock:
                try:
                    os.unlink(d / file.name)
                    freed += file.size
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not remove %s: %s", d / file.name, exc)
                    continue
                index.pop(file.name)
        return freed

    def index(self, model_tag: str) -> DiskIndex:
        """The in-memory index of the tag dir (empty for a dir that did not exist
        when the store opened: only this store writes there)."""
        validate_model_tag(model_tag)
        with self._indexes_guard:
            index = self._indexes.get(model_tag)
            if index is None:
                index = self._indexes[model_tag] = DiskIndex()
            return index

    def list_agents(self, model_tag: str) -> list[str]:
        """Agents with a saved cache under this tag, from the index (no directory read)."""
        return self.index(model_tag).owners()

    def nbytes_on_disk(self, model_tag: str) -> int:
        """Size of every regular file in the tag dir (caches, .corrupt files, temp
        files), from the index (no directory read)."""
        return self.index(model_tag).used_bytes

    def _tag_names(self) -> list[str]:
        try:
            with os.scandir(self._root_resolved) as it:
                return [
                    e.name for e in it if _MODEL_TAG.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                ]
        except OSError:
            return []

    @staticmethod
    def _scan(d: Path) -> list[DiskFile]:
        """Every regular file of a tag dir as the index sees it. Blocking."""
        files = []
        try:
            entries = list(os.scandir(d))
        except OSError:
            return []
        for e in entries:
            try:
                if not e.is_file(follow_symlinks=False):
                    continue
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            files.append(_classify(e.name, st.st_size, st.st_mtime))
        return files

    def _sweep_temp_files(self) -> None:
        """Remove temp files left by a crashed save (writer dead, or older than an hour)."""
        now = time.time()
        try:
            tag_dirs = [e for e in os.scandir(self._root_resolved) if _MODEL_TAG.fullmatch(e.name)]
        except OSError:
            return
        for td in tag_dirs:
            if not td.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(td.path))
            except OSError:
                continue
            for e in entries:
                m = _TMP_RE.match(e.name)
                if not m:
                    continue
                pid = int(m.group("pid"))
                try:
                    age = now - e.stat(follow_symlinks=False).st_mtime
                    if pid != os.getpid() and (not _pid_alive(pid) or age > _TMP_MAX_AGE_S):
                        os.unlink(e.path)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        log.debug("could not remove %s: %s", e.path, exc)
