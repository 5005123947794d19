"""Driver side of pseudo-labelling: add up PART/END records, compact whole shards, commit them.

The driver never receives a soft target. Teacher actors write parts and send PART records;
decode's END row says how many rows (and which key hash) a shard has. When a shard's parts
account for all of it, a compaction task (pipeline.teacher.compact) writes the shard file on
some worker and returns the commit record, which the driver appends to the commit log.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.shards import RunWriter
from pipeline.shards.manifest import ShardRecord
from pipeline.teacher.accounting import DECODE_COUNTS, MASK64, Record


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
        self._lock = threading.Lock()

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


@dataclass
class _Shard:
    parts: list[str] = field(default_factory=list)
    rows: int = 0  # soft-target rows + error rows in the parts so far
    key_hash: int = 0
    expected: int | None = None
    expected_hash: int = 0


class ShardTracker:
    """Adds up the records of the shards this run computes and commits each one once it is whole.

    compact: ``compact(name, input_uri, parts, expected, expected_hash) -> handle`` starts the
    compaction somewhere (a Ray task); ``wait(handles, timeout) -> (done [(handle, record)],
    pending handles)`` collects finished ones. Kept abstract so the driver logic is tested
    without Ray.
    """

    def __init__(self, writer: RunWriter, shards: dict[str, tuple[str, int]], progress: Progress, compact, wait):
        """shards: {name: (input uri, input bytes)} of the shards this run computes."""
        self.writer = writer
        self.shards = shards
        self.progress = progress
        self._compact, self._wait = compact, wait
        self.pending: dict[str, _Shard] = {}
        self.running: dict = {}  # compaction handle -> shard name
        self.error_reasons: Counter = Counter()
        self.image_decode: Counter = Counter()  # image decode="gpu": rows by decode path (DECODE_COUNTS)
        self.received_bytes = 0  # what the driver's loop got from the workers
        self.dataset = None  # the Ray dataset being drained (set by the job)

    def add(self, records: pa.Table) -> None:
        """Take one batch of PART / END records (from any actors, any shards, any order)."""
        self.received_bytes += records.nbytes
        for c in DECODE_COUNTS:
            self.image_decode[c] += pc.sum(records.column(c)).as_py() or 0
        cols = {c: records.column(c).to_pylist() for c in ("shard", "kind", "part", "rows", "errors", "frames",
                                                            "key_hash")}
        for name, kind, part, rows, errors, frames, h in zip(*cols.values()):
            if name not in self.shards:
                raise RuntimeError(f"a record names shard {name!r}, which this run does not compute")
            st = self.pending.setdefault(name, _Shard())
            if kind == Record.PART:
                st.parts.append(part)
                st.rows += rows + errors
                st.key_hash = (st.key_hash + h) & MASK64
                self.progress.update(samples=rows, errors=errors, frames=frames)
            elif kind == Record.END:
                st.expected, st.expected_hash = rows, h
            if st.expected is not None and st.rows >= st.expected:
                self._whole(name)
        self.poll()

    def _whole(self, name: str) -> None:
        st = self.pending.pop(name)
        if st.rows != st.expected or st.key_hash != st.expected_hash:
            raise RuntimeError(f"shard {name}: parts account for {st.rows} rows (key hash {st.key_hash:016x}) but "
                               f"decode emitted {st.expected} (key hash {st.expected_hash:016x}); not committed")
        uri = self.shards[name][0]
        self.running[self._compact(name, uri, st.parts, st.expected, st.expected_hash)] = name

    def poll(self, timeout: float = 0.0) -> None:
        """Commit the compactions that have finished (re-raises a compaction's error)."""
        if not self.running:
            self.writer.flush(force=False)
            return
        done, _ = self._wait(list(self.running), timeout)
        for handle, rec in done:
            name = self.running.pop(handle)
            self._commit(name, rec)
        self.writer.flush(force=False)

    def _commit(self, name: str, rec: ShardRecord) -> None:
        self.received_bytes += len(rec.to_json())
        self.error_reasons.update(rec.reasons)
        self.writer.commit(rec)
        self.progress.update(shard_bytes=self.shards[name][1], written=rec.bytes, shards=1)

    def finish(self) -> None:
        """Wait for every compaction; fail if a shard never became whole."""
        while self.running:
            self.poll(timeout=1.0)
        self.writer.flush(force=True)
        if self.pending:
            names = sorted(self.pending)[:5]
            raise RuntimeError(f"{len(self.pending)} shard(s) incomplete at the end of the stream: {names}")
