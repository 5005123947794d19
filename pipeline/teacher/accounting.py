"""How the driver knows a shard is whole without seeing a single row of it.

The decode task of a shard ends it with an END row: how many rows (samples and errors) it
emitted and a hash of their keys. Each teacher actor writes its rows of a shard as a part
file and returns a PART row: the part's file, counts and the same key hash over its rows.
The driver only adds these small rows up; a shard is whole when its parts account for
exactly the rows and the key hash that decode announced, so a lost part, a part that came
twice, or a retried task's leftovers can never pass as a complete shard.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import pyarrow as pa



class Record(IntEnum):
    """Kinds of the records actors hand the driver (RECORD_SCHEMA's ``kind``)."""

    PART = 0  # a part file an actor wrote
    END = 1  # a shard's END row, passed on: how many rows, which key hash


class Row(IntEnum):
    """Kinds of the rows decode tasks emit (teacher.decode's ``kind``)."""

    SAMPLE = 0
    ERROR = 1  # quarantined: reason and detail
    END = 2  # a shard's last: count and key hash of the rows before it


MASK64 = (1 << 64) - 1
RECORD_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("kind", pa.int8()),  # Record
    ("part", pa.string()),  # PART: the file, relative to the run directory
    ("rows", pa.int64()),  # PART: soft-target rows; END: rows + errors decode emitted
    ("errors", pa.int64()),  # PART: error rows
    ("frames", pa.int64()),  # PART: teacher frames (frame level)
    ("key_hash", pa.uint64()),  # sum of key_hash over the rows' keys, mod 2^64
    ("bytes", pa.int64()),  # PART: file size
    ("node", pa.string()),  # PART: the Ray node that wrote it
    # PART, image decode="gpu": its rows by how their images were decoded (the run summary's
    # image_decode; DECODE_COUNTS). Null elsewhere.
    ("gpu_decoded", pa.int64()),  # on the device (baseline and progressive JPEGs)
    ("gpu_progressive", pa.int64()),  # of those, progressive (nvJPEG's CUDA path, not its hardware engine)
    ("cpu_decoded", pa.int64()),  # by the decode task (PNG, WebP, CMYK JPEGs, ...)
    ("cpu_fallback", pa.int64()),  # JPEGs the device decoder refused, decoded on the actor's host
])
DECODE_COUNTS = ("gpu_decoded", "gpu_progressive", "cpu_decoded", "cpu_fallback")


_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def key_hash(keys) -> int:
    """Order-independent 64-bit hash of a multiset of keys: the sum mod 2^64 of each key's
    FNV-1a-64 over its UTF-8 bytes. keys: an Arrow string array (hashed in place, vectorised
    over the keys: one numpy step per byte position) or any iterable of str."""
    if isinstance(keys, pa.ChunkedArray):
        return sum(key_hash(c) for c in keys.chunks) & MASK64
    if not isinstance(keys, pa.Array):
        keys = pa.array(list(keys), type=pa.string())
    if keys.type != pa.string():
        keys = keys.cast(pa.string())
    n = len(keys)
    if n == 0:
        return 0
    _, off_buf, data_buf = keys.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int32, count=n + 1, offset=4 * keys.offset).astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):  # FNV multiplies mod 2^64 by design
        for i in range(int(lengths.max())):
            live = lengths > i
            byte = data[offsets[:-1][live] + i].astype(np.uint64)
            h[live] = (h[live] ^ byte) * _FNV_PRIME
        return int(h.sum(dtype=np.uint64)) & MASK64


def records_table(rows: list[dict]) -> pa.Table:
    """PART / END rows -> a RECORD_SCHEMA table (what actors hand the driver)."""
    return pa.Table.from_pylist([{c: r.get(c) for c in RECORD_SCHEMA.names} for r in rows], schema=RECORD_SCHEMA)
