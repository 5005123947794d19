"""Local storage: atomic writes, listing, shard expansion. (S3 is tested elsewhere.)"""

from __future__ import annotations

import os
import stat

import pytest

from pipeline import storage


def files_in(d) -> list[str]:
    return sorted(os.listdir(d))


def test_atomic_write_creates_and_replaces(tmp_path):
    target = tmp_path / "sub" / "dir" / "shard.parquet"  # missing parents are created
    storage.atomic_write_bytes(str(target), b"first")
    assert target.read_bytes() == b"first"
    storage.atomic_write_bytes(str(target), b"second, longer content")
    assert target.read_bytes() == b"second, longer content"
    storage.atomic_write_bytes(str(target), b"")
    assert target.read_bytes() == b""
    assert files_in(target.parent) == ["shard.parquet"]  # no temp files left behind


def test_atomic_write_mode_follows_umask(tmp_path):
    """Not 0600 (as a mkstemp temp file would be): other users of a shared cache can read shards."""
    old = os.umask(0o022)
    try:
        storage.atomic_write_bytes(str(tmp_path / "a"), b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o644


@pytest.mark.parametrize("fail", ["fsync", "write", "replace"])
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fail):
    target = tmp_path / "manifest.json"
    storage.atomic_write_bytes(str(target), b"old content")

    class Boom(OSError):
        pass

    def boom(*a, **k):
        raise Boom("disk on fire")

    if fail == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    elif fail == "replace":
        monkeypatch.setattr(os, "replace", boom)

    elif fail == "write":  # half the bytes reach the temp file, then the disk is full
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise Boom("No space left on device")

        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k)))
    data = b"new content"
    with pytest.raises(storage.StorageError, match="cannot write") as info:  # one line naming the file
        storage.atomic_write_bytes(str(target), data)
    assert str(target) in str(info.value) and "Boom" in str(info.value)
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert files_in(tmp_path) == ["manifest.json"]


def test_killed_writer_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    """A write interrupted (KeyboardInterrupt, like a SIGINT) before the rename: target never appears."""
    target = tmp_path / "shards" / "s0.tar"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.atomic_write_bytes(str(target), b"x" * 100_000)
    monkeypatch.undo()
    assert not target.exists()
    assert files_in(target.parent) == []


def test_read_exists_remove_listdir(tmp_path):
    d = tmp_path / "run"
    assert storage.listdir(str(d)) == []
    assert not storage.exists(str(d))
    storage.makedirs(str(d / "x"))
    storage.atomic_write_bytes(str(d / "b.json"), b"B")
    storage.atomic_write_bytes(str(d / "a.json"), b"A")
    assert storage.listdir(str(d)) == [str(d / "a.json"), str(d / "b.json")]  # files only, sorted
    assert storage.exists(str(d / "a.json")) and storage.read_bytes(str(d / "b.json")) == b"B"
    with storage.open_read(str(d / "a.json")) as f:
        assert f.read() == b"A"
    storage.remove(str(d / "a.json"))
    storage.remove(str(d / "missing"))  # no error
    assert storage.listdir(str(d)) == [str(d / "b.json")]
    storage.remove(str(d))
    assert not d.exists()


def test_join_basename_is_remote():
    assert storage.join("/a/b", "c", "d.json") == "/a/b/c/d.json"
    assert storage.join("s3://bucket/run/", "shards", "/x.tar") == "s3://bucket/run/shards/x.tar"
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/tmp/x") and not storage.is_remote("file:///x")
    assert storage.basename("s3://b/run/") == "run" and storage.basename("/a/b.tar") == "b.tar"


def test_expand_shards(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name, size in [("s-0001.tar", 3), ("s-0000.tar", 5), ("s-0002.tar", 7), ("notes.txt", 1)]:
        (d / name).write_bytes(b"x" * size)
    (d / "sub.tar").mkdir()  # a directory is never a shard
    by_dir = storage.expand_shards([str(d)], (".tar",))
    assert [(os.path.basename(s.uri), s.size) for s in by_dir] == [("s-0000.tar", 5), ("s-0001.tar", 3), ("s-0002.tar", 7)]
    by_glob = storage.expand_shards([str(d / "s-*.tar")], (".tar",))
    assert by_glob == by_dir
    by_brace = storage.expand_shards([str(d / "s-{0000..0001}.tar"), str(d / "s-0001.tar")], (".tar",))
    assert [os.path.basename(s.uri) for s in by_brace] == ["s-0000.tar", "s-0001.tar"]  # de-duplicated
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.expand_shards([str(d / "nope.tar")], (".tar",))
    with pytest.raises(FileNotFoundError, match="matched no files"):
        storage.expand_shards([str(d / "*.flac")], (".flac",))
    with pytest.raises(FileNotFoundError, match="matched no files"):
        storage.expand_shards([str(d)], (".flac",))


def test_storage_failure_is_found_however_ray_wrapped_it():
    from pipeline.storage import StorageError, storage_failure, what_to_do

    err = StorageError("/out/x.parquet: cannot write (OSError: [Errno 28] No space left on device)")
    assert storage_failure(RuntimeError("outer")) is None
    try:
        try:
            raise err
        except StorageError as e:
            raise RuntimeError("a task failed") from e
    except RuntimeError as chained:
        assert storage_failure(chained) is err

    class WorkerGroupError(Exception):  # Ray Train keeps each worker's error by rank
        worker_failures = {0: ValueError("fine"), 1: err}

    assert storage_failure(WorkerGroupError()) is err

    class UserCodeError(Exception):  # Ray Data: the cause did not travel, its traceback text did
        traceback_str = ("Traceback (most recent call last):\n  ...\npipeline.storage.StorageError: "
                         "s3://b/run/_parts/a.parquet: cannot write (ClientError: AccessDenied)\n")

    found = storage_failure(UserCodeError())
    assert isinstance(found, StorageError) and str(found) == "s3://b/run/_parts/a.parquet: cannot write (ClientError: AccessDenied)"
    assert "free space" in what_to_do(err) and "permissions" in what_to_do(found)

    # An actor task's error (the compactor's): Ray's RayTaskError is an instance of its cause's
    # class too, its text the whole remote traceback; the cause's one line is what is reported.
    from ray.exceptions import RayTaskError

    line = "s3://b/run/shards/a.parquet: cannot write (PermissionError: Access Denied)"
    remote = RayTaskError("Compactor.compact", f"Traceback (most recent call last):\n  ...\n"
                          f"pipeline.storage.StorageError: {line}", StorageError(line)).as_instanceof_cause()
    assert isinstance(remote, StorageError) and "\n" in str(remote)
    found = storage_failure(remote)
    assert str(found) == line and "permissions" in what_to_do(found)


def test_a_deleted_bucket_is_a_storage_error_not_a_missing_file(s3_bucket):
    """Issue 23: the output's bucket deleted mid-run. s3fs says FileNotFoundError, which
    callers take for an absent file (and which reached the user as a Ray traceback); a missing
    bucket is one StorageError line naming the URI, with what to do."""
    import s3fs

    fs = s3fs.S3FileSystem()
    storage.atomic_write_bytes(f"s3://{s3_bucket}/run/a.bin", b"1")
    with pytest.raises(FileNotFoundError):  # a missing key in a bucket that exists: still absent
        storage.read_bytes(f"s3://{s3_bucket}/run/nothing.bin")
    fs.rm(s3_bucket, recursive=True)
    fs.invalidate_cache()
    for what, call in (("write", lambda uri: storage.atomic_write_bytes(uri, b"2")),
                       ("read", storage.read_bytes)):
        uri = f"s3://{s3_bucket}/run/a.bin"
        with pytest.raises(storage.StorageError) as e:
            call(uri)
        assert str(e.value) == f"{uri}: cannot {what} (NoSuchBucket: the bucket does not exist)"
        assert "create the bucket" in storage.what_to_do(e.value)
