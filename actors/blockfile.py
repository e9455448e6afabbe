"""The two files of the block store (format 2): what they hold, how they are sealed
and how they are verified. No directories and no index: actors/blockstore.py writes,
indexes and removes them.

Both are plain safetensors files written by ``mx.save_safetensors`` (never pickled;
the only parsers are MLX's safetensors reader, and ``json`` for headers read here):

* agent: arrays ``tokens`` (int32, every branch's tokens concatenated) and
  ``b{i}.tail`` (``(layers, 2, kv_heads, T_tail, head_dim)``) per branch that has a
  tail; metadata ``agent_id`` and ``branches`` = JSON
  ``[{"n_tokens": n, "blocks": [key hex, ...]}, ...]``, most recently used first.
* segment: one array per block, ``(layers, 2, kv_heads, block_tokens, head_dim)``,
  named by its key in hex; metadata ``keys`` (JSON list of those names).
* both: ``format_version`` ("2"), ``kind`` ("agent" / "segment"), ``model_tag``,
  ``block_tokens``, ``crcs`` (JSON: array name -> CRC-32) and ``checksum`` =
  ``crc32:`` + SHA-256 over a canonical JSON of all the other metadata and every
  array's name, dtype and shape.

So the header (metadata, shapes, CRCs) verifies on its own: the store's index trusts
headers it reads at open without reading any data, and a load that reads only some
blocks of a segment still checks each block it reads against its own CRC. Why CRC-32
per array rather than a hash over all the data: see actors/cachestore.py (it guards
against torn writes and bit rot, not an attacker; the files are 0600 in 0700 dirs),
which also holds the checksum primitives, file names and atomic writes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import mlx.core as mx
import numpy as np

from actors.cachestore import digests

__all__ = [
    "FORMAT_VERSION",
    "BadFile",
    "SavedBranch",
    "SavedAgent",
    "BlockFormat",
    "read_header",
    "verify_crcs",
    "tensors_of",
    "estimated_size",
    "seal",
]

FORMAT_VERSION = 2
_CHECKSUM_ALGO = "crc32"
_CHECKSUM_DOMAIN = b"greenroom-kvblocks\x00"
_ST_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.int32: "I32"}
_KV_DTYPES = ("F32", "F16", "BF16")
_MAX_KEY_BYTES = 64
_MAX_HEADER_BYTES = 64 << 20
_HEADER_SLACK = 64  # padding a safetensors writer may add


class BadFile(Exception):
    """A file's content is rejected; the message is the reason."""


@dataclass(frozen=True, slots=True)
class SavedBranch:
    tokens: tuple[int, ...]
    block_keys: tuple[bytes, ...]  # the full blocks, in order: tokens[:block_tokens * len(block_keys)]
    tail: mx.array | None  # (layers, 2, kv_heads, len(tokens) - block_tokens * len(block_keys), head_dim)


@dataclass(frozen=True, slots=True)
class SavedAgent:
    agent_id: str
    branches: tuple[SavedBranch, ...]  # most recently used first


def array_crcs(arrays: Mapping[str, mx.array]) -> dict[str, str]:
    names = list(arrays)
    crcs = digests([buffer(arrays[n]) for n in names])
    return {n: d.hex() for n, d in zip(names, crcs)}


def buffer(a: mx.array) -> memoryview:
    m = memoryview(a)
    if not m.c_contiguous:  # pragma: no cover - contiguous() ran first
        raise ValueError("array is not row-contiguous")
    return m


def checksum(meta: Mapping[str, str], tensors: Mapping[str, tuple[str, list[int]]]) -> str:
    desc = {
        "meta": {k: v for k, v in meta.items() if k != "checksum"},
        "arrays": sorted([name, dtype, list(shape)] for name, (dtype, shape) in tensors.items()),
    }
    body = json.dumps(desc, sort_keys=True, separators=(",", ":")).encode()
    return f"{_CHECKSUM_ALGO}:{hashlib.sha256(_CHECKSUM_DOMAIN + body).hexdigest()}"


def seal(meta: dict[str, str], arrays: Mapping[str, mx.array]) -> dict[str, str]:
    """`meta` plus the CRC of every array and the checksum over it all."""
    meta = dict(meta, crcs=json.dumps(array_crcs(arrays), sort_keys=True))
    tensors = {n: (_ST_DTYPES[a.dtype], list(a.shape)) for n, a in arrays.items()}
    meta["checksum"] = checksum(meta, tensors)
    return meta


def tensors_of(arrays: Mapping[str, mx.array]) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for name, a in arrays.items():
        if a.dtype not in _ST_DTYPES:
            raise BadFile(f"{name}: unsupported dtype {a.dtype}")
        out[name] = (_ST_DTYPES[a.dtype], list(a.shape))
    return out


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """A safetensors file's metadata and tensors (dtype, shape), reading only its header."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise BadFile("too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise BadFile(f"header length {n} does not fit the file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise BadFile(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise BadFile("header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadFile("metadata is not a map of strings")
    tensors, end = {}, 0
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or not all(isinstance(d, int) and d >= 0 for d in [*shape, start, stop]):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise BadFile(f"bad header entry for {name!r}") from None
        tensors[name] = (dtype, list(shape))
        end = max(end, stop)
    if 8 + n + end > size:
        raise BadFile(f"truncated: {size} bytes, header says {8 + n + end}")
    return meta, tensors


def estimated_size(arrays: Mapping[str, mx.array], meta: Mapping[str, str]) -> int:
    """An upper bound of the size of the file `mx.save_safetensors` writes: the data,
    plus the JSON header written with spaces and the largest offsets."""
    total = sum(a.nbytes for a in arrays.values())
    header = len(json.dumps({"__metadata__": meta}))
    for name, a in arrays.items():
        entry = {name: {"data_offsets": [total, total], "dtype": "BF16", "shape": list(a.shape)}}
        header += len(json.dumps(entry))
    return 8 + header + total + _HEADER_SLACK


def contiguous(arrays: dict[str, mx.array]) -> dict[str, mx.array]:
    # Strided views (a slice of a longer cache) are compacted and evaluated on this thread.
    fix = {n: mx.contiguous(a) for n, a in arrays.items() if not memoryview(a).c_contiguous}
    if fix:
        mx.eval(list(fix.values()))
        arrays.update(fix)
    return arrays


def kv_signature(name: str, a: object, n_tokens: int | None) -> tuple:
    """(layers, kv_heads, head_dim, dtype) of a KV array; ValueError if it is not one."""
    if not isinstance(a, mx.array):
        raise TypeError(f"{name}: expected mx.array, got {type(a).__name__}")
    if a.ndim != 5 or a.shape[1] != 2 or (n_tokens is not None and a.shape[3] != n_tokens):
        want = f"(layers, 2, heads, {n_tokens if n_tokens is not None else 'T'}, dim)"
        raise ValueError(f"{name}: shape {tuple(a.shape)} is not {want}")
    if a.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        raise ValueError(f"{name}: unsupported dtype {a.dtype}")
    return a.shape[0], a.shape[2], a.shape[4], a.dtype


def check_tokens(tokens: Sequence[int]) -> tuple[int, ...]:
    toks = tuple(int(t) for t in tokens)
    if toks:
        arr = np.fromiter(toks, dtype=np.int64, count=len(toks))
        if int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.int32).max:
            raise ValueError("token ids must be in [0, 2**31)")
    return toks


def check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or not 1 <= len(key) <= _MAX_KEY_BYTES:
        raise ValueError(f"a block key must be 1-{_MAX_KEY_BYTES} bytes, got {key!r:.80}")
    return key


def key_from_hex(text: object) -> bytes:
    if not isinstance(text, str) or text != text.lower():
        raise BadFile(f"bad block key {text!r:.80}")
    try:
        return check_key(bytes.fromhex(text))
    except ValueError:
        raise BadFile(f"bad block key {text!r:.80}") from None


def verify_crcs(meta: Mapping[str, str], arrays: Mapping[str, mx.array]) -> None:
    try:
        crcs = json.loads(meta["crcs"])
    except (KeyError, ValueError):
        raise BadFile("bad crcs metadata") from None
    got = array_crcs(arrays)
    for name, crc in got.items():
        if not isinstance(crcs, dict) or crcs.get(name) != crc:
            raise BadFile(f"checksum mismatch in {name}")


class BlockFormat:
    """Builds and checks the files of one model tag and block size."""

    def __init__(self, model_tag: str, block_tokens: int):
        self.model_tag = model_tag
        self.block_tokens = block_tokens

    def agent_file(self, agent: SavedAgent) -> tuple[dict[str, mx.array], dict[str, str], tuple[bytes, ...]]:
        """The agent file's arrays and sealed metadata, and every key it references
        (once each, in branch order)."""
        if not isinstance(agent, SavedAgent):
            raise TypeError(f"expected SavedAgent, got {type(agent).__name__}")
        bt = self.block_tokens
        tokens: list[int] = []
        branches, tails, signature = [], {}, None
        for i, branch in enumerate(agent.branches):
            toks = check_tokens(branch.tokens)
            keys = tuple(check_key(k) for k in branch.block_keys)
            n_tail = len(toks) - bt * len(keys)
            if n_tail < 0:
                raise ValueError(f"branch {i}: {len(keys)} blocks need at least {bt * len(keys)} tokens, got {len(toks)}")
            if n_tail == 0 and branch.tail is not None:
                raise ValueError(f"branch {i}: a tail given for no tokens after the last full block")
            if n_tail > 0:
                if branch.tail is None:
                    raise ValueError(f"branch {i}: {n_tail} tokens after the last full block but no tail")
                sig = kv_signature(f"branch {i} tail", branch.tail, n_tail)
                if signature is not None and sig != signature:
                    raise ValueError(f"branch {i}: tail layers/heads/dim/dtype differ from another branch's")
                signature = sig
                tails[f"b{i}.tail"] = branch.tail
            tokens.extend(toks)
            branches.append({"n_tokens": len(toks), "blocks": [k.hex() for k in keys]})
        arrays = {"tokens": mx.array(np.asarray(tokens, dtype=np.int32).reshape(len(tokens)))}
        arrays.update(tails)
        arrays = contiguous(arrays)
        meta = {
            "format_version": str(FORMAT_VERSION),
            "kind": "agent",
            "model_tag": self.model_tag,
            "agent_id": agent.agent_id,
            "block_tokens": str(bt),
            "branches": json.dumps(branches, separators=(",", ":")),
        }
        keys = tuple(dict.fromkeys(k for b in agent.branches for k in b.block_keys))
        return arrays, seal(meta, arrays), keys

    def segment_file(self, keys: list[bytes], blocks: Mapping) -> tuple[dict[str, mx.array], dict[str, str]]:
        """A segment's arrays (one per block, named by its key in hex) and sealed metadata."""
        signature = None
        arrays = {}
        for key in keys:
            sig = kv_signature(f"block {key.hex()}", blocks[key], self.block_tokens)
            if signature is not None and sig != signature:
                raise ValueError(f"block {key.hex()}: shape/dtype differs from the other blocks")
            signature = sig
            arrays[key.hex()] = blocks[key]
        arrays = contiguous(arrays)
        meta = {
            "format_version": str(FORMAT_VERSION),
            "kind": "segment",
            "model_tag": self.model_tag,
            "block_tokens": str(self.block_tokens),
            "keys": json.dumps(list(arrays)),
        }
        return arrays, seal(meta, arrays)

    def read_agent(self, agent_id: str, path: Path) -> SavedAgent:
        """The agent file, every array evaluated and checked. BadFile or an MLX error if damaged."""
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
        except Exception as e:
            raise BadFile(f"unreadable safetensors: {e}") from None
        tensors = tensors_of(arrays)
        self.verify_header(meta, tensors, "agent", agent_id)
        layout = self.agent_layout(meta, tensors)
        mx.eval(list(arrays.values()))
        verify_crcs(meta, arrays)
        tokens = np.asarray(buffer(arrays["tokens"])).tolist()
        branches, at = [], 0
        for i, (n, keys) in enumerate(layout):
            branches.append(SavedBranch(tuple(tokens[at : at + n]), keys, arrays.get(f"b{i}.tail")))
            at += n
        return SavedAgent(agent_id, tuple(branches))

    def read_blocks(self, path: Path, keys: list[bytes]) -> dict[bytes, mx.array]:
        """These blocks of a segment, evaluated and each checked against its CRC (mx.load
        is lazy: only their bytes are read). BadFile or an MLX error if damaged."""
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
        except Exception as e:
            raise BadFile(f"unreadable safetensors: {e}") from None
        tensors = tensors_of(arrays)
        self.verify_header(meta, tensors, "segment")
        self.segment_layout(meta, tensors)
        chosen = {}
        for key in keys:
            if key.hex() not in arrays:
                raise BadFile(f"block {key.hex()} not in the segment")
            chosen[key.hex()] = arrays[key.hex()]
        mx.eval(list(chosen.values()))
        verify_crcs(meta, chosen)
        return {bytes.fromhex(name): a for name, a in chosen.items()}

    def verify_header(self, meta: Mapping[str, str], tensors, kind: str, agent_id: str | None = None) -> None:
        """BadFile unless the header is ours (version, kind, tag, agent, block size) and whole."""
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise BadFile(f"format_version {version!r}, expected {str(FORMAT_VERSION)!r}")
        if meta.get("kind") != kind:
            raise BadFile(f"kind {meta.get('kind')!r}, expected {kind!r}")
        if meta.get("model_tag") != self.model_tag:
            raise BadFile(f"model tag {meta.get('model_tag')!r} != {self.model_tag!r}")
        if agent_id is not None and meta.get("agent_id") != agent_id:
            raise BadFile(f"agent id {meta.get('agent_id')!r} != {agent_id!r}")
        if meta.get("block_tokens") != str(self.block_tokens):
            raise BadFile(f"block_tokens {meta.get('block_tokens')!r} != {self.block_tokens}")
        want = meta.get("checksum", "")
        if not want.startswith(f"{_CHECKSUM_ALGO}:"):
            raise BadFile(f"no {_CHECKSUM_ALGO} checksum")
        if not hmac.compare_digest(checksum(meta, tensors).encode(), want.encode()):
            raise BadFile("checksum mismatch")

    def agent_layout(self, meta, tensors) -> list[tuple[int, tuple[bytes, ...]]]:
        """Each branch's (n_tokens, block keys), checked against the arrays present."""
        try:
            branches = json.loads(meta["branches"])
            layout = [(int(b["n_tokens"]), tuple(key_from_hex(h) for h in b["blocks"])) for b in branches]
        except (KeyError, TypeError, ValueError) as e:
            raise BadFile(f"bad branches metadata: {e!r}") from None
        total = sum(n for n, _ in layout)
        if tensors.get("tokens") != ("I32", [total]):
            raise BadFile(f"tokens array {tensors.get('tokens')} != int32 ({total},)")
        expected = {"tokens"}
        for i, (n, keys) in enumerate(layout):
            n_tail = n - self.block_tokens * len(keys)
            if n_tail < 0:
                raise BadFile(f"branch {i}: {n} tokens for {len(keys)} blocks")
            if n_tail:
                dtype, shape = tensors.get(f"b{i}.tail", ("?", []))
                if dtype not in _KV_DTYPES or len(shape) != 5 or shape[1] != 2 or shape[3] != n_tail:
                    raise BadFile(f"branch {i}: tail {dtype} {shape} inconsistent with {n_tail} tokens")
                expected.add(f"b{i}.tail")
        if set(tensors) != expected:
            raise BadFile(f"arrays {sorted(tensors)} do not match the branches")
        return layout

    def segment_layout(self, meta, tensors) -> tuple[bytes, ...]:
        """The segment's keys, checked against its arrays."""
        try:
            names = json.loads(meta["keys"])
            keys = tuple(key_from_hex(h) for h in names)
        except (KeyError, TypeError, ValueError) as e:
            raise BadFile(f"bad keys metadata: {e!r}") from None
        if not keys or set(names) != set(tensors) or len(names) != len(tensors):
            raise BadFile("arrays do not match the keys")
        for name, (dtype, shape) in tensors.items():
            if dtype not in _KV_DTYPES or len(shape) != 5 or shape[1] != 2 or shape[3] != self.block_tokens:
                raise BadFile(f"block {name}: {dtype} {shape} is not a block of {self.block_tokens} tokens")
        return keys
