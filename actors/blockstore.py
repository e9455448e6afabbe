"""On-disk KV caches, format 2: shared prefix blocks written once, per-agent branches.

Layout under ``<root>/<model_tag>/`` (dirs 0700, files 0600)::

    agents/<file_stem(agent_id)>.safetensors   one per agent: its branches
    blocks/<32 hex>.safetensors                 a segment: blocks written by one save

A block is ``block_tokens`` (64) tokens of KV for every layer, one array of shape
``(layers, 2, kv_heads, block_tokens, head_dim)``, named by its hash-chain key
(actors/prefix_pool.py). A key names a whole prefix, so a block is the same
bytes for every agent that holds it: a save writes only the blocks no segment
holds yet, as ONE new segment, named by a hash of its keys. An agent file
holds each branch's tokens, the keys of its full blocks and the private tail
(the KV after the last full block).

The files' contents, sealing and checks are in actors/blockfile.py: plain
safetensors (never pickled), model-tagged, a CRC-32 per array under a SHA-256
over the header, so a header verifies on its own.

Writes are atomic and ordered for kill -9 and power loss: each file goes to a
temp file, is fsynced (F_FULLFSYNC on macOS), renamed over its name, and its
directory fsynced; the segment is durable BEFORE the agent file that references
it is renamed, and segments an old agent file referenced are collected only
after the new one is durable. A reader therefore always finds a complete old or
new agent file and every block it references. A dead writer's temp files and
segments nobody references (a save killed between the two renames) are removed
at the next open.

The index. At open, every file's safetensors header (the JSON at its start, a
few KB) is read and verified: which agent references which keys, which
segment holds which key, every file's size and mtime. Nothing else ever lists
the directory: saves, loads, evictions and collections keep the index current
(one server owns a cache dir; the control socket makes sure). A file whose header
is not ours or not whole is moved aside at open (as a load would). Measured on
the 2-vCPU dev box (shared), page cache warm: open with 200 agent files (4
branches of 2,000 tokens, 124 block keys each) and 200 segments: 57-125 ms. At
SmolLM2-135M's shapes (float32, 2.9 MB a block): saving a 2,000-token agent
146-172 ms with no block stored (92 MB), 33-36 ms with 25 of its 31 blocks
stored (18 MB); load_blocks of 32 blocks (94 MB) 66-92 ms; load_agent of a
16-token tail 1.5 ms (tests/unit/test_blockstore.py ``-m bench``).

Threads. Every method blocks (file I/O, fsync, MLX loads): the server calls
them on its I/O threads, never on the event loop. Calls for different agents
run in parallel; calls for one agent are serialised. Two saves that need the
same missing block write it once: the first claims it, the second waits for
that write (and writes it itself if the first fails). Arrays given to
``save_agent`` must be evaluated (the prefix pool's are); arrays returned are
evaluated on the calling thread, so any thread may use them (MLX's lazy graphs
are bound to the thread that built them; evaluated buffers are not).

Disk budget (``disk_budget_bytes``): every file under the tag dir counts
(agent files, segments, .corrupt files, stray temp files). Before a save writes,
it makes room: junk first (.corrupt files, names no agent maps to), oldest
first; then the files of the least recently used agents that are neither
``pinned()`` nor being saved or loaded, one by one, each followed by the
segments only it referenced, until the write fits. If it cannot fit, nothing is
removed and ``diskbudget.BudgetExceeded`` is raised. ``pinned`` is called on the
I/O thread of the save: it must return a snapshot (e.g. a frozenset the event
loop replaces), not a set the loop mutates. A directory over a lowered budget
comes back under it at the next save.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Mapping

import mlx.core as mx

from actors.blockfile import (
    FORMAT_VERSION,
    BadFile,
    BlockFormat,
    SavedAgent,
    SavedBranch,
    estimated_size,
    read_header,
)
from actors.cachestore import (
    CORRUPT_SUFFIX,
    SUFFIX,
    TEMP_RE,
    PathEscape,
    agent_for_stem,
    file_name,
    make_dir,
    stale_temp_file,
    validate_agent_id,
    validate_model_tag,
    write_atomic,
)
from actors.diskbudget import BudgetExceeded, DiskFile, DiskIndex, removable

__all__ = [
    "FORMAT_VERSION",
    "SavedBranch",
    "SavedAgent",
    "BlockStore",
    "MissingBlocks",
    "BudgetExceeded",
]

log = logging.getLogger("greenroom.blockstore")

AGENTS = "agents"
BLOCKS = "blocks"
_REMEMBER_EVICTED = 4096


class MissingBlocks(ValueError):
    """save_agent was not given blocks that no segment holds; nothing was written.
    Pass every block of the agent (the store writes only the missing ones)."""

    def __init__(self, keys: list[bytes]):
        super().__init__(f"{len(keys)} block(s) neither on disk nor given, e.g. {keys[0].hex()}")
        self.keys = keys


def _unique(keys: Iterable[bytes]) -> list[bytes]:
    return list(dict.fromkeys(keys))


def _subtract(counter: Counter, items: Iterable) -> None:
    """Count each item once less, forgetting those that reach zero."""
    for item in items:
        n = counter[item] - 1
        if n > 0:
            counter[item] = n
        else:
            del counter[item]


# --------------------------------------------------------------------------- the store


class BlockStore:
    """Agent branches and shared KV blocks of one model tag under ``root/<model_tag>/``.

    Every method blocks: run them on I/O threads (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        model_tag: str,
        *,
        block_tokens: int = 64,
        disk_budget_bytes: int | None = None,
    ):
        """Blocking: makes the dirs, sweeps dead writers' temp files, reads every
        file's header into the index, moves unreadable files aside and removes
        segments no agent references."""
        if block_tokens < 1:
            raise ValueError("block_tokens must be positive")
        if disk_budget_bytes is not None and disk_budget_bytes <= 0:
            raise ValueError("the disk budget must be positive")
        self.model_tag = validate_model_tag(model_tag)
        self.block_tokens = block_tokens
        self.format = BlockFormat(self.model_tag, block_tokens)
        self.budget_bytes = disk_budget_bytes
        # Agents whose files must stay (set by the server: its active agents). Called on
        # I/O threads: it must return a snapshot that is safe to read there.
        self.pinned: Callable[[], Iterable[str]] = tuple

        root = Path(root).expanduser()
        make_dir(root)
        self.root = root.resolve()
        self.dir = self._own_dir(self.root, self.model_tag)
        self._dirs = {sub: self._own_dir(self.dir, sub) for sub in (AGENTS, BLOCKS)}

        self._lock = threading.Lock()  # guards everything below; never held across a file write
        self._agent_locks: dict[str, threading.Lock] = {}
        self.index = DiskIndex()  # every file under the tag dir, named "<sub>/<file>"
        self._agent_keys: dict[str, frozenset[bytes]] = {}  # agent -> keys its file references
        self._refs: Counter[bytes] = Counter()  # key -> agent files referencing it
        self._segments: dict[str, tuple[bytes, ...]] = {}  # segment stem -> its keys
        self._holders: dict[bytes, list[str]] = {}  # key -> segments holding it (first: the one read)
        self._protected: Counter[bytes] = Counter()  # keys of saves under way
        self._claims: dict[bytes, threading.Event] = {}  # keys being written now -> done
        self._busy: Counter[str] = Counter()  # agents being saved or loaded
        self._reading: Counter[str] = Counter()  # segments being read

        self.evictions = 0  # files removed to stay under the budget (junk and agent files)
        self.evicted_bytes = 0
        self.refused = 0  # saves not made because they could not fit
        self.segments_collected = 0  # segments removed because no agent referenced them
        self.blocks_written = 0
        self.bytes_written = 0
        self._evicted_owners: OrderedDict[str, float] = OrderedDict()

        self._open()
        self.collect_garbage()

    # ---- paths and locks

    @staticmethod
    def _own_dir(parent: Path, name: str) -> Path:
        d = parent / name
        if d.is_symlink():
            raise PathEscape(f"cache dir {d} is a symlink")
        make_dir(d)
        if d.resolve() != d:
            raise PathEscape(f"cache dir {d} resolves elsewhere")
        return d

    def _agent_path(self, agent_id: str) -> Path:
        path = self._dirs[AGENTS] / file_name(agent_id)  # validates the id
        resolved = path.resolve()
        if resolved.parent != self._dirs[AGENTS] or resolved.name != path.name:
            raise PathEscape(f"cache path {path} resolves outside {self._dirs[AGENTS]}")
        return path

    def _agent_lock(self, agent_id: str) -> threading.Lock:
        with self._lock:
            return self._agent_locks.setdefault(agent_id, threading.Lock())

    @staticmethod
    def _segment_name(stem: str) -> str:
        return f"{BLOCKS}/{stem}{SUFFIX}"

    @staticmethod
    def _agent_name(agent_id: str) -> str:
        return f"{AGENTS}/{file_name(agent_id)}"

    # ---- queries (from the index)

    def has_block(self, key: bytes) -> bool:
        with self._lock:
            return key in self._holders

    def agents(self) -> list[str]:
        """Agents with a file, sorted."""
        return self.index.owners()

    def last_used(self, agent_id: str) -> float | None:
        """Epoch seconds of the agent's last save or load (its file's mtime at open)."""
        file = self.index.get(self._agent_name(agent_id))
        return file.last_used if file is not None else None

    def was_evicted(self, agent_id: str) -> bool:
        """Whether the agent's file was evicted for the budget (asked once: then forgotten)."""
        with self._lock:
            return self._evicted_owners.pop(agent_id, None) is not None

    def stats(self) -> dict:
        files = self.index.files()
        with self._lock:
            blocks, segments = len(self._holders), len(self._segments)
        return {
            "model_tag": self.model_tag,
            "used_bytes": sum(f.size for f in files),
            "files": len(files),
            "agent_files": sum(1 for f in files if f.owner is not None),
            "segment_files": segments,
            "blocks": blocks,
            "junk_files": sum(1 for f in files if f.junk),
            "junk_bytes": sum(f.size for f in files if f.junk),
            "budget_bytes": self.budget_bytes,
            "evictions": self.evictions,
            "evicted_bytes": self.evicted_bytes,
            "refused": self.refused,
            "segments_collected": self.segments_collected,
            "blocks_written": self.blocks_written,
            "bytes_written": self.bytes_written,
        }

    # ---- save

    def save_agent(self, agent: SavedAgent, blocks: Mapping[bytes, mx.array]) -> int:
        """Write the blocks of `agent` that no segment holds (one new segment, fsynced),
        then the agent file (atomic replace). `blocks` must hold at least those; passing
        every block of the agent is always right. Returns the bytes written.

        Raises MissingBlocks (nothing written), BudgetExceeded (nothing written or
        removed), InvalidAgentId, ValueError/TypeError for inconsistent input."""
        agent_id = validate_agent_id(agent.agent_id)
        path = self._agent_path(agent_id)
        arrays, meta, ordered_keys = self.format.agent_file(agent)
        keys = frozenset(ordered_keys)
        agent_bytes = estimated_size(arrays, meta)
        dropped: frozenset[bytes] = frozenset()
        with self._agent_lock(agent_id):
            with self._lock:
                self._busy[agent_id] += 1
                self._protected.update(keys)
                old = self.index.get(self._agent_name(agent_id))
            agent_ticket = None
            try:
                growth = agent_bytes - (old.size if old else 0)
                written, agent_ticket = self._store_blocks(agent_id, ordered_keys, blocks, growth)
                size = self._write_file(path, arrays, meta)
                with self._lock:
                    dropped = self._set_agent(agent_id, keys, size, time.time())
                    self.bytes_written += size
                written += size
            finally:
                with self._lock:
                    if agent_ticket is not None:
                        self.index.release(agent_ticket)
                    _subtract(self._busy, (agent_id,))
                    _subtract(self._protected, keys)
                    # The old version's blocks, or this save's if it failed, may be garbage now.
                    self._collect(self._segments_of(keys | dropped))
        return written

    def _store_blocks(
        self, agent_id: str, keys: tuple[bytes, ...], blocks: Mapping, agent_growth: int
    ) -> tuple[int, int]:
        """Make every key durable in some segment, writing the ones nobody holds or is
        writing; room for the agent file's growth is made in the same plan as the first
        segment, so a save that cannot fit writes nothing. Returns (segment bytes
        written, the ticket reserving the agent file's growth)."""
        pending, written, agent_ticket = list(keys), 0, None
        try:
            while True:
                mine, theirs, event = self._claim(pending, blocks)
                try:
                    arrays, meta = self.format.segment_file(mine, blocks) if mine else ({}, {})
                    seg_bytes = estimated_size(arrays, meta) if mine else 0
                    parts = [seg_bytes] if agent_ticket is not None else [seg_bytes, agent_growth]
                    tickets = self._make_room(parts, agent_id)
                    if agent_ticket is None:
                        agent_ticket = tickets[1]
                    try:
                        if mine:
                            written += self._write_segment(mine, arrays, meta)
                    finally:
                        self.index.release(tickets[0])
                finally:
                    with self._lock:
                        for key in mine:
                            del self._claims[key]
                    event.set()
                if not theirs:
                    return written, agent_ticket
                for other in theirs:  # another save is writing these blocks: use its segment
                    other.wait()
                with self._lock:
                    pending = [k for k in pending if k not in self._holders]
        except BaseException:
            if agent_ticket is not None:
                self.index.release(agent_ticket)
            raise

    def _claim(self, keys: list[bytes], blocks: Mapping) -> tuple[list[bytes], list[threading.Event], threading.Event]:
        """Split the keys no segment holds into those this save writes (claimed now) and
        the events of the saves writing the others. MissingBlocks if one of ours is not given."""
        event = threading.Event()
        with self._lock:
            mine, theirs = [], []
            for key in keys:
                if key in self._holders:
                    continue
                other = self._claims.get(key)
                if other is not None:
                    theirs.append(other)
                else:
                    mine.append(key)
            missing = [k for k in mine if k not in blocks]
            if missing:
                raise MissingBlocks(missing)
            for key in mine:
                self._claims[key] = event
        return mine, theirs, event

    def _write_segment(self, keys: list[bytes], arrays: dict[str, mx.array], meta: dict[str, str]) -> int:
        stem = hashlib.blake2b(b"".join(keys), digest_size=16).hexdigest()
        size = self._write_file(self._dirs[BLOCKS] / (stem + SUFFIX), arrays, meta)
        with self._lock:
            self._add_segment(stem, tuple(keys), size, time.time())
            self.blocks_written += len(keys)
            self.bytes_written += size
        return size

    @staticmethod
    def _write_file(path: Path, arrays: dict[str, mx.array], meta: dict[str, str]) -> int:
        """Atomically (temp file, fsync, rename, fsync the dir) write a safetensors file. The size."""
        return write_atomic(path, lambda f: mx.save_safetensors(f, arrays, metadata=meta))

    # ---- load

    def load_agent(self, agent_id: str) -> SavedAgent | None:
        """The agent's branches (tails evaluated; blocks not loaded), or None if it has no
        file or the file is unusable (moved aside as .corrupt, one warning). A branch
        whose blocks are not all held by a segment is cut before the first missing one
        (its tail dropped; a branch left with no tokens is left out), with one warning."""
        try:
            path = self._agent_path(agent_id)
        except PathEscape as e:
            log.warning("ignoring KV cache of %s: %s", agent_id, e)
            return None
        with self._agent_lock(agent_id):
            with self._lock:
                self._busy[agent_id] += 1
            try:
                return self._load_agent(agent_id, path)
            finally:
                with self._lock:
                    _subtract(self._busy, (agent_id,))

    def _load_agent(self, agent_id: str, path: Path) -> SavedAgent | None:
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            with self._lock:  # removed behind the store's back: forget it too
                self._collect(self._segments_of(self._drop_agent(agent_id)))
            return None
        except OSError as e:
            log.warning("cannot read KV cache file %s: %s", path, e)
            return None
        try:
            if not stat.S_ISREG(st.st_mode):
                raise BadFile("not a regular file")
            agent = self.format.read_agent(agent_id, path)
        except Exception as e:  # BadFile, or mx.load / eval errors on damaged files
            reason = str(e) if isinstance(e, BadFile) else f"{type(e).__name__}: {e}"
            with self._lock:
                moved = self._quarantine(self._agent_name(agent_id), st)
                dropped = self._drop_agent(agent_id)
                self._collect(self._segments_of(dropped))
            log.warning("discarding KV cache file %s: %s%s", path, reason, f" (moved to {moved})" if moved else "")
            return None
        self.index.touch(self._agent_name(agent_id))
        return self._truncate_to_held_blocks(agent)

    def _truncate_to_held_blocks(self, agent: SavedAgent) -> SavedAgent:
        bt = self.block_tokens
        with self._lock:
            held = [next((j for j, k in enumerate(b.block_keys) if k not in self._holders), None) for b in agent.branches]
        if all(h is None for h in held):
            return agent
        branches, cut = [], []
        for i, (branch, first_missing) in enumerate(zip(agent.branches, held)):
            if first_missing is None:
                branches.append(branch)
                continue
            cut.append(f"branch {i}: {len(branch.tokens)} -> {bt * first_missing} tokens")
            if first_missing > 0:
                keys = branch.block_keys[:first_missing]
                branches.append(SavedBranch(branch.tokens[: bt * first_missing], keys, None))
        log.warning("KV cache of %s: blocks missing on disk, cut %s", agent.agent_id, "; ".join(cut))
        return SavedAgent(agent.agent_id, tuple(branches))

    def load_blocks(self, keys: Iterable[bytes]) -> dict[bytes, mx.array]:
        """The blocks of `keys` found on disk, evaluated. Only the needed arrays of each
        segment are read, and each is checked against its CRC; a damaged segment is moved
        aside (one warning) and its keys are absent from the result. A key is also absent
        if its segment went since load_agent (damaged, or evicted with an agent that was
        not pinned): the caller cuts the branch before its first absent block."""
        wanted = _unique(keys)
        with self._lock:
            plan: dict[str, list[bytes]] = {}
            for key in wanted:
                holders = self._holders.get(key)
                if holders:
                    plan.setdefault(holders[0], []).append(key)
            self._reading.update(plan.keys())
        found: dict[bytes, mx.array] = {}
        try:
            for stem, seg_keys in plan.items():
                found.update(self._read_blocks(stem, seg_keys))
        finally:
            with self._lock:
                _subtract(self._reading, plan.keys())
        return found

    def _read_blocks(self, stem: str, keys: list[bytes]) -> dict[bytes, mx.array]:
        path = self._dirs[BLOCKS] / (stem + SUFFIX)
        try:
            return self.format.read_blocks(path, keys)
        except Exception as e:
            reason = str(e) if isinstance(e, BadFile) else f"{type(e).__name__}: {e}"
            with self._lock:
                if stem in self._segments:
                    try:
                        st = os.stat(path, follow_symlinks=False)
                    except OSError:
                        st = None
                    moved = self._quarantine(self._segment_name(stem), st)
                    self._drop_segment(stem)
                else:
                    moved = None
            log.warning("discarding KV block segment %s: %s%s", path, reason, f" (moved to {moved})" if moved else "")
            return {}

    # ---- delete and garbage

    def delete_agent(self, agent_id: str) -> None:
        """Remove the agent's file (and its .corrupt copy), then the segments only it used."""
        path = self._agent_path(agent_id)
        with self._agent_lock(agent_id), self._lock:
            for p in (path, path.with_name(path.name + CORRUPT_SUFFIX)):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
                self.index.pop(f"{AGENTS}/{p.name}")
            self._collect(self._segments_of(self._drop_agent(agent_id)))

    def collect_garbage(self) -> int:
        """Remove every segment no agent file (or save under way) needs; how many went."""
        with self._lock:
            return self._collect(list(self._segments))

    def _segments_of(self, keys: Iterable[bytes]) -> set[str]:
        return {stem for key in keys for stem in self._holders.get(key, ())}

    def _is_garbage(self, stem: str, refs: Callable[[bytes], int]) -> bool:
        """No agent needs a block of this segment from it: every key is unreferenced,
        or is read from another segment that holds it too (a duplicate)."""
        if self._reading.get(stem):
            return False
        for key in self._segments[stem]:
            if self._holders[key][0] == stem and (refs(key) > 0 or self._protected.get(key, 0) > 0):
                return False
        return True

    def _collect(self, stems: Iterable[str]) -> int:
        """Remove the garbage among `stems` (lock held: a save deciding which blocks to
        write sees either the segment or its absence, never a file about to vanish)."""
        gone = 0
        for stem in list(stems):
            if stem in self._segments and self._is_garbage(stem, self._refs.__getitem__):
                self._unlink(self._segment_name(stem))
                self._drop_segment(stem)
                self.segments_collected += 1
                gone += 1
        return gone

    # ---- disk budget

    def _make_room(self, parts: list[int], writer: str) -> list[int]:
        """Reserve room for files of `parts` bytes more (one ticket each) in one plan:
        if the budget needs it, junk goes first, then LRU agents that are not pinned,
        busy or the writer (and the segments only they used). Nothing is removed
        when that would not be enough: BudgetExceeded."""
        keep = {*self.pinned(), writer}
        with self._lock:
            nbytes = sum(parts)
            if self.budget_bytes is not None and nbytes > 0:
                if nbytes > self.budget_bytes:
                    self.refused += 1
                    raise BudgetExceeded(
                        f"{nbytes} bytes is more than the whole disk budget ({self.budget_bytes} bytes)"
                    )
                over = self.index.committed_bytes + nbytes - self.budget_bytes
                if over > 0:
                    keep.update(self._busy)
                    self._evict(*self._choose_victims(over, keep))
            return [self.index.reserve(n) for n in parts]

    def _choose_victims(self, over: int, keep: set[str]) -> tuple[list[DiskFile], list[str]]:
        """Files to remove (and the segments that become garbage) to free `over` bytes,
        found without touching anything; BudgetExceeded if even all of them are not enough."""
        victims, segments, freed = [], [], 0
        dropped: Counter[bytes] = Counter()
        refs = lambda key: self._refs.get(key, 0) - dropped.get(key, 0)  # noqa: E731
        for file in removable(self.index.files(), lambda f: f.owner in keep):
            if freed >= over:
                break
            victims.append(file)
            freed += file.size
            if file.owner is None:
                continue
            keys = self._agent_keys.get(file.owner, frozenset())
            dropped.update(keys)
            for stem in sorted(self._segments_of(keys) - set(segments)):
                if self._is_garbage(stem, refs):
                    segments.append(stem)
                    freed += self.index.get(self._segment_name(stem)).size
        if freed < over:
            self.refused += 1
            raise BudgetExceeded(
                f"the disk budget ({self.budget_bytes} bytes) is taken by files of active agents"
            )
        return victims, segments

    def _evict(self, victims: list[DiskFile], segments: list[str]) -> None:
        now = time.time()
        for file in victims:
            if file.owner is None:
                log.info("disk budget: removing %s (%d bytes)", file.name, file.size)
            else:
                log.info(
                    "disk budget: evicting the saved cache of %s (%d bytes, last used %.0fs ago); "
                    "it starts cold next time", file.owner, file.size, now - file.last_used,
                )
            self._unlink(file.name)
            self.evictions += 1
            self.evicted_bytes += file.size
            if file.owner is not None:
                self._drop_agent(file.owner)
                self._evicted_owners[file.owner] = now
                self._evicted_owners.move_to_end(file.owner)
        while len(self._evicted_owners) > _REMEMBER_EVICTED:
            self._evicted_owners.popitem(last=False)
        for stem in segments:
            self.evicted_bytes += self.index.get(self._segment_name(stem)).size
            self._unlink(self._segment_name(stem))
            self._drop_segment(stem)
            self.segments_collected += 1

    # ---- index bookkeeping (lock held)

    def _add_segment(self, stem: str, keys: tuple[bytes, ...], size: int, mtime: float) -> None:
        self.index.put(DiskFile(self._segment_name(stem), size, mtime))
        old = self._segments.get(stem)
        if old is not None:  # rewritten under the same name (same keys): the index is the same
            return
        self._segments[stem] = keys
        for key in keys:
            self._holders.setdefault(key, []).append(stem)

    def _drop_segment(self, stem: str) -> None:
        self.index.pop(self._segment_name(stem))
        for key in self._segments.pop(stem, ()):
            holders = self._holders[key]
            holders.remove(stem)
            if not holders:
                del self._holders[key]

    def _set_agent(self, agent_id: str, keys: frozenset[bytes], size: int, when: float) -> frozenset[bytes]:
        """Index the agent's file; the keys its previous version referenced and this one does not."""
        old = self._agent_keys.get(agent_id, frozenset())
        self._refs.update(keys)
        _subtract(self._refs, old)
        self._agent_keys[agent_id] = keys
        self.index.put(DiskFile(self._agent_name(agent_id), size, when, agent_id))
        return old - keys

    def _drop_agent(self, agent_id: str) -> frozenset[bytes]:
        self.index.pop(self._agent_name(agent_id))
        keys = self._agent_keys.pop(agent_id, frozenset())
        _subtract(self._refs, keys)
        return keys

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self.dir / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", self.dir / name, exc)
            return
        self.index.pop(name)

    def _quarantine(self, name: str, st: os.stat_result | None) -> str | None:
        """Move a rejected file aside as `.corrupt` (junk: first to go); its new name."""
        self.index.pop(name)
        dest = name + CORRUPT_SUFFIX
        try:
            os.replace(self.dir / name, self.dir / dest)
        except OSError:
            return None
        if st is not None and stat.S_ISREG(st.st_mode):
            self.index.put(DiskFile(dest, st.st_size, st.st_mtime, junk=True))
        return dest

    # ---- open

    def _open(self) -> None:
        """Index every file under the tag dir (headers only); sweep dead temp files."""
        now = time.time()
        try:  # files directly in the tag dir count against the budget too
            top = [e for e in os.scandir(self.dir) if e.is_file(follow_symlinks=False)]
        except OSError:
            top = []
        for entry in top:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            # Whole-cache files of earlier greenroom versions (and their .corrupt and temp
            # files) are junk now: never loaded, the first to go when the budget needs room.
            legacy = entry.name.endswith((SUFFIX, CORRUPT_SUFFIX)) or TEMP_RE.match(entry.name) is not None
            self.index.put(DiskFile(entry.name, st.st_size, st.st_mtime, junk=legacy))
        for sub, d in self._dirs.items():
            try:
                entries = list(os.scandir(d))
            except OSError as e:
                log.warning("cannot list %s: %s", d, e)
                continue
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                self._index_file(sub, entry.name, Path(entry.path), st, now)
        with self._lock:
            for holders in self._holders.values():
                holders.sort()  # duplicates found at open: read from one chosen the same way every time

    def _index_file(self, sub: str, name: str, path: Path, st: os.stat_result, now: float) -> None:
        index_name = f"{sub}/{name}"
        if TEMP_RE.match(name) is not None:
            if stale_temp_file(name, st.st_mtime, now):
                try:
                    os.unlink(path)
                    return
                except OSError:
                    pass
            self.index.put(DiskFile(index_name, st.st_size, st.st_mtime))  # a live writer's: counted, kept
            return
        if name.endswith(CORRUPT_SUFFIX):
            self.index.put(DiskFile(index_name, st.st_size, st.st_mtime, junk=True))
            return
        if not name.endswith(SUFFIX):
            self.index.put(DiskFile(index_name, st.st_size, st.st_mtime))  # not ours: counted, kept
            return
        stem = name[: -len(SUFFIX)]
        agent = agent_for_stem(stem) if sub == AGENTS else None
        is_segment = sub == BLOCKS and len(stem) == 32 and all(c in "0123456789abcdef" for c in stem)
        if agent is None and not is_segment:
            self.index.put(DiskFile(index_name, st.st_size, st.st_mtime, junk=True))
            return
        try:
            meta, tensors = read_header(path)
            if agent is not None:
                self.format.verify_header(meta, tensors, "agent", agent)
                layout = self.format.agent_layout(meta, tensors)
                keys = frozenset(k for _, ks in layout for k in ks)
            else:
                self.format.verify_header(meta, tensors, "segment")
                seg_keys = self.format.segment_layout(meta, tensors)
        except (BadFile, OSError) as e:
            with self._lock:
                moved = self._quarantine(index_name, st)
            log.warning("discarding KV cache file %s: %s%s", path, e, f" (moved to {moved})" if moved else "")
            return
        with self._lock:
            if agent is not None:
                self._set_agent(agent, keys, st.st_size, st.st_mtime)
            else:
                self._add_segment(stem, seg_keys, st.st_size, st.st_mtime)
