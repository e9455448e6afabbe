"""The disk budget: its policy on an index of named files (the block store applies it
to real files: tests/unit/test_blockstore.py)."""

from __future__ import annotations

import os

import pytest


from actors import diskbudget
from actors.diskbudget import BudgetExceeded, DiskBudget, DiskFile, DiskIndex, choose_victims

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
