"""Tests for actors.cachestore: real files under tmp_path, small random caches."""

from __future__ import annotations

import asyncio
import logging
import os
import random
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
import numpy as np
from mlx_lm.models.cache import KVCache

from actors import cachestore
from actors.cachestore import (
    FORMAT_VERSION,
    CacheSnapshot,
    CacheStore,
    InvalidAgentId,
    cache_from_snapshot,
    snapshot_from_cache,
    validate_agent_id,
    validate_model_tag,
)

REPO = Path(__file__).resolve().parents[2]
TAG = "0a1b2c3d"
N_LAYERS, HEADS, DIM, T = 4, 2, 16, 10
LOGGER = "greenroom.cachestore"


def make_snapshot(agent="agent-1", tag=TAG, n_tokens=T, dtype=mx.float32, seed=0,
                  n_layers=N_LAYERS, heads=HEADS, dim=DIM) -> CacheSnapshot:
    key = mx.random.key(seed)
    layers = []
    for i in range(n_layers):
        k1, k2, key = mx.random.split(key, 3)
        k = mx.random.normal((1, heads, n_tokens, dim), key=k1).astype(dtype)
        v = mx.random.normal((1, heads, n_tokens, dim), key=k2).astype(dtype)
        layers.append((k, v))
    mx.eval(layers)
    tokens = tuple(random.Random(seed).randrange(0, 50_000) for _ in range(n_tokens))
    return CacheSnapshot(agent, tag, tokens, tuple(layers))


def assert_snap_equal(a: CacheSnapshot, b: CacheSnapshot) -> None:
    assert (a.agent_id, a.model_tag, a.tokens) == (b.agent_id, b.model_tag, b.tokens)
    assert len(a.layers) == len(b.layers)
    for (ka, va), (kb, vb) in zip(a.layers, b.layers):
        for x, y in ((ka, kb), (va, vb)):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert mx.array_equal(x, y).item()


def warnings_from(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.fixture
def store(tmp_path) -> CacheStore:
    return CacheStore(tmp_path / "kv")


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_round_trip(store, dtype):
    snap = make_snapshot(dtype=dtype)
    written = store.save(snap)
    path = store.path_for(snap.agent_id, TAG)
    assert written == path.stat().st_size > snap.nbytes
    got = store.load(snap.agent_id, TAG)
    assert got is not None
    assert_snap_equal(snap, got)
    assert got.nbytes == snap.nbytes
    assert isinstance(got.tokens, tuple) and all(type(t) is int for t in got.tokens)


def test_file_is_plain_safetensors_with_expected_layout(store):
    snap = make_snapshot()
    store.save(snap)
    arrays, meta = mx.load(str(store.path_for(snap.agent_id, TAG)), return_metadata=True)
    assert set(arrays) == {"tokens"} | {f"l{i}.{c}" for i in range(N_LAYERS) for c in "kv"}
    assert arrays["tokens"].dtype == mx.int32 and arrays["tokens"].tolist() == list(snap.tokens)
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert (meta["model_tag"], meta["agent_id"]) == (TAG, snap.agent_id)
    assert (meta["n_layers"], meta["n_tokens"]) == (str(N_LAYERS), str(T))
    assert meta["checksum"].startswith("crc32:")


def test_save_overwrites_previous_version(store):
    store.save(make_snapshot(seed=1))
    newer = make_snapshot(seed=2, n_tokens=7)
    store.save(newer)
    assert_snap_equal(newer, store.load(newer.agent_id, TAG))
    assert [p.name for p in store.path_for("agent-1", TAG).parent.iterdir()] == ["agent-1.safetensors"]


def test_empty_token_list_round_trips(store):
    snap = make_snapshot(n_tokens=0)
    store.save(snap)
    got = store.load(snap.agent_id, TAG)
    assert got is not None and got.tokens == () and got.layers[0][0].shape == (1, HEADS, 0, DIM)


def test_load_absent_returns_none_silently(store, caplog):
    assert store.load("nobody", TAG) is None
    assert warnings_from(caplog) == []


def test_save_rejects_inconsistent_snapshot(store):
    snap = make_snapshot()
    with pytest.raises(ValueError):
        store.save(CacheSnapshot(snap.agent_id, TAG, snap.tokens[:-1], snap.layers))
    bad = mx.zeros((1, HEADS, T, DIM), dtype=mx.int32)
    with pytest.raises(ValueError):
        store.save(CacheSnapshot(snap.agent_id, TAG, snap.tokens, ((bad, bad),)))
    with pytest.raises(ValueError):
        store.save(CacheSnapshot(snap.agent_id, TAG, (-1,) + snap.tokens[1:], snap.layers))


def test_save_compacts_strided_arrays(store):
    big = mx.random.normal((1, HEADS, 32, DIM))
    mx.eval(big)
    layer = (big[:, :, :T, :], big[:, :, 5 : 5 + T, :])
    snap = CacheSnapshot("strided", TAG, tuple(range(T)), (layer,))
    store.save(snap)
    assert_snap_equal(snap, store.load("strided", TAG))


# --------------------------------------------------------------------------- KVCache glue


def filled_cache(n_tokens: int, seed: int = 0) -> tuple[list[KVCache], list[tuple[mx.array, mx.array]]]:
    mx.random.seed(seed)
    caches, full = [], []
    for _ in range(N_LAYERS):
        c = KVCache()
        k = mx.random.normal((1, HEADS, n_tokens, DIM))
        v = mx.random.normal((1, HEADS, n_tokens, DIM))
        # two chunks, like prefill followed by a decode step
        c.update_and_fetch(k[:, :, :-1, :], v[:, :, :-1, :])
        c.update_and_fetch(k[:, :, -1:, :], v[:, :, -1:, :])
        caches.append(c)
        full.append((k, v))
    mx.eval([c.state[:2] for c in caches], full)
    return caches, full


def test_snapshot_from_cache_slices_to_offset():
    caches, full = filled_cache(T)
    assert caches[0].keys.shape[2] > T  # mlx-lm over-allocates in steps of 256
    snap = snapshot_from_cache("a", TAG, list(range(T)), caches)
    assert snap.tokens == tuple(range(T)) and len(snap.layers) == N_LAYERS
    for (k, v), (fk, fv) in zip(snap.layers, full):
        assert k.shape == v.shape == (1, HEADS, T, DIM)
        assert mx.array_equal(k, fk).item() and mx.array_equal(v, fv).item()
        assert memoryview(k).c_contiguous
    assert snap.nbytes == N_LAYERS * 2 * HEADS * T * DIM * 4 + 4 * T


def test_snapshot_from_cache_rejects_offset_mismatch():
    caches, _ = filled_cache(T)
    with pytest.raises(ValueError, match="offset"):
        snapshot_from_cache("a", TAG, list(range(T - 1)), caches)
    with pytest.raises(ValueError):
        snapshot_from_cache("a", TAG, [], [KVCache()])
    with pytest.raises(InvalidAgentId):
        snapshot_from_cache("../a", TAG, list(range(T)), caches)


def test_rebuilt_cache_trims_and_extends(store):
    caches, full = filled_cache(T)
    store.save(snapshot_from_cache("a", TAG, list(range(T)), caches))
    snap = store.load("a", TAG)
    rebuilt = cache_from_snapshot(snap)
    assert [c.offset for c in rebuilt] == [T] * N_LAYERS

    mx.random.seed(7)
    new_k = mx.random.normal((1, HEADS, 2, DIM))
    new_v = mx.random.normal((1, HEADS, 2, DIM))
    for c, (fk, fv) in zip(rebuilt, full):
        assert c.is_trimmable() and c.trim(3) == 3 and c.offset == T - 3
        k, v = c.update_and_fetch(new_k, new_v)  # fits in the existing buffer
        assert k.shape == (1, HEADS, T - 1, DIM)
        assert mx.array_equal(k, mx.concatenate([fk[:, :, : T - 3, :], new_k], axis=2)).item()
        assert mx.array_equal(v, mx.concatenate([fv[:, :, : T - 3, :], new_v], axis=2)).item()
        k, v = c.update_and_fetch(new_k, new_v)  # grows past the loaded buffer
        assert c.offset == T + 1
        want_k = mx.concatenate([fk[:, :, : T - 3, :], new_k, new_k], axis=2)
        assert mx.array_equal(k, want_k).item()
    # extending the rebuilt caches must not write through into the snapshot
    for (k, v), (fk, fv) in zip(snap.layers, full):
        assert mx.array_equal(k, fk).item() and mx.array_equal(v, fv).item()


# --------------------------------------------------------------------------- damaged files


def _saved(store, agent="victim") -> tuple[CacheSnapshot, Path]:
    snap = make_snapshot(agent=agent)
    store.save(snap)
    return snap, store.path_for(agent, TAG)


def _expect_rejected(store, path, caplog, agent="victim", tag=TAG, reason=None, moved=True):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load(agent, tag) is None
    recs = warnings_from(caplog)
    assert len(recs) == 1, [r.getMessage() for r in recs]
    msg = recs[0].getMessage()
    assert str(path) in msg and "\n" not in msg
    if reason:
        assert reason in msg
    if not moved:
        return
    assert not path.exists()
    assert path.with_name(path.name + ".corrupt").exists()
    # moved aside: the next load is a silent cold start
    caplog.clear()
    assert store.load(agent, tag) is None and warnings_from(caplog) == []


def test_truncated_file_rejected(store, caplog):
    _, path = _saved(store)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_rejected(store, path, caplog)


@pytest.mark.parametrize("cut", [0, 4, 8, 100, -1])
def test_other_truncations_rejected(store, caplog, cut):
    _, path = _saved(store)
    data = path.read_bytes()
    path.write_bytes(data[: cut % len(data)])
    _expect_rejected(store, path, caplog)


def test_bit_flip_in_middle_rejected(store, caplog):
    _, path = _saved(store)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    _expect_rejected(store, path, caplog, reason="checksum mismatch")


def test_every_sampled_bit_flip_rejected(tmp_path, caplog):
    """Flip one bit at many positions, header included: no flip may load."""
    store = CacheStore(tmp_path / "kv")
    snap = make_snapshot(agent="victim", n_layers=2, heads=1, dim=4, n_tokens=3)
    store.save(snap)
    path = store.path_for("victim", TAG)
    good = path.read_bytes()
    header_len = 8 + int.from_bytes(good[:8], "little")
    positions = sorted(set(range(0, header_len, 3)) | set(range(header_len, len(good), 5)))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for pos in positions:
        for bit in (0x01, 0x80):
            data = bytearray(good)
            data[pos] ^= bit
            path.write_bytes(bytes(data))
            got = store.load("victim", TAG)
            if got is not None:  # a flip in JSON whitespace padding could be harmless
                assert_snap_equal(snap, got)
                pytest.fail(f"flip of bit {bit:#x} at byte {pos} was not detected")
    assert len(warnings_from(caplog)) == 2 * len(positions)


def test_garbage_file_rejected(store, caplog):
    path = store.path_for("victim", TAG)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(4096))
    _expect_rejected(store, path, caplog)


def test_empty_file_and_directory_rejected(store, caplog):
    path = store.path_for("victim", TAG)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    _expect_rejected(store, path, caplog)
    path.mkdir()  # a directory cannot replace the existing .corrupt file: stays put
    _expect_rejected(store, path, caplog, reason="not a regular file", moved=False)


def _resave_with(path: Path, **changes) -> None:
    arrays, meta = mx.load(str(path), return_metadata=True)
    meta.update(changes)
    mx.save_safetensors(str(path), arrays, metadata=meta)


def test_other_format_version_rejected(store, caplog):
    _, path = _saved(store)
    _resave_with(path, format_version=str(FORMAT_VERSION + 1))
    _expect_rejected(store, path, caplog, reason="format_version")


def test_metadata_edit_breaks_checksum(store, caplog):
    _, path = _saved(store)
    _resave_with(path, n_tokens=str(T))  # unchanged: still loads
    assert store.load("victim", TAG) is not None
    arrays, meta = mx.load(str(path), return_metadata=True)
    arrays["tokens"] = mx.array(np.asarray(arrays["tokens"]) + 1)
    mx.save_safetensors(str(path), arrays, metadata=meta)
    _expect_rejected(store, path, caplog, reason="checksum mismatch")


def test_missing_metadata_rejected(store, caplog):
    _, path = _saved(store)
    arrays, meta = mx.load(str(path), return_metadata=True)
    del meta["checksum"]
    mx.save_safetensors(str(path), arrays, metadata=meta)
    _expect_rejected(store, path, caplog)


def test_wrong_model_tag_rejected(store, caplog):
    _, src = _saved(store)
    dst = store.path_for("victim", "other-tag")
    dst.parent.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(src, dst)
    _expect_rejected(store, dst, caplog, tag="other-tag", reason="model tag")
    assert store.load("victim", TAG) is not None  # the original is untouched


def test_wrong_agent_id_rejected(store, caplog):
    _, src = _saved(store)
    dst = store.path_for("impostor", TAG)
    shutil.copy(src, dst)
    _expect_rejected(store, dst, caplog, agent="impostor", reason="agent id")


def test_layer_count_mismatch_rejected(store, caplog):
    _, path = _saved(store)
    arrays, meta = mx.load(str(path), return_metadata=True)
    del arrays[f"l{N_LAYERS - 1}.k"], arrays[f"l{N_LAYERS - 1}.v"]
    mx.save_safetensors(str(path), arrays, metadata=meta)
    _expect_rejected(store, path, caplog, reason="n_layers")


# --------------------------------------------------------------------------- atomicity


def test_failed_replace_keeps_old_file_and_no_temp(store, monkeypatch):
    old, path = _saved(store)

    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(cachestore.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        store.save(make_snapshot(agent="victim", seed=5))
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert_snap_equal(old, store.load("victim", TAG))


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import actors
    import mlx.core as mx
    from actors.cachestore import CacheSnapshot, CacheStore

    if sys.argv[3] == "stall-in-fsync":  # deterministic: die with the temp file written, not renamed
        import time
        from actors import cachestore

        def stalled_fsync(fd):
            print("in-fsync", 0, flush=True)
            time.sleep(60)

        cachestore._fsync = stalled_fsync
    store = CacheStore(Path(sys.argv[1]))
    n_layers, heads, t, dim = 8, 4, 256, 64   # 8 MiB per file: a save takes ~10-30 ms
    version = int(sys.argv[2])
    while True:
        layers = tuple(
            (mx.full((1, heads, t, dim), float(version)), mx.full((1, heads, t, dim), -float(version)))
            for _ in range(n_layers)
        )
        mx.eval(layers)
        print("start", version, flush=True)
        store.save(CacheSnapshot("crashy", "tag", (version,) * t, layers))
        print("done", version, flush=True)
        version += 1
    """
)


def _kill_mid_save(script: Path, root: Path, version: int, delay: float | None) -> tuple[int, int]:
    """Run the writer, SIGKILL it `delay` s after it starts its 2nd save
    (delay None: on its first save, while that save is stalled in fsync).

    Returns (last completed version, version that was in flight)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root), str(version), "stall-in-fsync" if delay is None else "-"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    done = in_flight = None
    try:
        while True:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            what, v = line.split()
            if what == "done":
                done = int(v)
            elif what == "in-fsync":
                break
            elif delay is None:
                in_flight = int(v)
            elif done is not None and done >= version:
                in_flight = int(v)
                time.sleep(delay)
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL, err
    for line in out.splitlines():  # what it managed to do before the signal landed
        what, v = line.split()
        if what == "done":
            done = int(v)
        elif what == "start":
            in_flight = int(v)
    return done, in_flight


def test_sigkill_during_save_never_leaves_a_torn_file(tmp_path, caplog):
    """SIGKILL a process that saves in a loop, at various points inside save().

    The file must always load as one complete version; a dead writer's temp
    file is swept by the next CacheStore."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    root = tmp_path / "kv"
    caplog.set_level(logging.WARNING, logger=LOGGER)
    version, torn_temp_seen = 0, 0
    root.mkdir()
    # Round 0: an older complete file exists; the writer dies after writing its
    # temp file, before the rename. Then random points (~0.15 s per process).
    CacheStore(root).save(CacheSnapshot("crashy", "tag", (7,) * 256, tuple(
        (mx.full((1, 4, 256, 64), 7.0), mx.full((1, 4, 256, 64), -7.0)) for _ in range(8))))
    version = 8
    delays = [None] + [i * 0.0025 for i in range(10)]
    for delay in delays:
        done, in_flight = _kill_mid_save(script, root, version, delay)
        if delay is None:
            assert done is None and in_flight == 8
            done = 7
        names = sorted(p.name for p in (root / "tag").iterdir())
        torn_temp_seen += any(".tmp." in n for n in names)
        if delay is None:
            assert torn_temp_seen == 1, names
        store = CacheStore(root)  # sweeps the dead writer's temp file
        snap = store.load("crashy", "tag")
        assert snap is not None, [r.getMessage() for r in caplog.records]
        v = snap.tokens[0]
        # the last completed save, or the one in flight if its rename landed
        assert v in (done, in_flight) and snap.tokens == (v,) * 256
        for k, val in snap.layers:
            assert mx.all(k == v).item() and mx.all(val == -v).item()
        assert [p.name for p in (root / "tag").iterdir()] == ["crashy.safetensors"]
        if delay is None:
            assert v == 7  # the old version survived
        version = max(done, in_flight or 0) + 1000
    assert warnings_from(caplog) == []
    print(f"kills that left a temp file behind: {torn_temp_seen}/{len(delays)}")


def test_sweep_keeps_live_writers_temp_files(tmp_path):
    d = tmp_path / "kv" / TAG
    d.mkdir(parents=True)
    live = d / f".a.{os.getppid()}-abcdef.tmp.safetensors"
    dead = d / ".a.999999999-abcdef.tmp.safetensors"
    live.write_bytes(b"x")
    dead.write_bytes(b"x")
    CacheStore(tmp_path / "kv")
    assert live.exists() and not dead.exists()


# --------------------------------------------------------------------------- ids and paths


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "", ".", "..", "x" * 129, "a b", "é", ".hidden", "a\nb", "a\x00b", "a\\b", None, 5]
)
def test_invalid_agent_ids(store, bad):
    with pytest.raises(InvalidAgentId):
        validate_agent_id(bad)
    with pytest.raises(InvalidAgentId):
        store.path_for(bad, TAG)
    with pytest.raises(InvalidAgentId):
        store.load(bad, TAG)
    with pytest.raises(InvalidAgentId):
        store.delete(bad, TAG)


@pytest.mark.parametrize("bad", ["", "ABC", "a/b", "..", "x" * 65, "a_b", "tag\n", "é"])
def test_invalid_model_tags(store, bad):
    with pytest.raises(InvalidAgentId):
        validate_model_tag(bad)
    with pytest.raises(InvalidAgentId):
        store.path_for("a", bad)
    with pytest.raises(InvalidAgentId):
        store.list_agents(bad)


@pytest.mark.parametrize("good", ["a", "A.b_c-1", "x" * 128, "x..y", "-dash", "0"])
def test_valid_agent_ids_stay_inside_root(store, tmp_path, good):
    assert validate_agent_id(good) == good
    p = store.path_for(good, TAG)
    root = (tmp_path / "kv").resolve()
    assert p.resolve().parent == root / TAG and p.name == cachestore.file_stem(good) + ".safetensors"
    assert cachestore.agent_for_stem(cachestore.file_stem(good)) == good


def test_symlinked_tag_dir_outside_root_is_refused(store, tmp_path, caplog):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "kv" / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError):
        store.path_for("a", "evil")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load("a", "evil") is None
    assert len(warnings_from(caplog)) == 1
    with pytest.raises(ValueError):
        store.save(make_snapshot(agent="a", tag="evil"))
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------- modes


def test_file_and_dir_modes(tmp_path):
    old = os.umask(0o022)
    try:
        store = CacheStore(tmp_path / "deep" / "kv")
        store.save(make_snapshot())
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "deep") == 0o700
    assert mode(tmp_path / "deep" / "kv") == 0o700
    assert mode(tmp_path / "deep" / "kv" / TAG) == 0o700
    assert mode(store.path_for("agent-1", TAG)) == 0o600


# --------------------------------------------------------------------------- housekeeping


def test_list_delete_and_disk_usage(store):
    assert store.list_agents(TAG) == [] and store.nbytes_on_disk(TAG) == 0
    sizes = [store.save(make_snapshot(agent=a)) for a in ("b-agent", "a-agent")]
    store.save(make_snapshot(agent="x", tag="other"))
    assert store.list_agents(TAG) == ["a-agent", "b-agent"]
    assert store.list_agents("other") == ["x"]
    assert store.nbytes_on_disk(TAG) == sum(sizes)
    store.delete("b-agent", TAG)
    store.delete("never-saved", TAG)
    assert store.list_agents(TAG) == ["a-agent"]
    assert store.load("b-agent", TAG) is None
    assert store.nbytes_on_disk(TAG) == sizes[1]


def test_delete_removes_corrupt_copy(store, caplog):
    _, path = _saved(store)
    path.write_bytes(b"junk")
    assert store.load("victim", TAG) is None
    assert store.nbytes_on_disk(TAG) == 4  # the .corrupt file still counts
    assert store.list_agents(TAG) == []
    store.delete("victim", TAG)
    assert list(path.parent.iterdir()) == []


# --------------------------------------------------------------------------- threads


def test_save_and_load_across_threads(store):
    built = {}

    def build():  # arrays created and evaluated on a thread of their own
        caches, _ = filled_cache(T, seed=3)
        built["snap"] = snapshot_from_cache("threaded", TAG, list(range(T)), caches)

    t = threading.Thread(target=build)
    t.start()
    t.join()
    snap = built["snap"]
    with ThreadPoolExecutor(2) as pool:
        assert pool.submit(store.save, snap).result() > 0
        got = pool.submit(store.load, "threaded", TAG).result()
    # arrays loaded on a pool thread are usable on this thread
    assert got is not None
    total = sum(mx.sum(k).item() + mx.sum(v).item() for k, v in got.layers)
    want = sum(mx.sum(k).item() + mx.sum(v).item() for k, v in snap.layers)
    assert total == pytest.approx(want)
    caches = cache_from_snapshot(got)
    k, _ = caches[0].update_and_fetch(mx.ones((1, HEADS, 1, DIM)), mx.ones((1, HEADS, 1, DIM)))
    assert mx.sum(k[:, :, -1, :]).item() == HEADS * DIM


async def test_save_and_load_via_event_loop_executor(store):
    loop = asyncio.get_running_loop()
    snap = make_snapshot(agent="async")
    await loop.run_in_executor(None, store.save, snap)
    got = await loop.run_in_executor(None, store.load, "async", TAG)
    assert_snap_equal(snap, got)


def test_concurrent_saves_of_one_agent_leave_a_whole_file(store):
    snaps = [make_snapshot(agent="busy", seed=s, n_tokens=5 + s) for s in range(6)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(store.save, snaps))
    got = store.load("busy", TAG)
    assert got is not None and any(got.tokens == s.tokens for s in snaps)
    assert store.list_agents(TAG) == ["busy"]
    assert len(list(store.path_for("busy", TAG).parent.iterdir())) == 1


# --------------------------------------------------------------------------- benchmark


@pytest.mark.bench
def test_bench_default_model_sized_cache(tmp_path):
    """~92 MB: 2,000 tokens x 30 layers x 3 kv heads x 64 dims, float32.

    Run: .venv/bin/pytest tests/unit/test_cachestore.py -m bench -s
    """
    store = CacheStore(tmp_path / "kv")
    snap = make_snapshot(agent="bench", n_tokens=2000, n_layers=30, heads=3, dim=64)
    path = store.path_for("bench", TAG)

    def drop_page_cache():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def best(fn, n=5, cold=False):
        times = []
        for _ in range(n):
            if cold:
                drop_page_cache()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times), sorted(times)[n // 2]

    def plain_read():
        with open(path, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass

    size = store.save(snap)
    mb = size / 1e6
    rows = [("save (hash + write + fsync + rename)", best(lambda: store.save(snap)))]
    for cold in (False, True):
        tag = "cold" if cold else "warm"
        if cold and not hasattr(os, "posix_fadvise"):
            continue
        rows.append((f"load, page cache {tag}", best(lambda: store.load("bench", TAG), cold=cold)))
        rows.append((f"plain sequential read, {tag}", best(plain_read, cold=cold)))
        rows.append((f"mx.load + eval only, {tag}",
                     best(lambda: mx.eval(mx.load(str(path))), cold=cold)))
    print(f"\nfile {mb:.1f} MB")
    for name, (b, med) in rows:
        print(f"{name:40s} best {b * 1e3:7.1f} ms {mb / b:7.0f} MB/s   median {mb / med:7.0f} MB/s")


# --------------------------------------------------------------------------- file names


CASE_IDS = ["caps", "CAPS", "Caps", "cApS", "a.b-c_d", "A.B-C_D", "x" * 128, "X" * 128, "0", "Z9"]


def test_file_names_are_injective_even_when_the_file_system_folds_case():
    stems = [cachestore.file_stem(a) for a in CASE_IDS]
    assert len({s.lower() for s in stems}) == len(CASE_IDS)  # distinct on macOS too
    assert all(s == s.lower() for s in stems)
    assert [cachestore.agent_for_stem(s) for s in stems] == CASE_IDS
    assert cachestore.file_stem("caps") == "caps"  # lowercase ids keep their old file names
    longest = f".{cachestore.file_stem('X' * 128)}.4194304-{'f' * 12}.tmp.safetensors.corrupt"
    assert len(longest.encode()) <= 255  # NAME_MAX on APFS and ext4


@pytest.mark.parametrize("stem", ["CAPS", "caps^0f", "caps^", "ca^f", "caps^zzzzzzz", "1^1", ".x", "a^1^1"])
def test_names_no_id_maps_to_are_not_agents(stem):
    assert cachestore.agent_for_stem(stem) is None


def test_case_only_different_ids_keep_their_own_cache_on_a_case_insensitive_fs(store, monkeypatch, caplog):
    """As macOS would: the file system finds a file whatever the case of its name."""
    real_path_for = CacheStore.path_for

    def folding_path_for(self, agent_id, model_tag):
        path = real_path_for(self, agent_id, model_tag)
        return path.with_name(path.name.lower())

    monkeypatch.setattr(CacheStore, "path_for", folding_path_for)
    upper, lower = make_snapshot(agent="CAPS", seed=1), make_snapshot(agent="caps", seed=2)
    store.save(upper)
    store.save(lower)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert_snap_equal(store.load("CAPS", TAG), upper)
        assert_snap_equal(store.load("caps", TAG), lower)
    assert warnings_from(caplog) == []  # nothing quarantined
    assert store.list_agents(TAG) == ["CAPS", "caps"]


# --------------------------------------------------------------------------- the index


def test_index_is_built_at_open_and_answers_without_reading_the_directory(tmp_path, monkeypatch):
    first = CacheStore(tmp_path / "kv")
    sizes = {a: first.save(make_snapshot(agent=a)) for a in ("alpha", "Beta")}
    d = tmp_path / "kv" / TAG
    (d / "Legacy.safetensors").write_bytes(b"x" * 10)  # an uppercase id under the old naming
    (d / "gone.safetensors.corrupt").write_bytes(b"x" * 20)
    (d / f".alpha.{os.getpid()}-abcdef012345.tmp.safetensors").write_bytes(b"x" * 30)  # a live writer's
    (d / "notes.txt").write_bytes(b"x" * 40)

    store = CacheStore(tmp_path / "kv", disk_budget_bytes=1 << 30)

    def no_listing(*args, **kwargs):
        raise AssertionError("the directory was listed")

    monkeypatch.setattr(os, "scandir", no_listing)
    monkeypatch.setattr(os, "listdir", no_listing)
    index = store.index(TAG)
    assert store.list_agents(TAG) == ["Beta", "alpha"]
    assert store.nbytes_on_disk(TAG) == sum(sizes.values()) + 100
    assert index.count == 6 and index.junk_count == 2
    kinds = {f.name: (f.owner, f.junk) for f in index.files()}
    assert kinds["Legacy.safetensors"] == (None, True)  # never loaded again; first to go
    assert kinds["beta^1.safetensors"] == ("Beta", False)
    assert kinds["notes.txt"] == (None, False)  # not ours: counted, never removed


def test_index_follows_saves_quarantines_and_removals(store):
    _, path = _saved(store)
    index = store.index(TAG)
    assert index.get(path.name).owner == "victim"
    path.write_bytes(b"junk!")
    assert store.load("victim", TAG) is None
    assert index.get(path.name) is None
    corrupt = index.get(path.name + ".corrupt")
    assert corrupt.junk and corrupt.size == 5
    size = store.save(make_snapshot(agent="other"))
    assert store.remove(TAG, [corrupt, index.get("other.safetensors")]) == 5 + size
    assert index.count == 0 and list(path.parent.iterdir()) == []
