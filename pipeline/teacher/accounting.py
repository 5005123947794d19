"""How the driver knows a shard is whole without seeing a single row of it.

The decode task of a shard ends it with an END row: how many rows (samples and errors) it
emitted and a hash of their keys. Each teacher actor writes its rows of a shard as a part
file and returns a PART row: the part's file, counts and the same key hash over its rows.
The driver only adds these small rows up; a shard is whole when its parts account for
exactly the rows and the key hash that decode announced, so a lost part, a part that came
twice, or a retried task's leftovers can never pass as a complete shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa

PART, END = 0, 1  # kinds of the records actors hand the driver
SAMPLE, ERROR, END_ROW = 0, 1, 2  # kinds of the rows decode tasks emit (END_ROW: a shard's last)
MASK64 = (1 << 64) - 1
RECORD_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("kind", pa.int8()),  # PART or END
    ("part", pa.string()),  # PART: the file, relative to the run directory
    ("rows", pa.int64()),  # PART: soft-target rows; END: rows + errors decode emitted
    ("errors", pa.int64()),  # PART: error rows
    ("frames", pa.int64()),  # PART: teacher frames (frame level)
    ("key_hash", pa.uint64()),  # sum of key_hash over the rows' keys, mod 2^64
    ("bytes", pa.int64()),  # PART: file size
    ("node", pa.string()),  # PART: the Ray node that wrote it
])


def key_hash(keys: Iterable[str]) -> int:
    """Order-independent 64-bit hash of a multiset of keys (sum of per-key blake2b-64)."""
    total = 0
    for k in keys:
        total += int.from_bytes(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return total & MASK64


def records_table(rows: list[dict]) -> pa.Table:
    """PART / END rows -> a RECORD_SCHEMA table (what actors hand the driver)."""
    return pa.Table.from_pylist([{c: r.get(c) for c in RECORD_SCHEMA.names} for r in rows], schema=RECORD_SCHEMA)
