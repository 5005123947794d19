"""Reading input shards: WebDataset tars and Parquet (key + media columns), local or s3://.

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
from pipeline.names import SHARD_EXTENSIONS, shard_name, split_member, unique_shard_names  # noqa: F401 (re-exported)
from pipeline.modalities import AUDIO_EXTENSIONS, DEFAULT_LIMITS, IMAGE_EXTENSIONS, DecodeError, DecodeLimits

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
                    if members:  # a key whose members were all refused has its error rows already
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
    if members:
        yield _to_sample(key, members, exts)


def _media_kind(t: pa.DataType) -> str | None:
    """How a Parquet column holds media: "binary" (the bytes), "struct" (the ``datasets``
    library's Audio/Image layout, ``{bytes, path}``), "array" (``{array, sampling_rate}``
    decoded samples), or None (not media)."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t):
        names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
        if "bytes" in names and (pa.types.is_binary(names["bytes"]) or pa.types.is_large_binary(names["bytes"])):
            return "struct"
        if "array" in names and "sampling_rate" in names:
            return "array"
    return None


def _parquet_columns(pf: pq.ParquetFile, uri: str, key_column: str | None, data_column: str | None):
    """(key column or None for row ids, data column, its media kind)."""
    schema = pf.schema_arrow
    if key_column is not None and key_column not in schema.names:
        raise ValueError(f"{uri}: no key column {key_column!r} (columns: {schema.names})")
    key_column = key_column or ("key" if "key" in schema.names else None)
    if data_column is None:
        media = [f.name for f in schema if _media_kind(f.type) == "binary"]
        media = media or [f.name for f in schema if _media_kind(f.type) is not None]
        if not media:
            raise ValueError(f"{uri}: no column holding media bytes (a binary column, or an Audio/Image struct "
                             f"{{bytes, path}}) (columns: {schema.names})")
        data_column = media[0]
    elif data_column not in schema.names:
        raise ValueError(f"{uri}: no data column {data_column!r} (columns: {schema.names})")
    kind = _media_kind(schema.field(data_column).type)
    if kind is None:
        raise ValueError(f"{uri}: column {data_column!r} is {schema.field(data_column).type}, not media bytes or an "
                         "Audio/Image struct {bytes, path}")
    return key_column, data_column, kind


def _wav_bytes(samples, rate: int) -> bytes:
    """Decoded float samples -> a float32 WAV (lossless), so that they decode like any file."""
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), int(rate), format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _media_values(col: pa.Array, kind: str, default_ext: str) -> tuple[list, list[str], list[str | None]]:
    """(bytes or None per row, ext per row, why-missing per row) of a data column chunk."""
    n = len(col)
    if kind == "binary":
        datas = col.to_pylist()
        return datas, [default_ext] * n, [None] * n
    valid = col.is_valid().to_pylist()
    if kind == "array":
        arrays, rates = col.field("array").to_pylist(), col.field("sampling_rate").to_pylist()
        datas = [_wav_bytes(a, r) if v and a is not None and r else None for v, a, r in zip(valid, arrays, rates)]
        return datas, ["wav"] * n, [None if d is not None else "no samples or sampling_rate" for d in datas]
    datas = col.field("bytes").to_pylist()
    paths = col.field("path").to_pylist() if col.type.get_field_index("path") >= 0 else [None] * n
    exts, why = [], []
    for v, d, path in zip(valid, datas, paths):
        ext = path.rsplit(".", 1)[-1].lower() if path and "." in path.rsplit("/", 1)[-1] else ""
        exts.append(ext if ext in MEDIA_EXTENSIONS else default_ext)
        why.append(None if v and d is not None else
                   f"no embedded bytes (path={path!r}); kdpipe reads media stored in the file" if path else None)
    return [d if v else None for v, d in zip(valid, datas)], exts, why


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
    """Samples of a Parquet input shard: one row per sample.

    The media column is a binary column (the encoded file), or the layout the Hugging Face
    ``datasets`` library writes for ``Audio`` / ``Image`` features: a struct ``{bytes, path}``
    (``ext`` from the path's extension), or ``{array, sampling_rate}`` decoded samples. Default:
    the first binary column, else the first such struct. Keys come from ``key_column`` (default
    "key"); a file without one gets stable ids "SHARD/ROW" (the shard's name, the row's index
    zero-padded). The media type is sniffed from the bytes (soundfile/PIL handle any supported
    container); ``ext`` is taken from ``ext_column`` when given, else the path or the column's name.
    """
    f = storage.open_read(uri)
    try:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            yield RawSample(f"{shard_name(uri)}#file", error=DecodeError("corrupt_parquet", str(e)))
            return
        try:
            key_column, data_column, kind = _parquet_columns(pf, uri, key_column, data_column)
        except ValueError as e:  # this shard's columns differ from the first one's (checked up front)
            yield RawSample(f"{shard_name(uri)}#file", error=DecodeError("bad_columns", str(e)))
            return
        cols = [data_column] + ([key_column] if key_column else []) + ([ext_column] if ext_column else [])
        stem = shard_name(uri).replace(".", "_")  # keys never contain "." (WebDataset)
        row = 0
        try:
            for batch in pf.iter_batches(columns=cols, batch_size=256):
                datas, extl, why = _media_values(batch.column(data_column), kind, data_column)
                n = len(datas)
                keys = batch.column(key_column).to_pylist() if key_column else \
                    [f"{stem}/{r:06d}" for r in range(row, row + n)]
                if ext_column:
                    extl = batch.column(ext_column).to_pylist()
                for key, data, ext, missing in zip(keys, datas, extl, why):
                    row += 1
                    if key is None:
                        yield RawSample(f"{shard_name(uri)}#row{row - 1}", error=DecodeError("null_key", f"row {row - 1}"))
                        continue
                    if data is None:
                        yield RawSample(str(key), error=DecodeError("no_media", missing or f"null {data_column!r}"))
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


def iter_prepared(uri: str, prep, limits: DecodeLimits = DEFAULT_LIMITS, **parquet_options):
    """(raw sample, [(chunk bounds, array)] or the DecodeError) for every sample of an input
    shard: iter_shard (one duplicate rule) + prepare (decode, resample, crop, chunk), the one
    read-and-prepare loop of the teacher's decode tasks, the student and evaluation."""
    from pipeline.modalities import media_extensions, prepare

    exts = media_extensions(prep.to_dict()["modality"])
    for raw in iter_shard(uri, exts, limits, **parquet_options):
        if raw.error is not None:
            yield raw, raw.error
            continue
        try:
            yield raw, prepare(raw.data, prep, limits)
        except DecodeError as e:
            yield raw, e


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
