"""A soft-target run directory: the only way kdpipe writes or reads soft targets.

    RUN/manifest.json                  run-level facts + one record per input shard
    RUN/shards/NAME.parquet|.tar       soft targets of input shard NAME (one per input shard)
    RUN/errors/NAME.parquet            quarantined keys of that shard: key, input, reason, detail
    RUN/_status/NAME.json              completion record, written last (crash safety)

Per shard, the errors file is written first, then the shard, then the status record; each
write is atomic. A shard counts as complete only once its status record exists.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.shards import parquet as pq_enc
from pipeline.shards import wds as wds_enc
from pipeline.shards.manifest import (
    ENCODINGS, ERRORS_DIR, MANIFEST_FILE, SHARDS_DIR, FormatError, Manifest, ShardRecord,
    load_manifest, parse_manifest, save_manifest, write_status,
)
from pipeline.shards.schema import ERRORS_SCHEMA, softtarget_schema, table_to_numpy


class FingerprintMismatch(FormatError):
    """The run directory holds soft targets of a different teacher/preprocessing/k."""


def errors_table(rows: list[dict]) -> pa.Table:
    """Errors rows ({key, input, reason, detail}) -> the errors table."""
    return pa.Table.from_pylist(
        [{c: str(r.get(c, "")) for c in ERRORS_SCHEMA.names} for r in rows], schema=ERRORS_SCHEMA
    )


def encode_errors(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(errors_table(rows), buf, compression="zstd")
    return buf.getvalue()


def _check_ids(uri: str, table: pa.Table, num_classes: int) -> None:
    """Class ids and argmax must lie in 0..num_classes-1."""
    for c in ("ids", "argmax"):
        col = table.column(c)
        while pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
            col = pc.list_flatten(col)
        if len(col):
            top = pc.max(col).as_py()
            if top is not None and top >= num_classes:
                raise FormatError(f"{uri}: class id {top} in column {c} out of range for num_classes={num_classes}")


class RunWriter:
    """Writes shards into a run directory and keeps its manifest up to date (thread-safe).

    If the directory already holds a run, its fingerprint and encoding must match
    ``manifest``'s, else FingerprintMismatch: a run directory never mixes teachers.
    """

    def __init__(self, run_uri: str, manifest: Manifest, manifest_interval_s: float = 5.0):
        self.uri = run_uri
        self._lock = threading.Lock()
        self._interval = manifest_interval_s
        self._last_save = 0.0
        # never write a manifest that a reader would refuse
        parse_manifest(manifest.to_json(), f"{storage.join(run_uri, MANIFEST_FILE)} (new manifest)")
        existing = load_manifest(run_uri)
        if existing is not None:
            where = storage.join(run_uri, MANIFEST_FILE)
            if existing.fingerprint != manifest.fingerprint:
                raise FingerprintMismatch(
                    f"{where}: this directory holds soft targets with fingerprint {existing.fingerprint[:16]}..., "
                    f"but this run's teacher/preprocessing/k give {manifest.fingerprint[:16]}...; "
                    "use a new --output (a run directory never mixes teachers)"
                )
            if existing.encoding != manifest.encoding:
                raise FormatError(
                    f"{where}: this run is encoded as {existing.encoding}, not {manifest.encoding}; "
                    "use the same --format or a new --output"
                )
            self.manifest = existing
        else:
            storage.makedirs(run_uri)
            self.manifest = manifest
            save_manifest(run_uri, manifest)

    def completed(self) -> set[str]:
        """Names of shards already complete in this run."""
        with self._lock:
            return {n for n, r in self.manifest.shards.items() if r.status == "complete"}

    def write_shard(self, name: str, input_uri: str, table: pa.Table, errors: list[dict]) -> ShardRecord:
        """Encode and atomically write one shard and its errors, then record it complete.

        table: canonical soft-target table (schema from pipeline.shards.schema).
        errors: rows {key, input, reason, detail} for the shard's quarantined keys.
        """
        m = self.manifest
        out_uri = storage.join(self.uri, SHARDS_DIR, f"{name}{ENCODINGS[m.encoding]}")
        want = softtarget_schema(m.level, m.k, m.num_classes)
        got = pa.schema([f.remove_metadata() for f in table.schema])
        if not got.equals(want):
            raise FormatError(f"{out_uri}: table columns {got} do not match the manifest's level={m.level} "
                              f"k={m.k} num_classes={m.num_classes} (expected {want}); nothing written")
        _check_ids(out_uri, table, m.num_classes)
        if m.encoding == "parquet":
            data = pq_enc.encode(table, {**m.key_facts(), "input": input_uri})
        else:
            data = wds_enc.encode(table, m.level)
        out_rel = f"{SHARDS_DIR}/{name}{ENCODINGS[m.encoding]}"
        err_rel = f"{ERRORS_DIR}/{name}.parquet"
        storage.atomic_write_bytes(storage.join(self.uri, err_rel), encode_errors(errors))
        storage.atomic_write_bytes(storage.join(self.uri, out_rel), data)
        frames = int(pc.sum(table.column("num_frames")).as_py() or 0) if m.level == "frame" else 0
        rec = ShardRecord(
            input=input_uri, output=out_rel, errors=err_rel, rows=table.num_rows, error_rows=len(errors),
            sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), frames=frames,
        )
        write_status(self.uri, name, rec, m.fingerprint)
        with self._lock:
            m.shards[name] = rec
        self.flush(force=False)
        return rec

    def flush(self, force: bool = True, run_summary: dict | None = None) -> None:
        """Rewrite manifest.json (at most every ``manifest_interval_s`` unless forced)."""
        with self._lock:
            if run_summary is not None:
                self.manifest.runs.append(run_summary)
            if not force and time.monotonic() - self._last_save < self._interval:
                return
            self._last_save = time.monotonic()
            save_manifest(self.uri, self.manifest)


class SoftTargetRun:
    """Read side of a run directory. Validates the manifest on open, each shard on read."""

    def __init__(self, run_uri: str):
        self.uri = run_uri
        manifest = load_manifest(run_uri)
        if manifest is None:
            raise FormatError(f"{storage.join(run_uri, MANIFEST_FILE)}: no manifest; {run_uri!r} is not a soft-target run")
        self.manifest: Manifest = manifest
        self.schema = softtarget_schema(manifest.level, manifest.k, manifest.num_classes)

    @property
    def shard_names(self) -> list[str]:
        return sorted(n for n, r in self.manifest.shards.items() if r.status == "complete")

    def shard_uri(self, name: str) -> str:
        return storage.join(self.uri, self.manifest.shards[name].output)

    def _record(self, name: str) -> ShardRecord:
        try:
            return self.manifest.shards[name]
        except KeyError:
            raise KeyError(f"{self.uri}: no shard named {name!r} in the manifest") from None

    def read_bytes(self, name: str, verify: bool = True) -> bytes:
        rec = self._record(name)
        uri = storage.join(self.uri, rec.output)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise FormatError(f"{uri}: shard listed in the manifest is missing") from None
        if verify:
            if len(data) != rec.bytes:
                raise FormatError(f"{uri}: truncated shard ({len(data)} bytes, manifest says {rec.bytes})")
            digest = hashlib.sha256(data).hexdigest()
            if digest != rec.sha256:
                raise FormatError(f"{uri}: checksum mismatch (sha256 {digest[:16]}..., manifest says {rec.sha256[:16]}...)")
        return data

    def iter_tables(self, name: str, batch_rows: int = 4096, verify: bool = True):
        """Stream one shard as canonical tables (schema checked against the manifest)."""
        m = self.manifest
        uri = self.shard_uri(name)
        f = io.BytesIO(self.read_bytes(name, verify=verify))
        if m.encoding == "parquet":
            pf, facts = pq_enc.open_file(f, uri, FormatError)
            self._check_facts(uri, facts, pf.schema_arrow)
            tables = pq_enc.iter_tables(pf, uri, FormatError, batch_rows)
        else:
            tables = wds_enc.iter_tables(f, uri, FormatError, m.level, m.k, m.num_classes, batch_rows)
        rec = self._record(name)
        rows = frames = 0
        for t in tables:
            _check_ids(uri, t, m.num_classes)
            rows += t.num_rows
            if m.level == "frame":
                frames += int(pc.sum(t.column("num_frames")).as_py() or 0)
            yield t
        # A tar cut at a member boundary still parses; the counts in the manifest catch it.
        if rows != rec.rows or (m.level == "frame" and frames != rec.frames):
            problem = "truncated shard" if rows < rec.rows or frames < rec.frames else "row count mismatch"
            raise FormatError(f"{uri}: {problem} ({rows} rows / {frames} frames read, manifest says "
                              f"{rec.rows} rows / {rec.frames} frames)")

    def read_table(self, name: str, verify: bool = True) -> pa.Table:
        """One whole shard as a canonical table."""
        tables = list(self.iter_tables(name, verify=verify))
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def read_numpy(self, name: str, verify: bool = True) -> dict[str, np.ndarray]:
        """One whole shard as numpy columns (see schema.table_to_numpy)."""
        return table_to_numpy(self.read_table(name, verify), self.manifest.level)

    def errors(self) -> pa.Table:
        """All quarantined keys of the run: key, input, reason, detail."""
        tables = []
        for name in self.shard_names:
            uri = storage.join(self.uri, self.manifest.shards[name].errors)
            tables.append(pq.read_table(io.BytesIO(storage.read_bytes(uri))))
        return pa.concat_tables(tables) if tables else ERRORS_SCHEMA.empty_table()

    def _check_facts(self, uri: str, facts: dict, schema: pa.Schema) -> None:
        m = self.manifest
        for name, want in m.key_facts().items():
            if facts.get(name) != want:
                raise FormatError(f"{uri}: schema metadata says {name}={facts.get(name)!r}, manifest says {want!r}")
        got = pa.schema([f.remove_metadata() for f in schema]).remove_metadata()
        if not got.equals(self.schema.remove_metadata()):
            raise FormatError(f"{uri}: columns {got} do not match the manifest's level={m.level} k={m.k} "
                              f"num_classes={m.num_classes} (expected {self.schema.remove_metadata()})")
