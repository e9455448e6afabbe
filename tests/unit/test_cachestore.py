"""Tests for actors.cachestore: id validation, file names, temp files, atomic writes
and directory modes (real files under tmp_path). The block store built on them is
tested in tests/unit/test_blockstore.py."""

from __future__ import annotations

import os
import stat
import time
import zlib

import pytest

from actors import cachestore
from actors.cachestore import (
    InvalidAgentId,
    agent_for_stem,
    file_name,
    file_stem,
    make_dir,
    stale_temp_file,
    validate_agent_id,
    validate_model_tag,
    write_atomic,
)

mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "", ".", "..", "x" * 129, "a b", "é", ".hidden", "a\nb", "a\x00b", "a\\b", None, 5]
)
def test_invalid_agent_ids_get_no_file_name(bad):
    with pytest.raises(InvalidAgentId):
        validate_agent_id(bad)
    with pytest.raises(InvalidAgentId):
        file_name(bad)


@pytest.mark.parametrize("bad", ["", "ABC", "a/b", "..", "x" * 65, "a_b", "tag\n", "é", None])
def test_invalid_model_tags(bad):
    with pytest.raises(InvalidAgentId):
        validate_model_tag(bad)


@pytest.mark.parametrize("good", ["a", "A.b_c-1", "x" * 128, "x..y", "-dash", "0"])
def test_valid_agent_ids_name_a_file_inside_their_dir(tmp_path, good):
    assert validate_agent_id(good) == good
    path = tmp_path / file_name(good)
    assert path.resolve().parent == tmp_path.resolve()
    assert path.name == file_stem(good) + ".safetensors"
    assert agent_for_stem(file_stem(good)) == good


def test_valid_model_tags():
    assert validate_model_tag("0a1b2c3d") == "0a1b2c3d"
    assert validate_model_tag("x" * 64) == "x" * 64


# --------------------------------------------------------------------------- file names


CASE_IDS = ["caps", "CAPS", "Caps", "cApS", "a.b-c_d", "A.B-C_D", "x" * 128, "X" * 128, "0", "Z9"]


def test_file_names_are_injective_even_when_the_file_system_folds_case():
    stems = [file_stem(a) for a in CASE_IDS]
    assert len({s.lower() for s in stems}) == len(CASE_IDS)  # distinct on macOS too
    assert all(s == s.lower() for s in stems)
    assert [agent_for_stem(s) for s in stems] == CASE_IDS
    assert file_stem("caps") == "caps"  # lowercase ids keep their old file names
    longest = f".{file_stem('X' * 128)}.4194304-{'f' * 12}.tmp.safetensors.corrupt"
    assert len(longest.encode()) <= 255  # NAME_MAX on APFS and ext4


@pytest.mark.parametrize("stem", ["CAPS", "caps^0f", "caps^", "ca^f", "caps^zzzzzzz", "1^1", ".x", "a^1^1"])
def test_names_no_id_maps_to_are_not_agents(stem):
    assert agent_for_stem(stem) is None


# --------------------------------------------------------------------------- temp files


def test_a_temp_file_is_stale_when_its_writer_is_dead_or_it_is_old(tmp_path):
    now = time.time()
    live, dead, mine = os.getppid(), 999_999_999, os.getpid()
    assert not stale_temp_file(f".a.{live}-abcdef.tmp.safetensors", now, now)
    assert stale_temp_file(f".a.{dead}-abcdef.tmp.safetensors", now, now)
    assert stale_temp_file(f".a.{live}-abcdef.tmp.safetensors", now - 2 * 3600, now)  # the pid may be reused
    assert not stale_temp_file(f".a.{mine}-abcdef.tmp.safetensors", now - 2 * 3600, now)  # its write may be under way
    assert not stale_temp_file("a.safetensors", 0, now)
    assert not stale_temp_file(f".a.{dead}-abcdef.tmp.safetensors.corrupt", 0, now)


def test_temp_names_are_fresh_hidden_and_recognised(tmp_path):
    target = tmp_path / file_name("MyAgent")
    names = {cachestore.temp_path(target).name for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert name.startswith(f".{file_stem('MyAgent')}.{os.getpid()}-")
        assert cachestore.TEMP_RE.match(name) and not stale_temp_file(name, time.time())


# --------------------------------------------------------------------------- writes and modes


def test_write_atomic_replaces_the_file_with_mode_0600(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"old")
    old = os.umask(0o022)
    try:
        assert write_atomic(path, lambda f: f.write(b"new content")) == len(b"new content")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new content" and mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_write_atomic_does_not_write_through_a_symlink(tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"secret")
    path = tmp_path / "a.safetensors"
    path.symlink_to(target)
    write_atomic(path, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"secret"  # the link was replaced, not followed
    assert not path.is_symlink() and path.read_bytes() == b"new"


def test_make_dir_gives_the_dirs_it_creates_mode_0700(tmp_path):
    (tmp_path / "existing").mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        make_dir(tmp_path / "existing" / "deep" / "kv")
        make_dir(tmp_path / "existing" / "deep" / "kv")  # already there: fine
    finally:
        os.umask(old)
    assert mode(tmp_path / "existing") == 0o755  # not created here: left alone
    assert mode(tmp_path / "existing" / "deep") == 0o700
    assert mode(tmp_path / "existing" / "deep" / "kv") == 0o700


# --------------------------------------------------------------------------- checksums


def test_digests_are_crc32_in_parallel_or_not():
    small = [bytes([i]) * 1000 for i in range(3)]
    big = [os.urandom(3 << 20), os.urandom(2 << 20)]  # over the threshold: the pool hashes them
    for bufs in (small, big, []):
        assert cachestore.digests([memoryview(b) for b in bufs]) == [
            zlib.crc32(b).to_bytes(4, "big") for b in bufs
        ]
    data = bytearray(big[0])
    data[12345] ^= 0x08
    assert cachestore.digest(data) != cachestore.digest(big[0])

