"""WebDataset (tar) encoding of a soft-target shard: one sample per key, numpy members.

Members of sample ``KEY`` (``.npy``, written with numpy.save):
    KEY.ids.npy (k,) or (T, k) uintN     KEY.logprobs.npy (k,) or (T, k) float16
    KEY.logsumexp.npy () or (T,) float32 KEY.argmax.npy () or (T,) uintN
    KEY.confidence.npy () or (T,) f16    KEY.entropy.npy () or (T,) float16
    KEY.num_frames.npy () int32 (frame level only)
WebDataset splits a member name at the first dot of its basename, so KEY is the sample key
escaped: '%' -> '%25', '.' -> '%2E', and a leading '/' -> '%2F' (so no member name is absolute
or has a '..' component); ``urllib.parse.unquote`` gives the key back. Long and non-ASCII names
use PAX headers. Members are written with mtime 0 and no owner, so equal content gives equal
bytes.
"""

from __future__ import annotations

import io
import tarfile
from urllib.parse import unquote

import numpy as np
import pyarrow as pa

from pipeline.names import split_member
from pipeline.shards.schema import VALUE_COLUMNS, _storage_dtypes, table_from_rows


def encode_key(key: str) -> str:
    """A sample key as the stem of its member names (reversible; see the module doc)."""
    out = key.replace("%", "%25").replace(".", "%2E")
    return "%2F" + out[1:] if out.startswith("/") else out


def decode_key(stem: str) -> str:
    """The inverse of encode_key."""
    return unquote(stem)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def encode(table: pa.Table, level: str) -> bytes:
    """Canonical table -> tar bytes."""
    from pipeline.shards.schema import table_to_numpy

    cols = table_to_numpy(table, level)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, raw_key in enumerate(cols["key"]):
            key = encode_key(raw_key)
            if level == "frame":
                lo, hi = cols["offsets"][i], cols["offsets"][i + 1]
                _add(tar, f"{key}.num_frames.npy", _npy(np.int32(hi - lo)))
                for c in VALUE_COLUMNS:
                    _add(tar, f"{key}.{c}.npy", _npy(cols[c][lo:hi]))
            else:
                for c in VALUE_COLUMNS:
                    _add(tar, f"{key}.{c}.npy", _npy(cols[c][i]))
    return buf.getvalue()


def _samples(f, uri: str, error_cls):
    """Yield (key, {column: array}) from a tar stream, grouping consecutive members by key."""
    key, sample = None, {}
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                stem, ext = split_member(m.name)
                if not ext:
                    raise error_cls(f"{uri}: member {m.name!r} has no extension; not a soft-target tar")
                k = decode_key(stem)
                if k != key:
                    if key is not None:
                        yield key, sample
                    key, sample = k, {}
                if not ext.endswith(".npy"):
                    raise error_cls(f"{uri}: member {m.name!r} is not a .npy array; not a soft-target tar")
                data = tar.extractfile(m).read()
                if len(data) != m.size:
                    raise error_cls(f"{uri}: truncated tar shard (member {m.name!r} is cut short)")
                try:
                    sample[ext[:-4]] = np.load(io.BytesIO(data), allow_pickle=False)
                except ValueError as e:
                    raise error_cls(f"{uri}: member {m.name!r} is not a valid .npy ({e})") from None
            # tarfile stops quietly at end of data; a complete archive ends with a zero block
            # (end-of-archive marker), so a tar cut between two members is caught here.
            if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
                raise error_cls(f"{uri}: truncated tar shard (no end-of-archive marker after byte {tar.offset})")
    except (tarfile.ReadError, EOFError) as e:
        raise error_cls(f"{uri}: truncated or corrupt tar shard ({e})") from None
    if key is not None:
        yield key, sample


def iter_tables(f, uri: str, error_cls, level: str, k: int, num_classes: int, batch_rows: int = 4096):
    """Stream a tar shard as canonical tables of at most ``batch_rows`` rows."""
    needed = set(VALUE_COLUMNS) | ({"num_frames"} if level == "frame" else set())
    dtypes = {**_storage_dtypes(num_classes), "num_frames": np.dtype(np.int32)}
    keys: list[str] = []
    rows: dict[str, list] = {c: [] for c in needed}
    for key, sample in _samples(f, uri, error_cls):
        missing = needed - set(sample)
        if missing:
            raise error_cls(f"{uri}: sample {key!r} lacks member(s) {', '.join(sorted(missing))}, required at "
                            f"level={level}: corrupt shard, or one that does not match its manifest")
        _check_sample(uri, error_cls, key, sample, level, k, dtypes)
        keys.append(key)
        for c in needed:
            rows[c].append(sample[c])
        if len(keys) >= batch_rows:
            yield _table(keys, rows, level, k, num_classes, uri, error_cls)
            keys, rows = [], {c: [] for c in needed}
    if keys:
        yield _table(keys, rows, level, k, num_classes, uri, error_cls)


def _check_sample(uri, error_cls, key, sample, level, k, dtypes) -> None:
    """Every member has the dtype and shape the manifest implies (the tar's "schema")."""
    if level == "frame":
        nf = sample["num_frames"]
        if nf.shape != () or nf.dtype != dtypes["num_frames"] or int(nf) < 0:
            raise error_cls(f"{uri}: sample {key!r} member num_frames is {nf.dtype}{nf.shape}, expected a "
                            "non-negative int32 scalar")
        lead = (int(nf),)
    else:
        lead = ()
    for c in VALUE_COLUMNS:
        a = sample[c]
        shape = lead + ((k,) if c in ("ids", "logprobs") else ())
        if a.shape != shape or a.dtype != dtypes[c]:
            raise error_cls(
                f"{uri}: sample {key!r} member {c} is {a.dtype}{list(a.shape)}, expected {dtypes[c]}{list(shape)} "
                f"for level={level} k={k}: shard does not match its manifest"
            )


def _table(keys, rows, level, k, num_classes, uri, error_cls) -> pa.Table:
    ids_max = max((int(np.max(a)) for a in rows["ids"] if np.size(a)), default=-1)
    if ids_max >= num_classes:
        raise error_cls(f"{uri}: class id {ids_max} out of range for num_classes={num_classes}")
    try:
        return table_from_rows(keys, rows, level, k, num_classes)
    except ValueError as e:
        raise error_cls(f"{uri}: invalid values ({e})") from None
