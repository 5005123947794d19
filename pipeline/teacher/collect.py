"""Driver side of pseudo-labelling: reassemble rows into shards, write them, report progress.

Rows of one input shard reach the driver spread over many teacher batches, in any order.
The decode stage ends every shard with a marker carrying its row count, so a shard is
complete when the marker has arrived and that many rows have. Writes run on a small thread
pool so the driver keeps pulling results while a shard goes to disk or S3.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.shards import RunWriter
from pipeline.shards.schema import softtarget_schema
from pipeline.teacher.decode import END, ERROR, SAMPLE


@dataclass
class _Pending:
    tables: list[pa.Table] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    received: int = 0
    expected: int | None = None


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Throttled one-line progress: shards, samples/s, errors, ETA by input bytes."""

    def __init__(self, total_shards: int, total_bytes: int, skipped: int, interval_s: float = 10.0, stream=None):
        self.total_shards, self.total_bytes, self.skipped = total_shards, max(total_bytes, 1), skipped
        self.interval = interval_s
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        self.last = self.start
        self.startup = 0.0
        self.samples = self.errors = self.frames = self.shards = self.done_bytes = self.written = 0
        self._lock = threading.Lock()  # updated from the writer threads

    def update(self, samples: int = 0, errors: int = 0, frames: int = 0, shard_bytes: int = 0, written: int = 0,
               shards: int = 0) -> None:
        with self._lock:
            self.samples += samples
            self.errors += errors
            self.frames += frames
            self.done_bytes += shard_bytes
            self.written += written
            self.shards += shards
            now = time.monotonic()
            if now - self.last >= self.interval:
                self.last = now
                self.print_line()

    def restart(self) -> None:
        """Start the clock now (after Ray start-up); the time before is kept as ``startup``."""
        now = time.monotonic()
        self.startup = now - self.start
        self.start = self.last = now

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def print_line(self) -> None:
        el = max(self.elapsed, 1e-9)
        frac = self.done_bytes / self.total_bytes
        eta = el * (1 - frac) / frac if frac > 0 else float("nan")
        eta_s = fmt_duration(eta) if np.isfinite(eta) else "?"
        print(
            f"[pseudo-label] shards {self.shards}/{self.total_shards} (+{self.skipped} cached) | "
            f"{self.samples:,} samples {self.samples / el:,.1f}/s | errors {self.errors:,} | "
            f"{frac:6.1%} of input bytes | elapsed {fmt_duration(el)} ETA {eta_s}",
            file=self.stream, flush=True,
        )


class ShardCollector:
    """Accumulates teacher output rows per shard and writes each shard once it is complete."""

    def __init__(self, writer: RunWriter, shards: dict[str, tuple[str, int]], progress: Progress, write_threads: int = 4):
        """shards: {name: (input uri, input bytes)} of the shards this run computes."""
        self.writer = writer
        m = writer.manifest
        self.level, self.k, self.num_classes = m.level, m.k, m.num_classes
        self.schema = softtarget_schema(self.level, self.k, self.num_classes)
        self.shards = shards
        self.progress = progress
        self.pending: dict[str, _Pending] = {}
        self.pool = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="kdpipe-write")
        self.futures: list[Future] = []
        self.error_reasons: Counter = Counter()
        self.done: list[str] = []

    def add(self, batch: pa.Table) -> None:
        """Take one teacher output batch (rows of any shards and kinds)."""
        shard_col = batch.column("shard")
        for name in pc.unique(shard_col).to_pylist():
            part = batch.filter(pc.equal(shard_col, name))
            st = self.pending.setdefault(name, _Pending())
            kinds = part.column("kind").to_numpy()
            samples = part.filter(pa.array(kinds == SAMPLE))
            if samples.num_rows:
                st.tables.append(samples.select(self.schema.names))
            errs = part.filter(pa.array(kinds == ERROR))
            if errs.num_rows:
                uri = self.shards[name][0]
                for key, reason, detail in zip(errs.column("key").to_pylist(), errs.column("reason").to_pylist(),
                                               errs.column("detail").to_pylist()):
                    st.errors.append({"key": key, "input": uri, "reason": reason, "detail": detail or ""})
            st.received += samples.num_rows + errs.num_rows
            ends = part.filter(pa.array(kinds == END))
            if ends.num_rows:
                st.expected = int(ends.column("count")[0].as_py())
            if st.expected is not None and st.received >= st.expected:
                self._complete(name)

    def _complete(self, name: str) -> None:
        st = self.pending.pop(name)
        if st.received != st.expected:
            raise RuntimeError(f"shard {name}: received {st.received} rows, decode emitted {st.expected}")
        table = pa.concat_tables(st.tables).cast(self.schema) if st.tables else self.schema.empty_table()
        keys = table.column("key")
        if pc.count_distinct(keys).as_py() != table.num_rows:
            raise RuntimeError(f"shard {name}: a key came back from the teacher twice")
        table = table.sort_by("key")  # deterministic bytes: reruns write identical shards
        for e in st.errors:
            self.error_reasons[e["reason"]] += 1
        uri, size = self.shards[name]
        self.futures.append(self.pool.submit(self._write, name, uri, size, table, st.errors))

    def _write(self, name: str, uri: str, size: int, table: pa.Table, errors: list[dict]) -> None:
        rec = self.writer.write_shard(name, uri, table, errors)
        self.done.append(name)
        self.progress.update(samples=rec.rows, errors=rec.error_rows, frames=rec.frames, shard_bytes=size,
                             written=rec.bytes, shards=1)

    def check(self) -> None:
        """Re-raise the first write failure, if any (call from the driver loop)."""
        still = []
        for f in self.futures:
            if f.done():
                f.result()
            else:
                still.append(f)
        self.futures = still

    def finish(self) -> None:
        """Wait for all writes; fail if any shard never completed."""
        for f in self.futures:
            f.result()
        self.pool.shutdown(wait=True)
        if self.pending:
            names = sorted(self.pending)[:5]
            raise RuntimeError(f"{len(self.pending)} shard(s) incomplete at the end of the stream: {names}")
