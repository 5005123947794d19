"""A soft-target run directory: the only way kdpipe writes or reads soft targets.

    RUN/manifest.json              run-level facts + the commit-log pointer (the commit point)
    RUN/_commits/*.jsonl           the commit log: one record per committed shard (commitlog.py)
    RUN/shards/NAME.parquet|.tar   soft targets of input shard NAME (one file per input shard)
    RUN/errors/NAME.parquet        quarantined keys of that shard: key, input, reason, detail
    RUN/_parts/NAME/*.parquet      teacher output parts, written by the actors (transient)
    RUN/_lease.json                the lease of the one job writing the run (lease.py)

Workers write shard files (files.py) and hand small records to the driver; the driver
(``RunWriter``) commits them. A shard is complete exactly when a committed record names
it; files no record names (a killed run, a retried task) are never read and are removed by
the next writer. ``SoftTargetRun`` opens a run in O(1) requests.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.names import unique_shard_names
from pipeline.shards import commitlog
from pipeline.shards.files import (
    errors_table, iter_shard_tables, read_errors, read_shard_bytes, read_shard_numpy, read_shard_table,
    write_shard_files,
)
from pipeline.shards.lease import Lease
from pipeline.shards.manifest import (
    COMMITS_DIR, ERRORS_DIR, MANIFEST_FILE, PARTS_DIR, SHARDS_DIR, FormatError, Manifest, ShardRecord,
    parse_manifest, read_manifest, save_manifest,
)
from pipeline.shards.schema import ERRORS_SCHEMA, softtarget_schema

__all__ = ["FingerprintMismatch", "InputPlan", "RunWriter", "SoftTargetRun", "errors_table", "open_run",
           "verify_records"]


class FingerprintMismatch(FormatError):
    """The run directory holds soft targets of a different teacher/preprocessing/k."""


def open_run(run_uri: str) -> Manifest:
    """The manifest with ``shards`` filled from the commit log; FormatError if not a run.

    O(1) requests: manifest.json, the index and the few log segments after it."""
    for attempt in range(3):
        manifest = read_manifest(run_uri)
        if manifest is None:
            raise FormatError(f"{storage.join(run_uri, MANIFEST_FILE)}: no manifest; {run_uri!r} is not a "
                              "soft-target run")
        try:
            manifest.shards = commitlog.load_records(run_uri, manifest.commits)
            return manifest
        except FormatError:
            # A writer may have folded the log into a new index between our two reads.
            if attempt == 2:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _listing(run_uri: str, folder: str) -> dict[str, int]:
    """{relative path: size} of the files directly under RUN/folder."""
    return {f"{folder}/{storage.basename(u)}": s for u, s in storage.list_sizes(storage.join(run_uri, folder)).items()}


def verify_records(run_uri: str, records: dict[str, ShardRecord], deep: bool = False, threads: int = 8
                   ) -> dict[str, str]:
    """{name: problem} for committed shards whose files are missing or damaged.

    Cheap (always): one listing of shards/ and errors/ (a request per 1,000 files on S3) and a
    size comparison. deep: also read every file and compare its sha256 with the record."""
    sizes = {**_listing(run_uri, SHARDS_DIR), **_listing(run_uri, ERRORS_DIR)}
    bad: dict[str, str] = {}
    for name, rec in records.items():
        for rel, want in ((rec.output, rec.bytes), (rec.errors, rec.errors_bytes)):
            got = sizes.get(rel)
            if got is None:
                bad[name] = f"{rel} is missing"
                break
            if got != want:
                bad[name] = f"{rel} is {got} bytes, the record says {want}"
                break
    if deep:
        def check(rec: ShardRecord) -> tuple[str, str | None]:
            for rel, want in ((rec.output, rec.sha256), (rec.errors, rec.errors_sha256)):
                digest = hashlib.sha256(storage.read_bytes(storage.join(run_uri, rel))).hexdigest()
                if digest != want:
                    return rec.name, f"{rel} has sha256 {digest[:16]}..., the record says {want[:16]}..."
            return rec.name, None

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for name, problem in pool.map(check, [r for n, r in records.items() if n not in bad]):
                if problem:
                    bad[name] = problem
    return bad


@dataclass
class InputPlan:
    """Input shards matched against a run: names for all, and which are already committed."""

    names: dict[str, str]  # canonical input uri -> shard name
    done: list  # ShardRefs whose shard is committed (and passed the checks)
    todo: list  # ShardRefs to compute
    damaged: dict[str, str]  # shard name -> why it is recomputed


class RunWriter:
    """The driver's side of a run directory: the lease, the commit log, cleanup (thread-safe).

    If the directory already holds a run, its fingerprint and encoding must match
    ``manifest``'s, else FingerprintMismatch: a run directory never mixes teachers.
    Raises LeaseHeld when another live job writes the directory.
    """

    def __init__(self, run_uri: str, manifest: Manifest, job: str = "pseudo_label.py", flush_interval_s: float = 1.0):
        self.uri = run_uri
        self._lock = threading.Lock()
        self._interval = flush_interval_s
        self._last_save = 0.0
        self._pending: list[ShardRecord] = []
        self._reindex = False
        where = storage.join(run_uri, MANIFEST_FILE)
        # never write a manifest that a reader would refuse
        parse_manifest(manifest.to_json(), f"{where} (new manifest)")
        # Refuse a foreign or mismatched directory before touching it (not even a lease file).
        self._check(read_manifest(run_uri), manifest, where)
        self.lease = Lease(run_uri, job)
        self.lease.acquire()
        try:
            existing = read_manifest(run_uri)  # again: the previous holder may have just committed
            if existing is not None:
                self._check(existing, manifest, where)
                existing.shards = commitlog.load_records(run_uri, existing.commits)
                self.manifest = existing
            else:
                storage.makedirs(run_uri)
                self.manifest = manifest
                save_manifest(run_uri, manifest)
        except BaseException:
            self.lease.release()
            raise

    @staticmethod
    def _check(existing: Manifest | None, manifest: Manifest, where: str) -> None:
        if existing is None:
            return
        if existing.fingerprint != manifest.fingerprint:
            raise FingerprintMismatch(
                f"{where}: this directory holds soft targets with fingerprint {existing.fingerprint[:16]}..., "
                f"but this run's teacher/preprocessing/k give {manifest.fingerprint[:16]}...; "
                "use a new --output (a run directory never mixes teachers)")
        if existing.encoding != manifest.encoding:
            raise FormatError(f"{where}: this run is encoded as {existing.encoding}, not {manifest.encoding}; "
                              "use the same --format or a new --output")
        if existing.input_options != manifest.input_options:
            raise FormatError(f"{where}: this run read its Parquet inputs with {existing.input_options}, not "
                              f"{manifest.input_options}; use the same --key-column / --data-column or a new --output")

    # -- planning -----------------------------------------------------------------------
    def plan_inputs(self, refs: list, verify: bool = False) -> InputPlan:
        """Match input shards (canonical URIs) to committed shards, name the new ones, and check
        the committed files of the matched ones (sizes; sha256 too with ``verify``). Damaged
        shards are dropped from the log and recomputed."""
        by_input = {r.input: n for n, r in self.manifest.shards.items()}
        taken = {n: r.input for n, r in self.manifest.shards.items()}
        names = unique_shard_names([r.uri for r in refs], taken)
        matched = {by_input[r.uri]: self.manifest.shards[by_input[r.uri]] for r in refs if r.uri in by_input}
        damaged = verify_records(self.uri, matched, deep=verify)
        if damaged:
            self.drop(list(damaged))
        done = [r for r in refs if r.uri in by_input and by_input[r.uri] not in damaged]
        todo = [r for r in refs if r.uri not in by_input or by_input[r.uri] in damaged]
        return InputPlan(names, done, todo, damaged)

    def cleanup(self) -> int:
        """Remove what no committed record names: uncommitted shard and errors files, parts,
        unfinished temp files and stale commit files. Returns the number of files removed."""
        keep = {r.output for r in self.manifest.shards.values()} | {r.errors for r in self.manifest.shards.values()}
        keep |= commitlog.live_files(self.manifest.commits)
        removed = 0
        for folder in (SHARDS_DIR, ERRORS_DIR, COMMITS_DIR):
            for rel in _listing(self.uri, folder):
                if rel not in keep:
                    storage.remove(storage.join(self.uri, rel))
                    removed += 1
        parts = storage.join(self.uri, PARTS_DIR)
        if storage.exists(parts):
            removed += len(storage.list_sizes(parts, recursive=True))
            storage.remove(parts)
        if not storage.is_remote(self.uri):  # a killed local manifest write (S3 PUTs leave none)
            for rel in _listing(self.uri, "."):
                if storage.basename(rel).startswith(".tmp-manifest"):
                    storage.remove(storage.join(self.uri, storage.basename(rel)))
                    removed += 1
        return removed

    # -- committing ---------------------------------------------------------------------
    def completed(self) -> set[str]:
        with self._lock:
            return set(self.manifest.shards)

    def drop(self, names: list[str]) -> None:
        """Forget committed shards (damaged ones about to be recomputed): the next save writes
        a new index without them."""
        with self._lock:
            for n in names:
                self.manifest.shards.pop(n, None)
            self._reindex = True
        self.flush(force=True)

    def write_shard(self, name: str, input_uri: str, table: pa.Table, errors) -> ShardRecord:
        """Write one shard's files here and commit it (a producer that holds whole shards).

        table: canonical soft-target table; errors: ERRORS_SCHEMA table or rows {key, input,
        reason, detail}."""
        if not isinstance(errors, pa.Table):
            errors = errors_table(list(errors))
        rec = write_shard_files(self.uri, self.manifest.facts(), name, input_uri, table, errors)
        self.commit(rec)
        return rec

    def commit(self, rec: ShardRecord) -> None:
        """Record a shard complete; saved within ``flush_interval_s`` (or at ``flush``)."""
        with self._lock:
            self.manifest.shards[rec.name] = rec
            self._pending.append(rec)
        self.flush(force=False)

    def flush(self, force: bool = True, run_summary: dict | None = None) -> None:
        """Commit pending records: one log segment (O(records since the last save)), then
        manifest.json; fold the log into a new index when it has grown as large as the index."""
        with self._lock:
            if run_summary is not None:
                self.manifest.runs.append(run_summary)
            due = force or time.monotonic() - self._last_save >= self._interval
            if not due or not (self._pending or self._reindex or run_summary is not None or force):
                return
            self.lease.check()
            m = self.manifest
            if self._pending:
                m.commits = commitlog.append_segment(self.uri, m.commits, self._pending)
                self._pending = []
            if self._reindex or commitlog.needs_compaction(m.commits):
                m.commits = commitlog.write_index(self.uri, m.commits, m.shards)
                self._reindex = False
            save_manifest(self.uri, m)
            self._last_save = time.monotonic()

    def close(self, run_summary: dict | None = None) -> None:
        """Final save (with the run's summary), one index for the next reader, cleanup of stale
        commit files and parts, lease released."""
        try:
            with self._lock:
                self._reindex = self._reindex or bool(self.manifest.commits["log"]) or bool(self._pending)
            self.flush(force=True, run_summary=run_summary)
            self.cleanup()
        finally:
            self.lease.release()

    def abandon(self) -> None:
        """Save what was committed and give the lease back (a failed run); never raises, so the
        error that ended the run is the one reported."""
        try:
            self.flush(force=True)
        except Exception as e:
            print(f"[pseudo-label] warning: could not save the last commits ({storage.describe_error(e)})", flush=True)
        finally:
            self.lease.release()


class SoftTargetRun:
    """Read side of a run directory. Validates the manifest on open, each shard on read.

    Opening costs O(1) requests (``open_run``); reading a shard costs the shard's own files."""

    def __init__(self, run_uri: str):
        self.uri = run_uri
        self.manifest: Manifest = open_run(run_uri)
        self.facts = self.manifest.facts()
        self.schema = softtarget_schema(self.manifest.level, self.manifest.k, self.manifest.num_classes)

    @property
    def shard_names(self) -> list[str]:
        return sorted(self.manifest.shards)

    def record(self, name: str) -> ShardRecord:
        try:
            return self.manifest.shards[name]
        except KeyError:
            raise KeyError(f"{self.uri}: no shard named {name!r} in the manifest") from None

    def shard_uri(self, name: str) -> str:
        return storage.join(self.uri, self.record(name).output)

    def read_bytes(self, name: str, verify: bool = True) -> bytes:
        return read_shard_bytes(self.uri, self.record(name), verify)

    def iter_tables(self, name: str, batch_rows: int = 4096, verify: bool = True):
        """Stream one shard as canonical tables (schema checked against the manifest)."""
        return iter_shard_tables(self.uri, self.facts, self.record(name), batch_rows, verify)

    def read_table(self, name: str, verify: bool = True) -> pa.Table:
        """One whole shard as a canonical table."""
        return read_shard_table(self.uri, self.facts, self.record(name), verify)

    def read_numpy(self, name: str, verify: bool = True) -> dict[str, np.ndarray]:
        """One whole shard as numpy columns (see schema.table_to_numpy)."""
        return read_shard_numpy(self.uri, self.facts, self.record(name), verify)

    def errors(self) -> pa.Table:
        """All quarantined keys of the run: key, input, reason, detail."""
        tables = [read_errors(self.uri, self.record(n)) for n in self.shard_names]
        return pa.concat_tables(tables) if tables else ERRORS_SCHEMA.empty_table()

    def verify(self, deep: bool = False) -> dict[str, str]:
        """{name: problem} for shards whose files are missing or damaged (see verify_records)."""
        return verify_records(self.uri, self.manifest.shards, deep)
