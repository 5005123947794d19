"""Reading input shards: WebDataset tars and Parquet (key + bytes columns), local or s3://.

Both yield ``RawSample``s in shard order, streaming (a shard is never held whole in memory).
A sample that cannot be used carries a ``DecodeError`` instead of data, so the caller can
quarantine it with its reason and go on: nothing is dropped silently.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.modalities import AUDIO_EXTENSIONS, DEFAULT_LIMITS, IMAGE_EXTENSIONS, DecodeError, DecodeLimits

SHARD_EXTENSIONS = (".tar", ".parquet")
MEDIA_EXTENSIONS = AUDIO_EXTENSIONS + IMAGE_EXTENSIONS


@dataclass
class RawSample:
    """One input sample: its media bytes and extension, its members, or the reason it is unusable.

    ``member_error``: the error concerns one member (a link, a repeated or oversized member),
    not the sample: it is reported under the sample's key without using the key up.
    """

    key: str
    ext: str | None = None
    data: bytes | None = None
    members: dict[str, bytes] | None = None  # every member of a tar sample, by extension
    error: DecodeError | None = None
    member_error: bool = False


def shard_name(uri: str) -> str:
    """Output name of an input shard: its file name without the extension."""
    base = storage.basename(uri)
    for ext in SHARD_EXTENSIONS:
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def unique_shard_names(uris: list[str], taken: dict[str, str] | None = None) -> dict[str, str]:
    """{uri: name}; names are file stems, prefixed with parent folders only where two collide.

    taken: {name: uri} already used in the run directory; a new uri never gets one of those
    names, and a uri found there keeps its name.
    """
    taken = dict(taken or {})
    by_uri = {u: n for n, u in taken.items()}
    new = [u for u in uris if u not in by_uri]
    names = {u: shard_name(u) for u in new}
    depth = 1

    def clashes() -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in list(names.values()) + list(taken):
            counts[n] = counts.get(n, 0) + 1
        return counts

    while any(c > 1 for c in clashes().values()) and depth < 16:
        depth += 1
        counts = clashes()
        for u in new:
            if counts[names[u]] > 1:
                parts = u.rstrip("/").split("/")
                names[u] = "__".join(parts[-depth:-1] + [shard_name(u)])
    if any(c > 1 for c in clashes().values()):
        raise ValueError("input shards have names that cannot be told apart")
    return {u: by_uri.get(u) or names[u] for u in uris}


def split_member(name: str) -> tuple[str, str]:
    """'dir/abc.flac' -> ('dir/abc', 'flac'); WebDataset keys end at the basename's first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def _to_sample(key: str, members: dict[str, bytes], exts: tuple[str, ...]) -> RawSample:
    media = [e for e in members if e.lower() in exts]
    if not media:
        other = [e for e in members if e.lower() in MEDIA_EXTENSIONS]
        reason = "wrong_modality" if other else "no_media"
        return RawSample(key, members=members, error=DecodeError(
            reason, f"members {sorted(members)} hold no {'/'.join(exts)}"))
    ext = sorted(media)[0]
    return RawSample(key, ext=ext.lower(), data=members[ext], members=members)


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "a symbolic link"
    if m.islnk():
        return "a hard link"
    return "a device, FIFO or other special file"


def iter_tar(uri: str, exts: tuple[str, ...], max_member_bytes: int = DEFAULT_LIMITS.max_member_bytes
             ) -> Iterator[RawSample]:
    """Samples of a WebDataset tar: consecutive members sharing a key form one sample.

    Every member is accounted for: regular members make up samples; a link or special
    member is a ``link_member`` error, a member repeated within its sample a
    ``duplicate_key`` error (the first copy is used), one above ``max_member_bytes`` a
    ``member_too_large`` error (never read). Directory entries are structure, not members.
    A truncated or corrupt tar ends the shard with one RawSample whose error is
    "truncated_tar" (key: the sample being read, or "<shard>#tail" if between samples).
    """
    key, members = None, {}
    f = storage.open_read(uri)
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for index, m in enumerate(tar):
                if m.isdir():
                    continue
                k, ext = split_member(m.name)
                if not k or k.endswith("/"):
                    yield RawSample(f"{shard_name(uri)}#member{index}", member_error=True, error=DecodeError(
                        "bad_key", f"member {m.name!r} has an empty key"))
                    continue
                if k != key:
                    if key is not None:
                        yield _to_sample(key, members, exts)
                    key, members = k, {}
                if not m.isfile():
                    yield RawSample(k, member_error=True, error=DecodeError(
                        "link_member", f"member {m.name!r} is {_member_kind(m)}; only regular files are read"))
                    continue
                if m.size > max_member_bytes:
                    yield RawSample(k, member_error=True, error=DecodeError(
                        "member_too_large", f"member {m.name!r} is {m.size:,} bytes, above the limit of "
                                            f"{max_member_bytes:,}"))
                    continue
                if ext in members:
                    yield RawSample(k, member_error=True, error=DecodeError(
                        "duplicate_key", f"member {m.name!r} appears twice in a row; the first copy is used"))
                    continue
                data = tar.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"member {m.name!r} is cut short")
                members[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        yield RawSample(key or f"{shard_name(uri)}#tail", error=DecodeError("truncated_tar", f"{type(e).__name__}: {e}"))
        return
    finally:
        f.close()
    if key is not None:
        yield _to_sample(key, members, exts)


def _parquet_columns(pf: pq.ParquetFile, uri: str, key_column: str | None, data_column: str | None):
    schema = pf.schema_arrow
    key_column = key_column or ("key" if "key" in schema.names else None)
    if key_column is None or key_column not in schema.names:
        raise ValueError(f"{uri}: no key column {key_column or 'key'!r} (columns: {schema.names})")
    if data_column is None:
        binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
        if not binary:
            raise ValueError(f"{uri}: no binary column holding media bytes (columns: {schema.names})")
        data_column = binary[0]
    elif data_column not in schema.names:
        raise ValueError(f"{uri}: no data column {data_column!r} (columns: {schema.names})")
    dtype = schema.field(data_column).type
    if not (pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)):
        raise ValueError(f"{uri}: data column {data_column!r} is {dtype}, not binary media bytes; "
                         "pick the column with --data-column")
    return key_column, data_column


def check_parquet_shard(uri: str, key_column: str | None = None, data_column: str | None = None) -> None:
    """Raise ValueError naming the file and column when a Parquet input cannot be read as
    (key, media bytes); the jobs call it on the first shard before Ray starts."""
    with storage.open_read(uri) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{uri}: not a readable Parquet file ({e})") from None
        _parquet_columns(pf, uri, key_column, data_column)


def iter_parquet(uri: str, exts: tuple[str, ...], key_column: str | None = None, data_column: str | None = None,
                 ext_column: str | None = None) -> Iterator[RawSample]:
    """Samples of a Parquet input shard: one row per sample (key column + bytes column).

    The media type is sniffed from the bytes (soundfile/PIL handle any supported container);
    ``ext`` is taken from ``ext_column`` when given, else the data column's name.
    """
    f = storage.open_read(uri)
    try:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            yield RawSample(f"{shard_name(uri)}#file", error=DecodeError("corrupt_parquet", str(e)))
            return
        try:
            key_column, data_column = _parquet_columns(pf, uri, key_column, data_column)
        except ValueError as e:  # this shard's columns differ from the first one's (checked up front)
            yield RawSample(f"{shard_name(uri)}#file", error=DecodeError("bad_columns", str(e)))
            return
        cols = [key_column, data_column] + ([ext_column] if ext_column else [])
        row = 0
        try:
            for batch in pf.iter_batches(columns=cols, batch_size=256):
                keys = batch.column(0).to_pylist()
                datas = batch.column(1).to_pylist()
                extl = batch.column(2).to_pylist() if ext_column else [data_column] * len(keys)
                for key, data, ext in zip(keys, datas, extl):
                    row += 1
                    if key is None:
                        yield RawSample(f"{shard_name(uri)}#row{row - 1}", error=DecodeError("null_key", f"row {row - 1}"))
                        continue
                    if data is None:
                        yield RawSample(str(key), error=DecodeError("no_media", f"null {data_column!r}"))
                        continue
                    yield RawSample(str(key), ext=str(ext).lower(), data=data, members={str(ext): data})
        except (pa.ArrowInvalid, OSError) as e:
            yield RawSample(f"{shard_name(uri)}#tail", error=DecodeError("corrupt_parquet", str(e)))
    finally:
        f.close()


def iter_shard(uri: str, exts: tuple[str, ...], limits: DecodeLimits = DEFAULT_LIMITS,
               **parquet_options) -> Iterator[RawSample]:
    """Samples of an input shard (.tar -> WebDataset, .parquet -> Parquet), in shard order,
    with kdpipe's one duplicate rule applied: the first occurrence of a key is the sample;
    every later sample with that key is a ``duplicate_key`` error. The teacher, the student
    and evaluation all read shards through here, so they agree on which copy counts."""
    if uri.endswith(".parquet"):
        samples = iter_parquet(uri, exts, **parquet_options)
    else:
        samples = iter_tar(uri, exts, limits.max_member_bytes)
    seen: set[str] = set()
    for s in samples:
        if s.member_error:
            yield s
        elif s.key in seen:
            yield RawSample(s.key, error=DecodeError(
                "duplicate_key", f"key appears more than once in {uri}; the first occurrence is used"))
        else:
            seen.add(s.key)
            yield s


def sniff_modality(uri: str, max_samples: int = 16) -> str | None:
    """'audio' or 'image' from the first samples of a shard, or None if it cannot tell."""
    for i, sample in enumerate(iter_shard(uri, MEDIA_EXTENSIONS)):
        if sample.ext in AUDIO_EXTENSIONS:
            return "audio"
        if sample.ext in IMAGE_EXTENSIONS:
            return "image"
        if sample.data is not None:
            head = sample.data[:12]
            if head[:4] in (b"fLaC", b"RIFF", b"OggS") or head[:3] == b"ID3":
                return "audio"
            if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n" or head[8:12] == b"WEBP":
                return "image"
        if i >= max_samples:
            break
    return None
