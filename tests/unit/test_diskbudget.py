"""The disk budget: its policy on an index of named files, and the budget as
Persistence applies it to real cache files (no model: snapshots are built here)."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import actors  # noqa: F401  (prepares MLX for the host before mlx.core is imported)
import mlx.core as mx

from actors import diskbudget
from actors.cachestore import CacheSnapshot, CacheStore, estimated_file_size, file_name
from actors.diskbudget import BudgetExceeded, DiskBudget, DiskFile, DiskIndex, choose_victims
from actors.pool import Persistence

TAG = "0a1b2c3d"
MB = 1 << 20


def cache(owner: str, size: int, last_used: float) -> DiskFile:
    return DiskFile(f"{owner}.safetensors", size, last_used, owner)


def junk(name: str, size: int, last_used: float) -> DiskFile:
    return DiskFile(name, size, last_used, junk=True)


def nobody(_file) -> bool:
    return False


# ---------------------------------------------------------------- policy


def test_junk_goes_first_oldest_first_then_least_recently_used_caches():
    files = [
        cache("recent", MB, 300),
        junk("new.corrupt", MB, 250),
        cache("old", MB, 100),
        junk("old.corrupt", MB, 50),
        cache("middle", MB, 200),
    ]
    names = lambda victims: [f.name for f in victims]  # noqa: E731
    assert names(choose_victims(files, 1, nobody)) == ["old.corrupt"]
    assert names(choose_victims(files, 2 * MB, nobody)) == ["old.corrupt", "new.corrupt"]
    assert names(choose_victims(files, 2 * MB + 1, nobody)) == [
        "old.corrupt", "new.corrupt", "old.safetensors"
    ]
    assert choose_victims(files, 0, nobody) == []


def test_pinned_and_unowned_files_never_go():
    files = [
        cache("active", 5 * MB, 1),  # oldest, but in use
        cache("idle", MB, 2),
        DiskFile(".idle.123-abc.tmp.safetensors", 3 * MB, 0),  # a live writer's temp file
    ]
    pinned = lambda f: f.owner == "active"  # noqa: E731
    assert [f.owner for f in choose_victims(files, MB, pinned)] == ["idle"]
    # Only the pinned file and the temp file could free more: nothing goes at all.
    assert choose_victims(files, 2 * MB, pinned) is None


def test_plan_accounts_for_the_file_it_replaces_and_for_writes_under_way():
    index = DiskIndex([cache("a", 4 * MB, 1), cache("b", 4 * MB, 2)])
    budget = DiskBudget(10 * MB)
    # a grows from 4 to 6 MB: 10 MB in all, fits without removing anything.
    plan = budget.plan(index, cache("a", 6 * MB, 3), nobody)
    assert plan.victims == () and index.reserved_bytes == 2 * MB
    # A second write planned before the first one finished sees the reserved room.
    plan2 = budget.plan(index, cache("c", MB, 4), lambda f: f.owner == "a")
    assert [f.owner for f in plan2.victims] == ["b"]
    assert index.get("b.safetensors") is None  # out of the index at once
    assert budget.evictions == 1 and budget.evicted_bytes == 4 * MB
    index.release(plan.ticket)
    index.release(plan2.ticket)
    assert index.reserved_bytes == 0


def test_a_file_bigger_than_the_budget_is_refused_and_nothing_is_removed():
    index = DiskIndex([cache("a", MB, 1)])
    budget = DiskBudget(3 * MB)
    with pytest.raises(BudgetExceeded, match="more than the whole disk budget"):
        budget.plan(index, cache("huge", 4 * MB, 2), nobody)
    with pytest.raises(BudgetExceeded, match="active agents"):
        budget.plan(index, cache("b", 3 * MB, 2), lambda f: True)
    assert index.count == 1 and budget.evictions == 0 and budget.refused == 2


def test_evicted_owner_is_reported_once():
    index = DiskIndex([cache("gone", MB, 1)])
    budget = DiskBudget(MB)
    budget.plan(index, cache("new", MB, 2), nobody)
    assert budget.was_evicted("gone") and not budget.was_evicted("gone")
    assert not budget.was_evicted("new")


def test_trim_gets_back_under_a_lowered_budget():
    index = DiskIndex([junk("x.corrupt", MB, 5), cache("a", 2 * MB, 1), cache("b", 2 * MB, 2)])
    victims = DiskBudget(3 * MB).trim(index, lambda f: f.owner == "a")
    assert [f.name for f in victims] == ["x.corrupt", "b.safetensors"]
    assert index.used_bytes == 2 * MB


def test_default_budget_is_a_share_of_free_space_within_bounds(monkeypatch, tmp_path):
    class Stat:
        f_frsize = 4096

        def __init__(self, free):
            self.f_bavail = free // 4096

    for free, want in ((40 << 30, 10 << 30), (100 << 20, diskbudget.MIN_DEFAULT_BYTES), (1 << 40, diskbudget.MAX_DEFAULT_BYTES)):
        monkeypatch.setattr(os, "statvfs", lambda path, free=free: Stat(free))
        assert diskbudget.default_disk_budget(tmp_path / "not" / "yet") == want


# ---------------------------------------------------------------- applied to cache files


def snapshot(agent: str, n_tokens: int) -> CacheSnapshot:
    k = mx.zeros((1, 2, n_tokens, 64))
    mx.eval(k)
    return CacheSnapshot(agent, TAG, tuple(range(n_tokens)), ((k, k), (k, k)))


class Disk:
    """Persistence's write path without the model: plan on the caller's thread
    (the loop's role), write on an I/O thread."""

    def __init__(self, root, budget_bytes, active=()):
        self.io = ThreadPoolExecutor(2)
        self.store = CacheStore(root, budget_bytes)
        self.persistence = Persistence(self.store, None, TAG, self.io)
        self.active = set(active)
        self.persistence.active_agents = lambda: self.active

    def save(self, agent: str, n_tokens: int = 64) -> bool:
        snap = snapshot(agent, n_tokens)
        try:
            plan = self.persistence._make_room(snap)
        except BudgetExceeded:
            return False
        self.io.submit(self.persistence._write_sync, 1, snap, plan).result()
        return True

    def on_disk(self) -> dict[str, int]:
        d = self.store.root / TAG
        return {p.name: p.stat().st_size for p in d.iterdir()}

    def close(self):
        self.io.shutdown()


@pytest.fixture
def disk_of(tmp_path):
    made = []

    def make(budget_bytes, active=()):
        made.append(Disk(tmp_path / "kv", budget_bytes, active))
        return made[-1]

    yield make
    for d in made:
        d.close()


def test_saves_stay_under_the_budget_evicting_idle_agents_lru(disk_of, caplog):
    one = estimated_file_size(snapshot("x", 64))
    disk = disk_of(3 * one, active={"a1"})
    with caplog.at_level(logging.INFO, logger="greenroom.pool"):
        for i in range(8):
            assert disk.save(f"a{i}")
            time.sleep(0.01)  # distinct last-use times
            files = disk.on_disk()
            assert sum(files.values()) <= 3 * one
            if i >= 1:
                assert file_name("a1") in files  # active: kept although it is old
            assert file_name(f"a{i}") in files
    assert set(disk.on_disk()) == {file_name(a) for a in ("a1", "a6", "a7")}
    assert disk.store.budget.evictions == 5
    assert "evicting the saved cache of a0" in caplog.text
    assert disk.persistence.index.used_bytes == sum(disk.on_disk().values())


def test_corrupt_files_count_and_go_first_oldest_first(disk_of, tmp_path):
    d = tmp_path / "kv" / TAG
    d.mkdir(parents=True)
    for name, age in (("old.safetensors.corrupt", 300), ("new.safetensors.corrupt", 100)):
        (d / name).write_bytes(b"x" * 100_000)
        os.utime(d / name, (time.time() - age, time.time() - age))
    one = estimated_file_size(snapshot("x", 64))
    disk = disk_of(2 * one + 150_000)
    assert disk.persistence.index.used_bytes == 200_000  # counted from the start
    assert disk.persistence.index.junk_count == 2
    assert disk.save("a") and disk.save("b")  # the second one needs 50 kB: one .corrupt goes
    assert set(disk.on_disk()) == {"new.safetensors.corrupt", file_name("a"), file_name("b")}
    assert disk.save("c")  # then the other one
    assert set(disk.on_disk()) == {file_name(a) for a in "abc"}
    assert disk.save("d")  # then the least recently used agent
    assert set(disk.on_disk()) == {file_name(a) for a in "bcd"}


def test_a_file_bigger_than_the_budget_is_not_written(disk_of, caplog):
    disk = disk_of(MB)
    assert disk.save("small", 8)
    assert not disk.save("big", 4096)  # ~4 MB of KV
    assert set(disk.on_disk()) == {file_name("small")}
    assert disk.store.budget.refused == 1


def test_when_only_active_agents_hold_the_budget_the_new_file_is_not_written(disk_of):
    one = estimated_file_size(snapshot("x", 64))
    disk = disk_of(2 * one, active={"a", "b"})
    assert disk.save("a") and disk.save("b")
    assert not disk.save("c")
    assert set(disk.on_disk()) == {file_name("a"), file_name("b")}
