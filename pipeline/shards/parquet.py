"""Parquet encoding of a soft-target shard: the canonical table, zstd, facts in schema metadata."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"kdpipe"


def encode(table: pa.Table, facts: dict) -> bytes:
    """Canonical table -> Parquet bytes, with ``facts`` as JSON under schema metadata b"kdpipe"."""
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(facts, sort_keys=True).encode()
    buf = io.BytesIO()
    # Row groups of 4096 keep frame-level shards streamable without huge pages.
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd", row_group_size=4096)
    return buf.getvalue()


def open_file(f, uri: str, error_cls) -> tuple[pq.ParquetFile, dict]:
    """Open a Parquet shard from a file object; returns (ParquetFile, facts from its metadata)."""
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise error_cls(f"{uri}: truncated or corrupt Parquet shard ({e})") from None
    meta = pf.schema_arrow.metadata or {}
    if METADATA_KEY not in meta:
        raise error_cls(f"{uri}: Parquet file without kdpipe metadata; not a soft-target shard")
    try:
        facts = json.loads(meta[METADATA_KEY])
    except ValueError as e:
        raise error_cls(f"{uri}: unreadable kdpipe metadata ({e})") from None
    return pf, facts


def iter_tables(pf: pq.ParquetFile, uri: str, error_cls, batch_rows: int = 4096):
    """Stream a shard as canonical tables of at most ``batch_rows`` rows."""
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as e:
        raise error_cls(f"{uri}: truncated or corrupt Parquet shard ({e})") from None
