"""URIs -> filesystems (local paths and ``s3://`` through s3fs), shard listing, atomic writes.

Credentials, region and endpoint for ``s3://`` come from the standard AWS sources that
botocore reads: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE`` and ``~/.aws``, ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``). Nothing here logs them.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass

import fsspec
from braceexpand import braceexpand

GLOB_CHARS = "*?["


def is_remote(uri: str) -> bool:
    """True for URIs with a non-local protocol (``s3://...``)."""
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path, ``file://`` or ``s3://`` URI."""
    if is_remote(uri):
        # Listings must never be stale: a rerun looks for shards the last run just wrote.
        fs, path = fsspec.core.url_to_fs(uri, use_listings_cache=False)
    else:
        fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def absolute(uri: str) -> str:
    """A local path made absolute against this process's working directory; URIs unchanged.

    Paths handed to Ray Train workers must be absolute: the workers run in a directory of
    their own (under Ray's session dir), so a relative path would land there."""
    if is_remote(uri) or uri.startswith("file://"):
        return uri
    return os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def _with_protocol(fs: fsspec.AbstractFileSystem, uri_hint: str, path: str) -> str:
    if is_remote(uri_hint):
        return fs.unstrip_protocol(path)
    return path


@dataclass(frozen=True)
class ShardRef:
    """One input shard: its URI and size in bytes (for ETA by bytes)."""

    uri: str
    size: int


def expand_shards(specs: list[str], extensions: tuple[str, ...]) -> list[ShardRef]:
    """Expand directories, globs and brace patterns into a sorted, de-duplicated shard list.

    specs: e.g. ``["data/", "s3://b/train/shard-{0000..0099}.tar", "more/*.parquet"]``.
    A directory contributes its files whose names end in one of ``extensions``.
    Raises FileNotFoundError naming the spec that matched nothing.
    """
    found: dict[str, int] = {}
    for spec in specs:
        matched = 0
        for one in braceexpand(spec):
            fs, path = filesystem(one)
            if any(c in path for c in GLOB_CHARS):
                infos = fs.glob(path, detail=True)
                entries = [(p, i) for p, i in infos.items() if i.get("type") == "file"]
            elif fs.isdir(path):
                entries = [
                    (i["name"], i)
                    for i in fs.ls(path, detail=True)
                    if i.get("type") == "file" and i["name"].endswith(extensions)
                ]
            elif fs.isfile(path):
                entries = [(path, fs.info(path))]
            else:
                raise FileNotFoundError(f"input {one!r} (from {spec!r}) does not exist")
            for p, info in entries:
                found[_with_protocol(fs, one, p)] = int(info.get("size") or 0)
                matched += 1
        if matched == 0:
            raise FileNotFoundError(f"input {spec!r} matched no files ending in {', '.join(extensions)}")
    return [ShardRef(u, s) for u, s in sorted(found.items())]


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def open_read(uri: str):
    """A binary file object for streaming reads (local or s3)."""
    fs, path = filesystem(uri)
    return fs.open(path, "rb")


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        os.makedirs(uri, exist_ok=True)
    # object stores have no directories


def atomic_write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one.

    Local: write a temp file in the same directory, fsync, then rename over the target.
    S3: one PUT (or one multipart upload), which becomes visible only when complete.
    """
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, data)
        return
    directory = os.path.dirname(os.path.abspath(uri))
    os.makedirs(directory, exist_ok=True)
    # Not tempfile.mkstemp: its 0600 mode would survive the rename and hide the shard from
    # other users of a shared cache. O_EXCL + a random name is just as safe; mode follows umask.
    tmp = os.path.join(directory, f".tmp-{os.path.basename(uri)}-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Make a rename durable (best effort: not every filesystem can fsync a directory)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def listdir(uri: str) -> list[str]:
    """Full URIs of the files directly under ``uri`` (empty if it does not exist)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(_with_protocol(fs, uri, i["name"]) for i in fs.ls(path, detail=True) if i.get("type") == "file")


def put_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local or s3://), file by file, each atomically."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as f:
                atomic_write_bytes(join(uri, rel), f.read())
