"""Tests for actors.blockstore: real files under tmp_path, small random KV arrays
(2 layers, 2 kv heads, head dim 4, 4-token blocks) plus one test at real shapes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import actors  # noqa: F401  (prepares MLX for the host before mlx.core is imported)
import mlx.core as mx

from actors import blockfile, cachestore
from actors.blockstore import (
    BlockStore,
    BudgetExceeded,
    MissingBlocks,
    SavedAgent,
    SavedBranch,
)
from actors.cachestore import InvalidAgentId, file_name

REPO = Path(__file__).resolve().parents[2]
TAG = "0a1b2c3d"
BT, LAYERS, HEADS, DIM = 4, 2, 2, 4
LOGGER = "greenroom.blockstore"


# --------------------------------------------------------------------------- helpers


def keys_of(tokens, scope="s", bt=BT) -> list[bytes]:
    """A hash chain over full blocks, as actors/prefix_pool.py builds it."""
    keys, parent = [], hashlib.blake2b(scope.encode(), digest_size=16).digest()
    for start in range(0, len(tokens) - bt + 1, bt):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b"".join(t.to_bytes(4, "little") for t in tokens[start : start + bt]))
        parent = h.digest()
        keys.append(parent)
    return keys


def kv(n_tokens, seed, dtype=mx.float32, layers=LAYERS, heads=HEADS, dim=DIM) -> mx.array:
    a = mx.random.normal((layers, 2, heads, n_tokens, dim), key=mx.random.key(seed)).astype(dtype)
    mx.eval(a)
    return a


class World:
    """The KV every block key stands for (the same bytes whoever saves it), like the pool."""

    def __init__(self, dtype=mx.float32, bt=BT, **shape):
        self.blocks: dict[bytes, mx.array] = {}
        self.dtype, self.bt, self.shape = dtype, bt, shape

    def branch(self, tokens, seed=0) -> SavedBranch:
        tokens = tuple(tokens)
        keys = tuple(keys_of(tokens, bt=self.bt))
        for key in keys:
            if key not in self.blocks:
                seed_k = int.from_bytes(key[:4], "little")
                self.blocks[key] = kv(self.bt, seed_k, self.dtype, **self.shape)
        n_tail = len(tokens) - self.bt * len(keys)
        tail = kv(n_tail, 10_000 + seed, self.dtype, **self.shape) if n_tail else None
        return SavedBranch(tokens, keys, tail)

    def agent(self, agent_id, *token_lists) -> SavedAgent:
        return SavedAgent(agent_id, tuple(self.branch(t, seed=i) for i, t in enumerate(token_lists)))


def prefix(n, start=1000):
    return list(range(start, start + n))


def assert_same_agent(got: SavedAgent, want: SavedAgent) -> None:
    assert got is not None and got.agent_id == want.agent_id
    assert len(got.branches) == len(want.branches)
    for g, w in zip(got.branches, want.branches):
        assert g.tokens == w.tokens and g.block_keys == w.block_keys
        assert (g.tail is None) == (w.tail is None)
        if w.tail is not None:
            assert g.tail.dtype == w.tail.dtype and mx.array_equal(g.tail, w.tail).item()


def assert_blocks_load(store: BlockStore, world: World, keys) -> None:
    keys = list(keys)
    got = store.load_blocks(keys)
    assert set(got) == set(keys)
    for key in keys:
        assert mx.array_equal(got[key], world.blocks[key]).item()


def files_under(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()}


def block_arrays_on_disk(tag_dir: Path) -> list[str]:
    """Every block array name in every segment (read from the headers)."""
    names = []
    for p in sorted((tag_dir / "blocks").glob("*.safetensors")):
        meta, tensors = blockfile.read_header(p)
        names += list(tensors)
    return names


def warnings_from(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def open_store(tmp_path, **kw) -> BlockStore:
    return BlockStore(tmp_path / "kv", TAG, block_tokens=BT, **kw)


def rewrite_metadata(path: Path, edit, reseal: bool) -> None:
    """Rewrite a file with edited metadata (resealed: a valid file that says something else)."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    mx.eval(list(arrays.values()))
    edit(meta)
    if reseal:
        meta.pop("checksum")
        meta = blockfile.seal(meta, arrays)
    path.unlink()
    mx.save_safetensors(str(path), arrays, metadata=meta)


@pytest.fixture
def store(tmp_path) -> BlockStore:
    return open_store(tmp_path)


@pytest.fixture
def world() -> World:
    return World()


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_branches_with_and_without_tails_round_trip_across_a_reopen(tmp_path, dtype):
    world = World(dtype)
    agent = world.agent(
        "agent-1",
        prefix(11),  # 2 blocks + 3-token tail
        prefix(8) + [7, 7, 7, 7],  # 3 blocks (2 shared with branch 0), no tail
        [5, 6],  # no full block: tail only
        [],  # an empty branch
        prefix(75),  # 18 blocks + a tail of 3
    )
    written = open_store(tmp_path).save_agent(agent, world.blocks)
    assert written > 0
    store = open_store(tmp_path)
    got = store.load_agent("agent-1")
    assert_same_agent(got, agent)
    assert_blocks_load(store, world, {k for b in agent.branches for k in b.block_keys})
    assert store.agents() == ["agent-1"]


def test_strided_blocks_and_tails_are_saved_compact(store):
    """Slices of longer buffers (as a cache's valid part is) are written as their own bytes."""
    big = kv(3 * BT, seed=1)
    tokens = tuple(prefix(BT + 3))
    (key,) = keys_of(tokens)
    block, tail = big[:, :, :, BT : 2 * BT, :], big[:, :, :, 5 : 5 + 3, :]
    assert not memoryview(block).c_contiguous and not memoryview(tail).c_contiguous
    agent = SavedAgent("strided", (SavedBranch(tokens, (key,), tail),))
    store.save_agent(agent, {key: block})
    assert_same_agent(store.load_agent("strided"), agent)
    assert mx.array_equal(store.load_blocks([key])[key], block).item()


def test_loaded_arrays_are_usable_on_another_thread(store, world):
    agent = world.agent("threads", prefix(10))
    with ThreadPoolExecutor(1) as pool:
        pool.submit(store.save_agent, agent, world.blocks).result()
        got = pool.submit(store.load_agent, "threads").result()
        blocks = pool.submit(store.load_blocks, got.branches[0].block_keys).result()
    joined = mx.concatenate([*blocks.values(), got.branches[0].tail], axis=3)
    assert joined.shape == (LAYERS, 2, HEADS, 10, DIM)
    want = mx.concatenate([*(world.blocks[k] for k in blocks), agent.branches[0].tail], axis=3)
    assert mx.array_equal(joined, want).item()


def test_a_new_version_replaces_the_old_one(store, world):
    store.save_agent(world.agent("a", prefix(9)), world.blocks)
    newer = world.agent("a", prefix(13), [1, 2])
    store.save_agent(newer, world.blocks)
    assert_same_agent(store.load_agent("a"), newer)


def test_load_of_an_unknown_agent_is_none_without_a_warning(store, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_agent("nobody") is None
        assert store.load_blocks([b"\x01" * 16]) == {}
    assert warnings_from(caplog) == []


@pytest.mark.parametrize(
    "bad_branch",
    [
        SavedBranch((1, 2, 3), (b"\x01" * 16,), None),  # fewer tokens than its blocks
        SavedBranch((1, 2, 3, 4, 5), (b"\x01" * 16,), None),  # a tail token without a tail
        SavedBranch((1, 2, 3, 4), (b"\x01" * 16,), kv(1, 0)),  # a tail for no tail tokens
        SavedBranch((1, 2), (), kv(3, 0)),  # tail length != tail tokens
        SavedBranch((1, 2), (), mx.zeros((LAYERS, HEADS, 2, DIM))),  # not (layers, 2, ...)
        SavedBranch((1, 2), (), kv(2, 0, mx.int32)),
        SavedBranch((-1,), (), kv(1, 0)),
        SavedBranch((), (b"",), None),
    ],
)
def test_inconsistent_branches_are_refused_before_anything_is_written(store, bad_branch):
    with pytest.raises((ValueError, TypeError)):
        store.save_agent(SavedAgent("a", (bad_branch,)), {b"\x01" * 16: kv(BT, 1)})
    assert files_under(store.dir) == {}


def test_blocks_of_the_wrong_shape_are_refused(store, world):
    agent = world.agent("a", prefix(8))
    blocks = {**world.blocks, agent.branches[0].block_keys[1]: kv(BT + 1, 3)}
    with pytest.raises(ValueError):
        store.save_agent(agent, blocks)
    assert files_under(store.dir) == {}


# --------------------------------------------------------------------------- sharing


def test_a_block_shared_by_ten_agents_is_written_once(store, world):
    shared = prefix(12)  # 3 blocks every agent has
    agents = [world.agent(f"agent-{i}", shared + [i] * 6) for i in range(10)]  # + 1 own block + 2-token tail
    block_bytes = world.blocks[agents[0].branches[0].block_keys[0]].nbytes
    written = [store.save_agent(a, world.blocks) for a in agents]
    names = block_arrays_on_disk(store.dir)
    assert len(names) == len(set(names)) == 3 + 10  # every block once
    assert store.stats()["segment_files"] == 10  # one segment per save that had new blocks
    assert store.stats()["blocks_written"] == 13
    # The first save wrote 4 blocks, each later one a single block.
    assert written[0] - written[1] >= 3 * block_bytes
    assert max(written[1:]) - min(written[1:]) < block_bytes
    for a in agents:
        assert_same_agent(store.load_agent(a.agent_id), a)
        assert_blocks_load(store, world, a.branches[0].block_keys)


def test_only_the_missing_blocks_need_to_be_given(store, world):
    store.save_agent(world.agent("first", prefix(8)), world.blocks)
    second = world.agent("second", prefix(12))
    own = second.branches[0].block_keys[2]
    assert [store.has_block(k) for k in second.branches[0].block_keys] == [True, True, False]
    store.save_agent(second, {own: world.blocks[own]})
    assert_same_agent(store.load_agent("second"), second)


def test_a_missing_block_that_is_not_given_writes_nothing(store, world):
    agent = world.agent("a", prefix(12))
    before = files_under(store.dir)
    with pytest.raises(MissingBlocks) as err:
        store.save_agent(agent, {agent.branches[0].block_keys[0]: world.blocks[agent.branches[0].block_keys[0]]})
    assert set(err.value.keys) == set(agent.branches[0].block_keys[1:])
    assert files_under(store.dir) == before
    assert store.load_agent("a") is None


# --------------------------------------------------------------------------- partial damage


def test_a_branch_is_cut_before_its_first_missing_segment(tmp_path, world, caplog):
    store = open_store(tmp_path)
    store.save_agent(world.agent("owner", prefix(8)), world.blocks)  # segment 1: blocks 0-1
    agent = world.agent("cut", prefix(18), prefix(4, start=5000), prefix(6))  # segment 2: blocks 2-3, 5000
    store.save_agent(agent, world.blocks)
    own_segment = (store.dir / "blocks").glob("*.safetensors")
    seg2 = [p for p in own_segment if blockfile.read_header(p)[0]["keys"].count(",") == 2]
    assert len(seg2) == 1
    seg2[0].unlink()  # lost behind the store's back (e.g. by hand)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = open_store(tmp_path).load_agent("cut")
    b0, b2 = agent.branches[0], agent.branches[2]
    # branch 0 keeps its first two blocks (segment 1); branch 1 lost its only block and is left out
    assert [(b.tokens, b.block_keys, b.tail) for b in got.branches] == [
        (b0.tokens[:8], b0.block_keys[:2], None),
        (b2.tokens, b2.block_keys, got.branches[1].tail),
    ]
    assert mx.array_equal(got.branches[1].tail, b2.tail).item()
    assert len(warnings_from(caplog)) == 1 and "cut" in warnings_from(caplog)[0]


def test_a_damaged_segment_is_moved_aside_and_its_blocks_are_absent(tmp_path, world, caplog):
    store = open_store(tmp_path)
    shared = world.agent("shared", prefix(8))
    agent = world.agent("a", prefix(16))
    store.save_agent(shared, world.blocks)
    store.save_agent(agent, world.blocks)
    keys = agent.branches[0].block_keys
    seg = next(p for p in (store.dir / "blocks").iterdir() if keys[3].hex() in blockfile.read_header(p)[0]["keys"])
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0x10  # one bit of the last block's data
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = store.load_blocks(keys)
    assert set(got) == set(keys[:2])  # the healthy segment still serves
    assert seg.with_name(seg.name + ".corrupt").exists() and not seg.exists()
    assert len(warnings_from(caplog)) == 1
    assert not store.has_block(keys[2]) and store.stats()["junk_files"] == 1
    cut = store.load_agent("a")
    assert cut.branches[0].tokens == tuple(prefix(8)) and cut.branches[0].block_keys == keys[:2]


def test_reading_some_blocks_verifies_those_it_reads(store, world, caplog):
    agent = world.agent("a", prefix(12))
    store.save_agent(agent, world.blocks)
    seg = next((store.dir / "blocks").iterdir())
    header_len = int.from_bytes(seg.read_bytes()[:8], "little")
    # Damage exactly one block's data, then ask for only that block.
    with open(seg, "rb") as f:
        header = json.loads(f.read(8 + header_len)[8:])
    victim = agent.branches[0].block_keys[1].hex()
    start = 8 + header_len + header[victim]["data_offsets"][0]
    data = bytearray(seg.read_bytes())
    data[start + 3] ^= 0x01
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_blocks([bytes.fromhex(victim)]) == {}
    assert "checksum mismatch" in warnings_from(caplog)[0]


# --------------------------------------------------------------------------- rejected files


def _saved(tmp_path, world, agent_id="victim") -> tuple[Path, SavedAgent]:
    store = open_store(tmp_path)
    agent = world.agent(agent_id, prefix(10))
    store.save_agent(agent, world.blocks)
    return store.dir / "agents" / file_name(agent_id), agent


def _rejected_at_load(tmp_path, caplog, agent_id="victim", reason=None):
    store = open_store(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_agent(agent_id) is None
    path = store.dir / "agents" / file_name(agent_id)
    assert not path.exists() and path.with_name(path.name + ".corrupt").exists()
    warned = warnings_from(caplog)
    assert len(warned) == 1, warned
    if reason:
        assert reason in warned[0]
    assert agent_id not in store.agents()
    return store


def test_corrupt_agent_file_is_moved_aside_and_its_own_blocks_collected(tmp_path, world, caplog):
    path, agent = _saved(tmp_path, world)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x04  # in the tail's data
    path.write_bytes(bytes(data))
    store = _rejected_at_load(tmp_path, caplog, reason="checksum mismatch")
    assert store.stats()["segment_files"] == 0  # referenced by nobody any more
    assert store.stats()["junk_files"] == 1


@pytest.mark.parametrize("cut", [0, 1, 7, 100, -1, -40])
def test_truncated_agent_files_are_rejected(tmp_path, world, caplog, cut):
    path, _ = _saved(tmp_path, world)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    store = open_store(tmp_path)  # at open, from the header alone
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_agent("victim") is None
    assert path.with_name(path.name + ".corrupt").exists() and not path.exists()


@pytest.mark.parametrize("kind", ["agents", "blocks"])
def test_every_sampled_bit_flip_is_rejected(tmp_path, caplog, kind):
    """Flip one bit at many positions of the agent file or its segment, header included:
    no flip may load (every one is caught at open, at load_agent or at load_blocks)."""
    world = World(layers=1, heads=1, dim=2)
    agent = world.agent("victim", prefix(BT + 3))  # one block in a segment, a 3-token tail
    open_store(tmp_path).save_agent(agent, world.blocks)
    tag_dir = tmp_path / "kv" / TAG
    good = {p: p.read_bytes() for p in tag_dir.rglob("*.safetensors")}
    (path,) = [p for p in good if p.parent.name == kind]
    header_end = 8 + int.from_bytes(good[path][:8], "little")
    positions = sorted(set(range(0, header_end, 3)) | set(range(header_end, len(good[path]), 5)))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for pos in positions:
        for bit in (0x01, 0x80):
            for p in tag_dir.rglob("*.corrupt"):
                p.unlink()
            for p, data in good.items():
                p.write_bytes(data)
            data = bytearray(good[path])
            data[pos] ^= bit
            path.write_bytes(bytes(data))
            caplog.clear()
            store = open_store(tmp_path)
            got = store.load_agent("victim")
            whole = got is not None and got.branches != () and store.load_blocks(agent.branches[0].block_keys)
            assert not whole, f"flip of bit {bit:#x} at byte {pos} of the {kind[:-1]} file was not detected"
            assert warnings_from(caplog)


@pytest.mark.parametrize("edit", ["drop the checksum", "drop the tail array"])
def test_a_file_missing_its_checksum_or_an_array_is_rejected(tmp_path, world, caplog, edit):
    path, _ = _saved(tmp_path, world)
    arrays, meta = mx.load(str(path), return_metadata=True)
    mx.eval(list(arrays.values()))
    if edit == "drop the checksum":
        del meta["checksum"]
    else:
        del arrays["b0.tail"]
    path.unlink()
    mx.save_safetensors(str(path), arrays, metadata=meta)
    _rejected_at_load(tmp_path, caplog, reason="checksum")


def test_delete_removes_the_corrupt_copy_too(tmp_path, world, caplog):
    path, _ = _saved(tmp_path, world)
    path.write_bytes(b"junk")
    store = _rejected_at_load(tmp_path, caplog)
    assert store.stats()["junk_bytes"] == 4  # the .corrupt file still counts
    store.delete_agent("victim")
    assert files_under(store.dir) == {} and store.stats()["used_bytes"] == 0


def test_garbage_and_directory_in_place_of_an_agent_file_are_rejected(tmp_path, world, caplog):
    path, _ = _saved(tmp_path, world)
    store = open_store(tmp_path)
    path.write_bytes(b"not a safetensors file at all")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_agent("victim") is None
        path.mkdir()
        assert store.load_agent("victim") is None
    assert len(warnings_from(caplog)) == 2


def test_wrong_model_tag_is_rejected(tmp_path, world, caplog):
    path, _ = _saved(tmp_path, world)
    rewrite_metadata(path, lambda m: m.update(model_tag="ffff0000"), reseal=True)
    _rejected_at_load(tmp_path, caplog, reason="model tag")


def test_file_of_another_agent_is_rejected(tmp_path, world, caplog):
    path, _ = _saved(tmp_path, world, "alice")
    shutil.copy(path, path.with_name(file_name("bob")))
    _rejected_at_load(tmp_path, caplog, "bob", reason="agent id")
    assert_same_agent(open_store(tmp_path).load_agent("alice"), world.agent("alice", prefix(10)))


@pytest.mark.parametrize("version", ["1", "3", None])
def test_other_format_versions_are_rejected(tmp_path, world, caplog, version):
    path, _ = _saved(tmp_path, world)
    rewrite_metadata(path, lambda m: m.pop("format_version") if version is None else m.update(format_version=version),
                     reseal=True)
    _rejected_at_load(tmp_path, caplog, reason="format_version")


def test_a_metadata_edit_without_the_checksum_is_rejected(tmp_path, world, caplog):
    path, _ = _saved(tmp_path, world)

    def drop_a_token(meta):  # a consistent-looking lie: 9 tokens, 2 blocks, a 1-token tail
        meta["branches"] = meta["branches"].replace('"n_tokens":10', '"n_tokens":9')

    rewrite_metadata(path, drop_a_token, reseal=False)
    _rejected_at_load(tmp_path, caplog)


def test_a_damaged_segment_header_is_moved_aside_at_open(tmp_path, world, caplog):
    _saved(tmp_path, world)
    seg = next((tmp_path / "kv" / TAG / "blocks").iterdir())
    rewrite_metadata(seg, lambda m: m.update(block_tokens="8"), reseal=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store = open_store(tmp_path)
        got = store.load_agent("victim")
    assert got.branches == ()  # every block gone: the branch is left out
    assert seg.with_name(seg.name + ".corrupt").exists()
    assert len(warnings_from(caplog)) == 2  # the segment, then the cut branch


# --------------------------------------------------------------------------- ids and paths


CASE_IDS = ["caps", "CAPS", "Caps", "x" * 128, "X" * 128]


def test_case_colliding_ids_get_their_own_files(store):
    worlds = {a: World() for a in CASE_IDS}
    agents = {a: worlds[a].agent(a, prefix(6, start=i * 100)) for i, a in enumerate(CASE_IDS)}
    for a in CASE_IDS:
        store.save_agent(agents[a], worlds[a].blocks)
    names = sorted(p.name for p in (store.dir / "agents").iterdir())
    assert len({n.lower() for n in names}) == len(CASE_IDS) and all(n == n.lower() for n in names)
    assert store.agents() == sorted(CASE_IDS)
    for a in CASE_IDS:
        assert_same_agent(open_store(store.root.parent).load_agent(a), agents[a])


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".", "..", "x" * 129, "a b", "é", ".hidden", "a\x00b", None, 5])
def test_invalid_agent_ids_never_touch_a_path(store, bad):
    with pytest.raises(InvalidAgentId):
        store.save_agent(SavedAgent(bad, ()), {})
    with pytest.raises(InvalidAgentId):
        store.load_agent(bad)
    with pytest.raises(InvalidAgentId):
        store.delete_agent(bad)
    assert files_under(store.dir) == {}


@pytest.mark.parametrize("bad", ["", "ABC", "a/b", "..", "x" * 65, "tag\n"])
def test_invalid_model_tags_are_refused(tmp_path, bad):
    with pytest.raises(InvalidAgentId):
        BlockStore(tmp_path / "kv", bad)


def test_symlinked_dirs_are_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "kv" / TAG).mkdir(parents=True)
    (tmp_path / "kv" / TAG / "agents").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError):
        open_store(tmp_path)
    (tmp_path / "kv2").mkdir()
    (tmp_path / "kv2" / TAG).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError):
        BlockStore(tmp_path / "kv2", TAG, block_tokens=BT)
    assert list(outside.iterdir()) == []


def test_a_symlinked_agent_file_is_neither_read_nor_written_through(store, world, tmp_path, caplog):
    target = tmp_path / "secret.safetensors"
    target.write_bytes(b"secret")
    (store.dir / "agents" / file_name("a")).symlink_to(target)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_agent("a") is None
    with pytest.raises(ValueError):
        store.save_agent(world.agent("a", prefix(5)), world.blocks)
    assert target.read_bytes() == b"secret"


def test_file_and_dir_modes(tmp_path, world):
    old = os.umask(0o022)
    try:
        store = BlockStore(tmp_path / "deep" / "kv", TAG, block_tokens=BT)
        store.save_agent(world.agent("a", prefix(6)), world.blocks)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for d in (tmp_path / "deep", tmp_path / "deep" / "kv", store.dir, store.dir / "agents", store.dir / "blocks"):
        assert mode(d) == 0o700, d
    assert [mode(p) for p in store.dir.rglob("*.safetensors")] == [0o600, 0o600]


# --------------------------------------------------------------------------- garbage


def test_segments_go_when_the_last_agent_using_them_goes(store, world):
    store.save_agent(world.agent("a", prefix(8)), world.blocks)
    store.save_agent(world.agent("b", prefix(8) + [1, 2, 3]), world.blocks)
    assert store.stats()["segment_files"] == 1
    store.delete_agent("a")
    assert store.stats()["segment_files"] == 1 and store.agents() == ["b"]
    store.delete_agent("b")
    store.delete_agent("never-saved")
    assert files_under(store.dir) == {} and store.stats()["used_bytes"] == 0


def test_a_new_version_collects_the_blocks_only_the_old_one_used(store, world):
    store.save_agent(world.agent("shared", prefix(4)), world.blocks)
    store.save_agent(world.agent("a", prefix(12)), world.blocks)
    assert store.stats()["segment_files"] == 2
    store.save_agent(world.agent("a", prefix(4) + [9] * 4), world.blocks)
    # the old version's own segment (blocks 1-2) went; "shared" still holds block 0's
    names = block_arrays_on_disk(store.dir)
    assert sorted(names) == sorted(k.hex() for k in keys_of(prefix(4)) + keys_of(prefix(4) + [9] * 4)[1:])


def test_orphan_segments_and_dead_temp_files_are_cleaned_at_open(tmp_path, world):
    store = open_store(tmp_path)
    store.save_agent(world.agent("a", prefix(8)), world.blocks)
    store.save_agent(world.agent("b", prefix(16, start=7)), world.blocks)
    (store.dir / "agents" / file_name("b")).unlink()  # as a save killed between its two renames
    dead = store.dir / "blocks" / ".0123.999999999-abcdef.tmp.safetensors"
    live = store.dir / "agents" / f".a.{os.getppid()}-abcdef.tmp.safetensors"
    dead.write_bytes(b"x")
    live.write_bytes(b"y" * 7)
    again = open_store(tmp_path)
    assert again.stats()["segment_files"] == 1 and again.stats()["segments_collected"] == 1
    assert not dead.exists() and live.exists()
    assert again.stats()["used_bytes"] == sum(files_under(again.dir).values())
    assert_blocks_load(again, world, keys_of(prefix(8)))


def test_collect_garbage_removes_what_nobody_references(store, world):
    store.save_agent(world.agent("a", prefix(8)), world.blocks)
    store.save_agent(world.agent("b", prefix(8, start=50)), world.blocks)
    (store.dir / "agents" / file_name("a")).unlink()
    (store.dir / "agents" / file_name("b")).unlink()
    assert store.collect_garbage() == 0  # the index still says "a" and "b" reference them
    assert store.load_agent("a") is None  # found missing: forgotten, its segment collected
    assert store.agents() == ["b"] and store.stats()["segment_files"] == 1
    store.delete_agent("b")
    assert store.stats()["segment_files"] == 0 and files_under(store.dir) == {}
    assert store.stats()["used_bytes"] == 0


def test_the_size_estimate_that_budgets_a_write_bounds_the_file(store, world):
    agent = world.agent("CamelCase-Agent", prefix(75), prefix(6), [1, 2, 3])
    arrays, meta, keys = store.format.agent_file(agent)
    seg_arrays, seg_meta = store.format.segment_file(list(keys), world.blocks)
    written = store.save_agent(agent, world.blocks)
    estimate = blockfile.estimated_size(arrays, meta) + blockfile.estimated_size(seg_arrays, seg_meta)
    assert written <= estimate <= written * 1.25


# --------------------------------------------------------------------------- the index


def test_the_index_matches_the_directory_after_a_reopen(tmp_path, world, monkeypatch):
    store = open_store(tmp_path)
    for i in range(5):
        store.save_agent(world.agent(f"a{i}", prefix(9 + i), [i] * 5), world.blocks)
    store.delete_agent("a3")
    (store.dir / "agents" / "Legacy.safetensors").write_bytes(b"x" * 10)  # no id maps to it: junk
    (store.dir / "notes.txt").write_bytes(b"x" * 40)
    before = {k: v for k, v in store.stats().items() if k not in ("blocks_written", "bytes_written")}
    again = open_store(tmp_path)
    on_disk = sum(files_under(again.dir).values())

    def no_listing(*args, **kwargs):
        raise AssertionError("the directory was listed")

    monkeypatch.setattr(os, "scandir", no_listing)
    monkeypatch.setattr(os, "listdir", no_listing)
    after = again.stats()
    assert again.agents() == ["a0", "a1", "a2", "a4"]
    assert after["used_bytes"] == on_disk  # notes.txt too: counted, kept
    assert after["junk_files"] == 1
    assert after["segment_files"] == before["segment_files"] and after["blocks"] == before["blocks"]
    assert all(again.has_block(k) for k in keys_of(prefix(13)))
    assert again.last_used("a0") == pytest.approx((again.dir / "agents" / "a0.safetensors").stat().st_mtime)
    assert again.last_used("a3") is None


def test_last_used_follows_saves_and_loads(store, world):
    store.save_agent(world.agent("a", prefix(5)), world.blocks)
    store.save_agent(world.agent("b", prefix(5)), world.blocks)
    assert store.last_used("a") <= store.last_used("b")
    time.sleep(0.01)
    store.load_agent("a")
    assert store.last_used("a") > store.last_used("b")


# --------------------------------------------------------------------------- disk budget


def test_budget_evicts_junk_first_then_the_least_recently_used_unpinned_agents(tmp_path, world):
    store = open_store(tmp_path)
    agents = [world.agent(f"a{i}", prefix(8, start=100 * i)) for i in range(4)]
    for a in agents:
        store.save_agent(a, world.blocks)
    per_agent = store.stats()["used_bytes"] // 4
    junk = store.dir / "agents" / "old.safetensors.corrupt"
    junk.write_bytes(b"j" * 100)
    store.load_agent("a0")  # a0 is now the most recently used; a1 the least
    budget = store.stats()["used_bytes"] + 100 + per_agent // 2  # room for half an agent more
    store = open_store(tmp_path, disk_budget_bytes=budget)
    store.load_agent("a0")  # last use: mtimes at open, then this
    store.pinned = lambda: ["a2"]
    store.save_agent(world.agent("new", prefix(8, start=900)), world.blocks)
    assert not junk.exists()
    assert store.agents() == ["a0", "a2", "a3", "new"]  # a1: the least recently used unpinned
    assert store.was_evicted("a1") and not store.was_evicted("a1")
    assert store.stats()["used_bytes"] <= budget
    assert sum(files_under(store.dir).values()) == store.stats()["used_bytes"]
    assert store.stats()["segment_files"] == 4  # a1's segment went with it
    store.save_agent(world.agent("new2", prefix(8, start=1900)), world.blocks)
    assert store.agents() == ["a0", "a2", "new", "new2"]  # a3 next; a2 pinned


def test_budget_refuses_what_cannot_fit_and_removes_nothing(tmp_path, world):
    store = open_store(tmp_path)
    for i in range(2):
        store.save_agent(world.agent(f"a{i}", prefix(8, start=100 * i)), world.blocks)
    used = store.stats()["used_bytes"]
    store = open_store(tmp_path, disk_budget_bytes=used + 10)
    store.pinned = lambda: ["a0", "a1"]
    before = files_under(store.dir)
    with pytest.raises(BudgetExceeded):
        store.save_agent(world.agent("new", prefix(8, start=900)), world.blocks)
    with pytest.raises(BudgetExceeded):
        store.save_agent(world.agent("huge", prefix(4 * 200, start=5000)), world.blocks)
    assert files_under(store.dir) == before and store.stats()["refused"] == 2
    assert store.load_agent("new") is None and store.stats()["used_bytes"] == used


def test_twenty_agents_sharing_a_prefix_stay_under_a_budget_of_a_few_blocks(tmp_path, world):
    shared = prefix(8)  # 2 blocks every agent has
    agents = [world.agent(f"agent-{i:02d}", shared + [i] * 4 + [i, i + 1]) for i in range(20)]
    probe = open_store(tmp_path / "probe")
    probe.save_agent(agents[0], world.blocks)
    one_agent = probe.stats()["used_bytes"]  # shared prefix + own block + agent file
    budget = 4 * one_agent  # 12 blocks' worth: the prefix once plus a handful of agents
    store = open_store(tmp_path, disk_budget_bytes=budget)
    pinned = {"agent-00", "agent-01"}
    store.pinned = lambda: pinned
    for a in agents:
        store.save_agent(a, world.blocks)
        assert sum(files_under(store.dir).values()) <= budget
        assert store.stats()["used_bytes"] == sum(files_under(store.dir).values())
    kept = store.agents()
    assert pinned <= set(kept) and "agent-19" in kept and 4 <= len(kept) < 20
    assert store.stats()["evictions"] == 20 - len(kept)
    for name in kept:
        a = agents[int(name.split("-")[1])]
        assert_same_agent(store.load_agent(name), a)
        assert_blocks_load(store, world, a.branches[0].block_keys)
    names = block_arrays_on_disk(store.dir)
    assert len(names) == len(set(names)) == 2 + len(kept)  # the prefix once, one own block each


# --------------------------------------------------------------------------- threads


def test_two_threads_saving_agents_that_share_blocks(store, world):
    for round_ in range(8):
        shared = prefix(16, start=10_000 * (round_ + 1))
        pair = [world.agent(f"t{round_}-{i}", shared + [i] * 5) for i in range(2)]
        barrier = threading.Barrier(2)

        def save(agent):
            barrier.wait()
            return store.save_agent(agent, world.blocks)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(save, pair))
        for a in pair:
            assert_same_agent(store.load_agent(a.agent_id), a)
            assert_blocks_load(store, world, a.branches[0].block_keys)
    store.collect_garbage()
    names = block_arrays_on_disk(store.dir)
    assert len(names) == len(set(names)) == 8 * (4 + 2)


def test_concurrent_saves_of_one_agent_leave_one_whole_version(store, world):
    versions = [world.agent("busy", prefix(5 + 3 * i, start=100 * i)) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda a: store.save_agent(a, world.blocks), versions))
    got = store.load_agent("busy")
    (winner,) = [v for v in versions if v.branches[0].tokens == got.branches[0].tokens]
    assert_same_agent(got, winner)
    assert_blocks_load(store, world, winner.branches[0].block_keys)
    assert store.agents() == ["busy"] and [p.name for p in (store.dir / "agents").iterdir()] == ["busy.safetensors"]
    names = block_arrays_on_disk(store.dir)  # the losers' own blocks were collected
    assert sorted(names) == sorted(k.hex() for k in winner.branches[0].block_keys)


def test_a_save_waits_for_the_save_writing_its_blocks_instead_of_writing_them_again(store, world, monkeypatch):
    shared = prefix(16)
    first, second = world.agent("first", shared + [1] * 4), world.agent("second", shared + [2] * 4)
    in_fsync, release = stall_fsyncs_of_thread(monkeypatch, "first")
    t = threading.Thread(target=store.save_agent, args=(first, world.blocks), name="first")
    t.start()
    assert in_fsync.wait(10)
    done = threading.Event()
    t2 = threading.Thread(target=lambda: (store.save_agent(second, world.blocks), done.set()))
    t2.start()
    assert not done.wait(0.3)  # waiting for "first"'s segment
    release.set()
    t.join(10)
    t2.join(10)
    assert done.is_set()
    names = block_arrays_on_disk(store.dir)
    assert len(names) == len(set(names)) == 4 + 2
    assert_same_agent(store.load_agent("second"), second)


def test_when_the_writer_of_shared_blocks_fails_the_waiting_save_writes_them(store, world, monkeypatch):
    shared = prefix(16)
    first, second = world.agent("first", shared + [1] * 4), world.agent("second", shared + [2] * 4)
    in_fsync, release = stall_fsyncs_of_thread(monkeypatch, "first", then_fail=True)
    errors = []
    t = threading.Thread(target=lambda: _catch(errors, store.save_agent, first, world.blocks), name="first")
    t.start()
    assert in_fsync.wait(10)
    t2 = threading.Thread(target=store.save_agent, args=(second, world.blocks))
    t2.start()
    time.sleep(0.2)
    release.set()
    t.join(10)
    t2.join(10)
    assert [type(e) for e in errors] == [OSError]
    assert store.load_agent("first") is None
    assert_same_agent(store.load_agent("second"), second)
    assert_blocks_load(store, world, second.branches[0].block_keys)
    assert not [p for p in store.dir.rglob("*") if ".tmp." in p.name]


def stall_fsyncs_of_thread(monkeypatch, name: str, then_fail: bool = False) -> tuple[threading.Event, threading.Event]:
    """Every fsync on the thread called `name` sets the first event and waits for the
    second (then fails with EIO if `then_fail`); other threads' fsyncs are untouched."""
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync = cachestore.fsync

    def stalling_fsync(fd):
        if threading.current_thread().name == name:
            in_fsync.set()
            release.wait(10)
            if then_fail:
                raise OSError(5, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(cachestore, "fsync", stalling_fsync)
    return in_fsync, release


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - collected for the assertion
        errors.append(e)


# --------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("failing", ["blocks", "agents"])
def test_a_failed_rename_keeps_the_old_version_and_leaves_nothing_behind(store, world, monkeypatch, failing):
    """The new segment's rename fails, or the agent file's (its segment is then an orphan)."""
    old = world.agent("victim", prefix(9))
    store.save_agent(old, world.blocks)
    before = files_under(store.dir)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).parent.name == failing and ".tmp." in Path(src).name:
            raise OSError("simulated crash before rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        store.save_agent(world.agent("victim", prefix(9) + prefix(8, start=50)), world.blocks)
    monkeypatch.undo()
    assert files_under(store.dir) == before
    assert_same_agent(store.load_agent("victim"), old)
    assert_blocks_load(store, world, old.branches[0].block_keys)
    assert_same_agent(open_store(store.root.parent).load_agent("victim"), old)


# --------------------------------------------------------------------------- kill -9


_WRITER = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    import actors
    import mlx.core as mx
    from actors import cachestore
    from actors.blockstore import BlockStore, SavedAgent, SavedBranch

    root, version, stall_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if stall_at:
        calls = [0]
        real = cachestore.fsync

        def stalling(fd):
            calls[0] += 1
            if calls[0] == stall_at:
                print("stalled", 0, flush=True)
                threading.Event().wait(60)
            real(fd)

        cachestore.fsync = stalling
    store = BlockStore(root, "tag")
    shape = (8, 2, 4, 64, 64)  # 1 MiB a block: a save of 8 new blocks takes ~20-50 ms
    shared = [bytes([1, i]) * 8 for i in range(4)]

    def block(key):
        return mx.full(shape, float(key[1] + 256 * key[0]))

    while True:
        own = [bytes([2 + version % 200, i]) + version.to_bytes(14, "little") for i in range(4)]
        blocks = {k: block(k) for k in shared + own}
        tail = mx.full((8, 2, 4, 10, 64), float(version))
        mx.eval(list(blocks.values()) + [tail])
        branch = SavedBranch(tuple([version] * (64 * 8 + 10)), tuple(shared + own), tail)
        print("start", version, flush=True)
        store.save_agent(SavedAgent("crashy", (branch,)), blocks)
        print("done", version, flush=True)
        version += 1
    """
)


def _kill_mid_save(script: Path, root: Path, version: int, delay: float | None, stall_at: int):
    """Run the writer and SIGKILL it: `delay` s after it starts its 2nd save, or (delay
    None) while its first save is stalled in its `stall_at`-th fsync.
    Returns (last save done, last save started)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root), str(version), str(stall_at if delay is None else 0)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    events = []
    try:
        while True:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            what, v = line.split()
            events.append((what, int(v)))
            if what == "stalled":
                break
            if what == "start" and delay is not None and any(w == "done" for w, _ in events):
                time.sleep(delay)
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL, err
    events += [(w, int(v)) for w, v in (line.split() for line in out.splitlines())]
    done = [v for w, v in events if w == "done"]
    started = [v for w, v in events if w == "start"]
    return (done[-1] if done else None), started[-1]


def _check_whole(store: BlockStore, allowed: set) -> int:
    """The agent loads whole, at one of the `allowed` versions, with every block it references."""
    got = store.load_agent("crashy")
    assert got is not None
    (branch,) = got.branches
    v = branch.tokens[0]
    assert v in allowed and branch.tokens == (v,) * (64 * 8 + 10)
    assert mx.all(branch.tail == v).item()
    blocks = store.load_blocks(branch.block_keys)
    assert list(blocks) == list(branch.block_keys)
    for key, block in blocks.items():
        assert mx.all(block == float(key[1] + 256 * key[0])).item()
    assert [int.from_bytes(k[2:], "little") for k in branch.block_keys[4:]] == [v] * 4
    return v


def test_sigkill_inside_save_agent_leaves_a_whole_agent_and_its_blocks(tmp_path, caplog):
    """SIGKILL a process that saves in a loop, at 2 forced and 10 timed points inside
    save_agent. Every time the agent loads whole (the old or the new version) with every
    block it references, and the next open removes orphan segments and temp files."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    root = tmp_path / "kv"
    caplog.set_level(logging.WARNING, logger=LOGGER)
    # Stalled in fsync #1: the new segment's temp file; #3: the agent's temp file, after
    # the new segment was renamed into place (an orphan once the writer dies).
    plans = [(0.0, 0), (None, 1), (None, 3)] + [(0.004 * i, 0) for i in range(1, 10)]
    version, on_disk, torn = 1, None, []
    for delay, stall_at in plans:
        done, started = _kill_mid_save(script, root, version, delay, stall_at)
        torn.append(sum(".tmp." in p.name for p in (root / "tag").rglob("*")))
        store = BlockStore(root, "tag")
        if delay is None:
            assert done is None
            assert _check_whole(store, {on_disk}) == on_disk  # the old version stands
        else:
            on_disk = _check_whole(store, {done, started})
        names = sorted(p.name for p in (root / "tag").rglob("*") if p.is_file())
        assert len(names) == 1 + store.stats()["segment_files"], names  # nothing else is left
        if stall_at == 3:
            assert store.stats()["segments_collected"] == 1  # the dead writer's renamed segment
        version = started + 1
    assert warnings_from(caplog) == []
    assert torn[1:3] == [1, 1]  # the forced kills left a temp file each, swept by the next open
    print(f"kills that left a temp file behind: {sum(torn)}/{len(plans)}")


# --------------------------------------------------------------------------- real shapes


def test_real_shapes_round_trip(tmp_path):
    """SmolLM2-135M's cache: 30 layers, 3 kv heads, head dim 64, 64-token blocks."""
    world = World(mx.bfloat16, bt=64, layers=30, heads=3, dim=64)
    store = BlockStore(tmp_path / "kv", TAG)
    agent = world.agent("real", prefix(2 * 64 + 10), prefix(64) + [5] * 3)
    store.save_agent(agent, world.blocks)
    store = BlockStore(tmp_path / "kv", TAG)
    assert_same_agent(store.load_agent("real"), agent)
    blocks = store.load_blocks(agent.branches[0].block_keys)
    assert [b.shape for b in blocks.values()] == [(30, 2, 3, 64, 64)] * 2
    assert_blocks_load(store, world, agent.branches[0].block_keys)
    assert store.stats()["blocks"] == 2 and store.stats()["segment_files"] == 1


# --------------------------------------------------------------------------- costs


@pytest.mark.bench
def test_bench_costs(tmp_path):
    """Costs at SmolLM2-135M's shapes, float32 (2.9 MB a block), page cache warm.

    Run: .venv/bin/python -m pytest tests/unit/test_blockstore.py -m bench -s"""
    world = World(mx.float32, bt=64, layers=30, heads=3, dim=64)
    store = BlockStore(tmp_path / "kv", TAG)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    first = world.agent("first", prefix(2000))  # 31 blocks + 16-token tail
    t_cold, n_cold = timed(lambda: store.save_agent(first, world.blocks))
    second = world.agent("second", prefix(1600) + prefix(400, start=90_000))  # 25 blocks shared
    t_warm, n_warm = timed(lambda: store.save_agent(second, world.blocks))
    assert store.stats()["blocks_written"] == 31 + 6
    keys = list(second.branches[0].block_keys) + list(first.branches[0].block_keys[25:26])
    t_load, got = timed(lambda: store.load_blocks(keys))
    assert len(got) == 32
    t_agent, _ = timed(lambda: store.load_agent("second"))

    small = World(mx.float32, bt=64, layers=2, heads=1, dim=4)  # headers as big, data tiny
    root = tmp_path / "many"
    many = BlockStore(root, TAG)
    for i in range(200):
        branches = [prefix(1536) + prefix(464 + j, start=10_000 * i + 100 * j) for j in range(4)]
        many.save_agent(small.agent(f"agent-{i}", *branches), small.blocks)
    t_open, reopened = timed(lambda: BlockStore(root, TAG))
    assert len(reopened.agents()) == 200
    print(
        f"\nsave 2k-token agent, 0 blocks stored: {t_cold * 1e3:.0f} ms ({n_cold / 1e6:.0f} MB)"
        f"\nsave 2k-token agent, 25 blocks stored: {t_warm * 1e3:.0f} ms ({n_warm / 1e6:.0f} MB)"
        f"\nload_blocks of 32 blocks ({sum(b.nbytes for b in got.values()) / 1e6:.0f} MB): {t_load * 1e3:.0f} ms"
        f"\nload_agent (tail only): {t_agent * 1e3:.1f} ms"
        f"\nopen with 200 agent files (4 branches, 31 blocks each) + {reopened.stats()['segment_files']}"
        f" segments: {t_open * 1e3:.0f} ms"
    )
