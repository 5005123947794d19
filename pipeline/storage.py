"""URIs -> filesystems (local paths and ``s3://`` through s3fs), shard listing, atomic writes.

Credentials, region and endpoint for ``s3://`` come from the standard AWS sources that
botocore reads: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE`` and ``~/.aws``, ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``). Nothing here logs them.
"""

from __future__ import annotations

import functools
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass

import fsspec
from braceexpand import braceexpand

GLOB_CHARS = "*?["
_IO_ERROR_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3")


class StorageError(OSError):
    """A URI that cannot be reached, read or written (unreachable endpoint, missing bucket,
    no credentials, unknown protocol). The message is one line naming the URI; never a secret."""


# The exit code of a job that stopped on storage it could not read or write mid-run (1: the job
# failed otherwise, or too many keys were quarantined; 2: a flag or an input is wrong).
STORAGE_EXIT = 3


def storage_failure(e: BaseException) -> StorageError | None:
    """The StorageError anywhere in an exception's chain, however Ray wrapped it (a task's
    error keeps it as ``cause``, Ray Train's worker-group error by rank); None if there is none."""
    import re

    todo, seen = [e], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        # A remote task's error (ray.exceptions.RayTaskError) is an instance of its cause's class
        # too, but its text is the whole remote traceback: only a one-line one is the message.
        if isinstance(e, StorageError) and "\n" not in str(e).strip():
            return e
        # A Ray Data UDF's error reaches the driver as a UserCodeException whose cause did not
        # travel; the worker's traceback (its text) still ends in the StorageError's line.
        found = re.findall(r"^pipeline\.storage\.StorageError: (.+)$", getattr(e, "traceback_str", None) or str(e),
                           re.M)
        if found:
            return StorageError(found[-1].strip())
        todo += list((getattr(e, "worker_failures", None) or {}).values())
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def what_to_do(e: StorageError) -> str:
    """One hint for a storage failure, from its message."""
    text = str(e)
    if "No space left" in text or "Disk quota" in text or "Errno 28" in text or "Errno 122" in text:
        return "free space there (or give another output) and rerun: it resumes from what was saved"
    # (s3fs turns S3's AccessDenied into PermissionError('Access Denied'))
    if any(m in text for m in ("Permission denied", "PermissionError", "AccessDenied", "Errno 13", "Read-only")):
        return "check the permissions / credentials for that location and rerun: it resumes from what was saved"
    if "NoSuchBucket" in text:
        return "create the bucket (or fix the URI) and rerun"
    return "rerun once the storage answers again: it resumes from what was saved"


def describe_error(e: BaseException) -> str:
    """One line for an I/O exception: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def _is_io_error(e: BaseException) -> bool:
    if isinstance(e, (OSError, TimeoutError)):
        return True
    if type(e).__module__.split(".")[0] in _IO_ERROR_MODULES:
        return True
    return isinstance(e, ValueError) and "protocol" in str(e).lower()


def _missing_bucket(e: FileNotFoundError) -> bool:
    """s3fs's FileNotFoundError for a bucket that does not exist (S3's NoSuchBucket), as when
    it was deleted mid-run: a storage failure, not a missing file a caller can handle."""
    cause = e.__cause__ or e.__context__
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    return code == "NoSuchBucket" or type(cause).__name__ == "NoSuchBucket"


def _reaching(what: str):
    """Decorator: I/O failures of a storage function become one StorageError naming the URI
    (its first argument); FileNotFoundError passes through unchanged, unless the bucket itself
    is missing."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(uri, *args, **kwargs):
            try:
                return fn(uri, *args, **kwargs)
            except FileNotFoundError as e:
                if _missing_bucket(e):
                    raise StorageError(f"{uri}: cannot {what} (NoSuchBucket: the bucket does not exist)") from None
                raise
            except StorageError:
                raise
            except Exception as e:
                if not _is_io_error(e):
                    raise
                raise StorageError(f"{uri}: cannot {what} ({describe_error(e)})") from None
        return inner
    return wrap


def is_remote(uri: str) -> bool:
    """True for URIs with a non-local protocol (``s3://...``)."""
    return "://" in uri and not uri.startswith("file://")


# Retries of s3:// requests, set here only. botocore retries every request (5xx, throttling,
# dropped connections, cut bodies) in 'standard' mode: exponential backoff with jitter, at most
# 20 s between tries, S3_MAX_ATTEMPTS tries in all; s3fs retries throttling and dropped
# connections again around that (5 tries). AWS_MAX_ATTEMPTS / AWS_RETRY_MODE, when set, win.
S3_MAX_ATTEMPTS = 8


def s3_options() -> dict:
    """Keyword arguments for s3fs.S3FileSystem: the retry policy above."""
    if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
        return {}  # botocore reads them itself
    return {"config_kwargs": {"retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}}}


@_reaching("open")
def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path, ``file://`` or ``s3://`` URI."""
    if is_remote(uri):
        # Listings must never be stale: a rerun looks for shards the last run just wrote.
        extra = s3_options() if uri.split("://", 1)[0] in ("s3", "s3a") else {}
        fs, path = fsspec.core.url_to_fs(uri, use_listings_cache=False, **extra)
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
    """One input shard: its canonical URI, size in bytes (for ETA by bytes), and every spelling
    under which the command line named it (more than one: the same input given twice)."""

    uri: str
    size: int
    spellings: tuple[str, ...] = ()


def canonical_uri(uri: str) -> str:
    """The identity of a file: a local path resolved (``.``/``..``/symlinks, ``file://`` dropped)
    to an absolute real path; a remote URI as the store lists it (an S3 key is an opaque
    string: ``a/./b`` and ``a/b`` are two objects there)."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        return uri
    return os.path.realpath(uri)


def expand_shards(specs: list[str], extensions: tuple[str, ...]) -> list[ShardRef]:
    """Expand directories, globs and brace patterns into a sorted, de-duplicated shard list.

    specs: e.g. ``["data/", "s3://b/train/shard-{0000..0099}.tar", "more/*.parquet"]``.
    A directory contributes its files whose names end in one of ``extensions``. Files are
    identified by ``canonical_uri``: one file named twice (``d/s1.tar``, ``d/./s1.tar``, a
    symlink to it) is one shard whose ``spellings`` list both names.
    Raises FileNotFoundError naming the spec that matched nothing; StorageError when a
    location cannot be reached.
    """
    found: dict[str, int] = {}
    spellings: dict[str, list[str]] = {}
    for spec in specs:
        matched = 0
        for one in braceexpand(str(spec)):
            for p, size in _expand_one(one, spec, extensions):
                uri = canonical_uri(p)
                found[uri] = size
                names = spellings.setdefault(uri, [])
                if p not in names:
                    names.append(p)
                matched += 1
        if matched == 0:
            raise FileNotFoundError(f"input {spec!r} matched no files ending in {', '.join(extensions)}")
    return [ShardRef(u, s, tuple(spellings[u])) for u, s in sorted(found.items())]


@_reaching("list")
def _expand_one(one: str, spec: str, extensions: tuple[str, ...]) -> list[tuple[str, int]]:
    """[(uri as spelled, size)] for one brace-expanded input spec."""
    fs, path = filesystem(one)
    if any(c in path for c in GLOB_CHARS):
        infos = fs.glob(path, detail=True)
        entries = [(p, i) for p, i in infos.items() if i.get("type") == "file"]
    elif is_remote(one):
        # info() raises what went wrong (an unreachable endpoint, no credentials); isdir() and
        # isfile() would report any failure as "does not exist".
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"input {one!r} (from {spec!r}) does not exist") from None
        if info.get("type") == "directory":
            entries = [(i["name"], i) for i in fs.ls(path, detail=True)
                       if i.get("type") == "file" and i["name"].endswith(extensions)]
        else:
            entries = [(path, info)]
    elif fs.isdir(path):
        entries = [(i["name"], i) for i in fs.ls(path, detail=True)
                   if i.get("type") == "file" and i["name"].endswith(extensions)]
    elif fs.isfile(path):
        entries = [(one if not is_remote(one) else path, fs.info(path))]
    else:
        raise FileNotFoundError(f"input {one!r} (from {spec!r}) does not exist")
    return [(_with_protocol(fs, one, p), int(info.get("size") or 0)) for p, info in entries]


@_reaching("check")
def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


@_reaching("read")
def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


@_reaching("open for reading")
def open_read(uri: str):
    """A binary file object for streaming reads (local or s3)."""
    fs, path = filesystem(uri)
    return fs.open(path, "rb")


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        os.makedirs(uri, exist_ok=True)
    # object stores have no directories


@_reaching("write")
def atomic_write_bytes(uri: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one.

    Local: write a temp file in the same directory, fsync (unless not ``durable``: scratch
    files a crash may lose), then rename over the target.
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
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
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


@_reaching("remove")
def remove(uri: str) -> None:
    """Remove a file or a directory tree; nothing if absent."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        # Not fsspec's local rm: it compares each path with os.getcwd(), which raises once the
        # process's working directory is gone, as Ray's runtime-env cache can delete a
        # `ray job submit --working-dir` driver's while the job still runs.
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=False)
        elif os.path.lexists(path):
            os.remove(path)
        return
    if fs.exists(path):
        fs.rm(path, recursive=True)


@_reaching("list")
def list_sizes(uri: str, recursive: bool = False) -> dict[str, int]:
    """{full URI: size} of the files under ``uri`` (directly, or at any depth); {} if absent.
    One listing request per 1,000 files on S3, whatever their number."""
    fs, path = filesystem(uri)
    try:
        infos = fs.find(path, detail=True).values() if recursive else fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {_with_protocol(fs, uri, i["name"]): int(i.get("size") or 0) for i in infos if i.get("type") == "file"}


@_reaching("list")
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
