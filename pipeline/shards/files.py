"""One shard's files: encode and write them (on a worker), read and check them (anywhere).

These functions need only the run's ``RunFacts`` and, for reading, the shard's commit
record: a task that reads or writes one shard never opens the manifest or the commit log.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.shards import parquet as pq_enc
from pipeline.shards import wds as wds_enc
from pipeline.shards.manifest import FormatError, RunFacts, ShardRecord, now_iso
from pipeline.shards.schema import ERRORS_SCHEMA, softtarget_schema, table_to_numpy


def errors_table(rows: list[dict]) -> pa.Table:
    """Errors rows ({key, input, reason, detail}) -> the errors table."""
    return pa.Table.from_pylist(
        [{c: str(r.get(c, "")) for c in ERRORS_SCHEMA.names} for r in rows], schema=ERRORS_SCHEMA
    )


_EMPTY_ERRORS: bytes | None = None


def encode_errors(table: pa.Table) -> bytes:
    """The errors table as Parquet (zstd); the empty one, most shards' case, is encoded once."""
    global _EMPTY_ERRORS
    if table.num_rows == 0 and _EMPTY_ERRORS is not None:
        return _EMPTY_ERRORS
    buf = io.BytesIO()
    pq.write_table(table.select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA), buf, compression="zstd")
    if table.num_rows == 0:
        _EMPTY_ERRORS = buf.getvalue()
    return buf.getvalue()


def check_ids(uri: str, table: pa.Table, num_classes: int) -> None:
    """Class ids and argmax must lie in 0..num_classes-1."""
    for c in ("ids", "argmax"):
        col = table.column(c)
        while pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
            col = pc.list_flatten(col)
        if len(col):
            top = pc.max(col).as_py()
            if top is not None and top >= num_classes:
                raise FormatError(f"{uri}: class id {top} in column {c} out of range for num_classes={num_classes}")


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return ""


def write_shard_files(run_uri: str, facts: RunFacts, name: str, input_uri: str, table: pa.Table,
                      errors: pa.Table) -> ShardRecord:
    """Encode and atomically write one shard and its errors; return its commit record.

    table: canonical soft-target table (pipeline.shards.schema), sorted the way it should be
    stored; errors: ERRORS_SCHEMA rows. Nothing is committed here: the record goes back to the
    driver, which commits it once the shard is whole.
    """
    out_rel, err_rel = facts.shard_file(name), facts.errors_file(name)
    out_uri = storage.join(run_uri, out_rel)
    want = softtarget_schema(facts.level, facts.k, facts.num_classes)
    got = pa.schema([f.remove_metadata() for f in table.schema])
    if not got.equals(want):
        raise FormatError(f"{out_uri}: table columns {got} do not match the manifest's level={facts.level} "
                          f"k={facts.k} num_classes={facts.num_classes} (expected {want}); nothing written")
    check_ids(out_uri, table, facts.num_classes)
    if facts.encoding == "parquet":
        data = pq_enc.encode(table, {**facts.key_facts(), "input": input_uri})
    else:
        data = wds_enc.encode(table, facts.level)
    err_data = encode_errors(errors)
    storage.atomic_write_bytes(storage.join(run_uri, err_rel), err_data)
    storage.atomic_write_bytes(out_uri, data)
    frames = int(pc.sum(table.column("num_frames")).as_py() or 0) if facts.level == "frame" else 0
    return ShardRecord(
        name=name, input=input_uri, output=out_rel, errors=err_rel, rows=table.num_rows, error_rows=errors.num_rows,
        frames=frames, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
        errors_sha256=hashlib.sha256(err_data).hexdigest(), errors_bytes=len(err_data), node=node_id(),
        committed=now_iso(), reasons=dict(sorted(Counter(errors.column("reason").to_pylist()).items())),
    )


def _read_checked(uri: str, size: int, sha256: str | None, what: str) -> bytes:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FormatError(f"{uri}: {what} listed in the manifest is missing") from None
    if len(data) != size:
        raise FormatError(f"{uri}: truncated {what} ({len(data)} bytes, manifest says {size})")
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise FormatError(f"{uri}: checksum mismatch (sha256 {digest[:16]}..., manifest says {sha256[:16]}...)")
    return data


def read_shard_bytes(run_uri: str, rec: ShardRecord, verify: bool = True) -> bytes:
    """The shard file's bytes, size (always) and sha256 (``verify``) checked against the record."""
    return _read_checked(storage.join(run_uri, rec.output), rec.bytes, rec.sha256 if verify else None, "shard")


def iter_shard_tables(run_uri: str, facts: RunFacts, rec: ShardRecord, batch_rows: int = 4096,
                      verify: bool = True):
    """Stream one shard as canonical tables (schema, ids, counts checked against facts and record)."""
    uri = storage.join(run_uri, rec.output)
    f = io.BytesIO(read_shard_bytes(run_uri, rec, verify))
    schema = softtarget_schema(facts.level, facts.k, facts.num_classes)
    if facts.encoding == "parquet":
        pf, meta = pq_enc.open_file(f, uri, FormatError)
        _check_facts(uri, facts, meta, pf.schema_arrow, schema)
        tables = pq_enc.iter_tables(pf, uri, FormatError, batch_rows)
    else:
        tables = wds_enc.iter_tables(f, uri, FormatError, facts.level, facts.k, facts.num_classes, batch_rows)
    rows = frames = 0
    for t in tables:
        check_ids(uri, t, facts.num_classes)
        rows += t.num_rows
        if facts.level == "frame":
            frames += int(pc.sum(t.column("num_frames")).as_py() or 0)
        yield t
    # A tar cut at a member boundary still parses; the counts in the record catch it.
    if rows != rec.rows or (facts.level == "frame" and frames != rec.frames):
        problem = "truncated shard" if rows < rec.rows or frames < rec.frames else "row count mismatch"
        raise FormatError(f"{uri}: {problem} ({rows} rows / {frames} frames read, manifest says "
                          f"{rec.rows} rows / {rec.frames} frames)")


def read_shard_table(run_uri: str, facts: RunFacts, rec: ShardRecord, verify: bool = True) -> pa.Table:
    """One whole shard as a canonical table."""
    tables = list(iter_shard_tables(run_uri, facts, rec, verify=verify))
    schema = softtarget_schema(facts.level, facts.k, facts.num_classes)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_shard_numpy(run_uri: str, facts: RunFacts, rec: ShardRecord, verify: bool = True) -> dict[str, np.ndarray]:
    """One whole shard as numpy columns (see schema.table_to_numpy)."""
    return table_to_numpy(read_shard_table(run_uri, facts, rec, verify), facts.level)


def read_errors(run_uri: str, rec: ShardRecord, verify: bool = True) -> pa.Table:
    """The shard's errors table (key, input, reason, detail), checked against the record."""
    uri = storage.join(run_uri, rec.errors)
    data = _read_checked(uri, rec.errors_bytes, rec.errors_sha256 if verify else None, "errors file")
    try:
        t = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"{uri}: corrupt errors file ({e})") from None
    if t.num_rows != rec.error_rows:
        raise FormatError(f"{uri}: {t.num_rows} error rows, manifest says {rec.error_rows}")
    return t


def _check_facts(uri: str, facts: RunFacts, meta: dict, schema: pa.Schema, want: pa.Schema) -> None:
    for name, value in facts.key_facts().items():
        if meta.get(name) != value:
            raise FormatError(f"{uri}: schema metadata says {name}={meta.get(name)!r}, manifest says {value!r}")
    got = pa.schema([f.remove_metadata() for f in schema]).remove_metadata()
    if not got.equals(want.remove_metadata()):
        raise FormatError(f"{uri}: columns {got} do not match the manifest's level={facts.level} k={facts.k} "
                          f"num_classes={facts.num_classes} (expected {want.remove_metadata()})")
