"""Atomic, durable writes: a file appears whole or not at all, and nothing is left beside it."""

import hashlib
import os

import pytest

from quiver import fs


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    fs.write_atomic(target, b"first")
    fs.write_atomic(target, b"second", mode=0o444)
    assert target.read_bytes() == b"second"
    assert not target.stat().st_mode & 0o222
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), fs.atomic_path(target) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("the writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_publish_fsyncs_the_file_then_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    fs.write_atomic(tmp_path / "f", b"x")
    assert synced[0].startswith(str(tmp_path / ".f."))  # the content, under its temporary name
    assert synced[1:] == [str(tmp_path)]  # then the rename


def test_sha256_file(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert fs.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
