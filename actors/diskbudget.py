"""A cap on the bytes the KV cache files of one model tag take on disk.

Independent of the file format: the store feeds a `DiskIndex` with named files
(size, last use, owning agent, whether it is junk) and asks `DiskBudget.plan`
which files must go before a new one is written. Today a file is one agent's
whole cache; content-addressed prefix blocks would be more files of the same kind
(with an owner of None and a pinned predicate that knows who references them).

Policy, in order:
1. junk (`.corrupt` files, caches under an old naming): oldest first;
2. caches of agents that are not pinned, least recently used first.
Pinned files (an agent that is active: in memory, restoring, or writing) and
files that are neither junk nor owned (a live writer's temp file, a file
greenroom did not write) are never removed. A file bigger than the whole
budget is not written at all.

The index is kept in memory and updated on every write, move and removal, so
reading usage never lists a directory. It is thread-safe: the event loop
plans, the I/O threads write and remove.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

MIN_DEFAULT_BYTES = 256 << 20
MAX_DEFAULT_BYTES = 32 << 30
DEFAULT_SHARE = 0.25  # of the free space where the caches live, measured at startup
_REMEMBER_EVICTED = 4096  # agents whose eviction is still worth a log line when they return


def default_disk_budget(directory: Path) -> int:
    """A quarter of the free space of the file system holding `directory` (or of its
    nearest existing parent), at least 256 MiB and at most 32 GiB. Blocking (statvfs)."""
    path = Path(directory).expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
    except OSError:
        return MIN_DEFAULT_BYTES
    return int(min(MAX_DEFAULT_BYTES, max(MIN_DEFAULT_BYTES, free * DEFAULT_SHARE)))


@dataclass(frozen=True, slots=True)
class DiskFile:
    name: str  # file name inside its directory
    size: int
    last_used: float  # epoch seconds: last write or restore; the mtime for files found at startup
    owner: str | None = None  # the agent whose cache this is
    junk: bool = False  # a .corrupt file or a cache under an old naming: removed first


class DiskIndex:
    """The files of one directory: name -> DiskFile, plus bytes reserved by writes
    that are under way (so two writers planned at once do not count the same room)."""

    def __init__(self, files: Iterable[DiskFile] = ()):
        self._lock = threading.Lock()
        self._files: dict[str, DiskFile] = {f.name: f for f in files}
        self._reserved: dict[int, int] = {}
        self._tickets = iter(range(1, 1 << 62))

    def put(self, file: DiskFile) -> None:
        with self._lock:
            self._files[file.name] = file

    def pop(self, name: str) -> DiskFile | None:
        with self._lock:
            return self._files.pop(name, None)

    def get(self, name: str) -> DiskFile | None:
        with self._lock:
            return self._files.get(name)

    def touch(self, name: str, when: float | None = None) -> None:
        with self._lock:
            file = self._files.get(name)
            if file is not None:
                self._files[name] = replace(file, last_used=time.time() if when is None else when)

    def files(self) -> list[DiskFile]:
        with self._lock:
            return list(self._files.values())

    def owners(self) -> list[str]:
        """Agents with a cache file, sorted."""
        with self._lock:
            return sorted(f.owner for f in self._files.values() if f.owner is not None)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(f.size for f in self._files.values())

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(self._reserved.values())

    @property
    def committed_bytes(self) -> int:
        """Bytes on disk plus bytes reserved by writes under way, read at one instant."""
        with self._lock:
            return sum(f.size for f in self._files.values()) + sum(self._reserved.values())

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._files)

    @property
    def junk_count(self) -> int:
        with self._lock:
            return sum(1 for f in self._files.values() if f.junk)

    def reserve(self, nbytes: int) -> int:
        with self._lock:
            ticket = next(self._tickets)
            self._reserved[ticket] = max(0, nbytes)
            return ticket

    def release(self, ticket: int) -> None:
        with self._lock:
            self._reserved.pop(ticket, None)


def removable(files: Iterable[DiskFile], pinned: Callable[[DiskFile], bool]) -> list[DiskFile]:
    """Every file the policy may remove, in removal order: junk oldest first, then the
    caches of agents that are not pinned, least recently used first."""
    files = list(files)
    junk = sorted((f for f in files if f.junk), key=lambda f: f.last_used)
    caches = sorted(
        (f for f in files if not f.junk and f.owner is not None and not pinned(f)),
        key=lambda f: f.last_used,
    )
    return junk + caches


def choose_victims(
    files: Iterable[DiskFile], need_bytes: int, pinned: Callable[[DiskFile], bool]
) -> list[DiskFile] | None:
    """The files to remove, in removal order, to free at least `need_bytes`; None when
    removing every removable file would not be enough (then nothing should go)."""
    if need_bytes <= 0:
        return []
    victims, freed = [], 0
    for file in removable(files, pinned):
        if freed >= need_bytes:
            break
        victims.append(file)
        freed += file.size
    return victims if freed >= need_bytes else None


@dataclass(frozen=True, slots=True)
class Plan:
    """Room made for one write: remove `victims`, then write; `ticket` holds the room."""

    victims: tuple[DiskFile, ...]
    ticket: int


class BudgetExceeded(Exception):
    """The write cannot fit: bigger than the budget, or only pinned files could make room."""


class DiskBudget:
    """The cap and its counters. One per server; used for the loaded tag's index."""

    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError("the disk budget must be positive")
        self.budget_bytes = budget_bytes
        self.evictions = 0  # files removed to stay under the budget
        self.evicted_bytes = 0
        self.refused = 0  # writes not made because they could not fit
        self._evicted_owners: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def plan(
        self,
        index: DiskIndex,
        incoming: DiskFile,
        pinned: Callable[[DiskFile], bool],
    ) -> Plan:
        """Make room for `incoming` (which replaces a file of the same name, if any):
        the victims leave the index now (the caller removes their files, then
        writes) and the growth is reserved until `index.release(plan.ticket)`.
        Raises BudgetExceeded when it cannot fit. Call from one thread (the loop)."""
        if incoming.size > self.budget_bytes:
            self._count_refusal()
            raise BudgetExceeded(
                f"{incoming.size} bytes is more than the whole disk budget ({self.budget_bytes} bytes)"
            )
        replaced = index.get(incoming.name)
        after = index.committed_bytes + incoming.size - (replaced.size if replaced else 0)
        others = [f for f in index.files() if f.name != incoming.name]
        victims = choose_victims(others, after - self.budget_bytes, pinned)
        if victims is None:
            self._count_refusal()
            raise BudgetExceeded(
                f"the disk budget ({self.budget_bytes} bytes) is taken by files of active agents"
            )
        self._evict(index, victims)
        ticket = index.reserve(incoming.size - (replaced.size if replaced else 0))
        return Plan(tuple(victims), ticket)

    def trim(self, index: DiskIndex, pinned: Callable[[DiskFile], bool]) -> list[DiskFile]:
        """Victims (taken out of the index; the caller removes the files) that bring the
        directory back under the budget, e.g. after the budget was lowered between
        runs; if it cannot get under, every removable file."""
        over = index.committed_bytes - self.budget_bytes
        if over <= 0:
            return []
        victims = choose_victims(index.files(), over, pinned)
        if victims is None:
            victims = removable(index.files(), pinned)
        self._evict(index, victims)
        return victims

    def _evict(self, index: DiskIndex, victims: list[DiskFile]) -> None:
        now = time.time()
        with self._lock:
            for file in victims:
                index.pop(file.name)
                self.evictions += 1
                self.evicted_bytes += file.size
                if file.owner is not None:
                    self._evicted_owners[file.owner] = now
                    self._evicted_owners.move_to_end(file.owner)
            while len(self._evicted_owners) > _REMEMBER_EVICTED:
                self._evicted_owners.popitem(last=False)

    def was_evicted(self, owner: str) -> bool:
        """Whether `owner`'s file was evicted (asked once: the answer is forgotten)."""
        with self._lock:
            return self._evicted_owners.pop(owner, None) is not None

    def _count_refusal(self) -> None:
        with self._lock:
            self.refused += 1
