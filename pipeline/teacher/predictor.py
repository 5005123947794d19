"""Stage 2 of pseudo-labelling: the teacher (one model or an ensemble) in a Ray Data actor pool,
writing what it computes straight into the run directory.

Loads its models once in ``__init__`` (Ray's batch-inference pattern). ``__call__`` turns a
batch of decoded rows into top-k soft targets, writes the rows of each shard in the batch
(soft targets and errors, including a sample whose teacher output is NaN/inf) as one part
file ``RUN/_parts/NAME/<uuid>.parquet``, and returns only PART records and the decode
stage's END rows (pipeline.teacher.accounting): a few dozen bytes per part.

The device is never left waiting for the host. Ray Data runs up to ``concurrency`` calls of
one actor at once, on threads (``ActorPoolStrategy(max_concurrent_calls_per_actor=...,
enable_true_multi_threading=True)``), and each call goes through:

    1. host    the payload column into its slot's reused pinned staging buffer
    2. copy    host -> device on the slot's own CUDA stream (``non_blocking``); with image
               decode="gpu", steps 1-2 are the JPEGs decoded, resized and cropped on that
               stream instead (pipeline.modalities.device_decode)
    3. device  under one lock: wait for that copy, enqueue the forward, top-k and the
               finiteness check on the compute stream, and the copies of their results into
               the slot's pinned output buffers (``non_blocking``); record an event
    4. host    wait for the event (the GIL is released), build Arrow, write the part files
    5. return  the PART records of exactly this call's rows

so while the device runs batch n, other calls stage batch n+1 and write batch n-1. The lock
only orders what is *enqueued* on the device (and keeps one forward's activations in memory
at a time). On a CPU device it serialises the forwards themselves, and top-k, host work
there, runs after it, beside the next forward. A call returns its records only after its
parts are written, so accounting is per call, as without concurrency: a killed actor's calls
in flight return nothing, Ray Data resubmits their batches, and the parts they left are named
by no record (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.modalities.image import JPEG, JPEG_PROGRESSIVE, PIXELS
from pipeline.modalities.payload import encoded
from pipeline.modalities.staging import StagingBuffer, payload_batch
from pipeline.models.runner import ModelRunner
from pipeline.shards.files import node_id
from pipeline.shards.manifest import PARTS_DIR, RunFacts
from pipeline.shards.schema import softtarget_schema, table_from_topk
from pipeline.softtargets import TopK, ensemble_logprobs, topk_from_logits, topk_from_logprobs
from pipeline.teacher.accounting import Record, Row, key_hash, records_table


def part_schema(level: str, k: int, num_classes: int) -> pa.Schema:
    """A part file: soft-target columns (null on error rows) + kind, reason, detail."""
    st = softtarget_schema(level, k, num_classes)
    return pa.schema([f.with_nullable(True) for f in st] + [
        pa.field("kind", pa.int8()), pa.field("reason", pa.string()), pa.field("detail", pa.string()),
    ])


def _topk_and_finite(out, k: int, level: str) -> tuple[TopK, torch.Tensor]:
    """The model outputs' top-k (B[, T'], k) and which rows are finite (B,) bool, on the device.

    A row is finite when every logit of every model is, over its valid frames at frame level
    (padding frames may hold anything)."""
    outs = out.logits
    topk = topk_from_logprobs(ensemble_logprobs(outs), k) if len(outs) > 1 else topk_from_logits(outs[0], k)
    finite = None
    for logits in outs:  # every member must be finite (one at a time: no (M, B, ...) stack)
        if level == "frame":
            t = torch.arange(logits.shape[-2], device=logits.device)
            valid = (t.unsqueeze(0) < out.frames.unsqueeze(1)).unsqueeze(-1)  # (B, T', 1)
            ok = (torch.isfinite(logits) | ~valid).flatten(-2).all(-1)
        else:
            ok = torch.isfinite(logits).all(-1)
        finite = ok if finite is None else finite & ok
    return topk, finite


class _Slot:
    """What one call in flight owns: pinned staging for its input and outputs, a copy stream."""

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.input = StagingBuffer(pin=cuda)
        self.buffers: dict[str, StagingBuffer] = {}  # pinned, by name: lengths in, results out
        self.cuda = cuda
        self.stream = torch.cuda.Stream(device) if cuda else None

    def pinned(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (host or device) copied into this slot's pinned buffer ``name``: synchronously
        from the host, without blocking from the device (valid once the caller's event has
        completed)."""
        if name not in self.buffers:
            self.buffers[name] = StagingBuffer(pin=True)
        return self.buffers[name].view(tuple(t.shape), t.dtype).copy_(t, non_blocking=t.is_cuda)

    def host(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A device output's copy on the host (``pinned``); on a CPU device the tensor itself."""
        return self.pinned(name, t) if self.cuda else t


class TeacherPredictor:
    """Ray Data UDF (actor): decoded rows (pyarrow) -> part files + PART/END records (pyarrow).

    Safe to call from ``concurrency`` threads at once (see the module docstring); more
    concurrent calls than that wait for a free slot."""

    def __init__(self, specs: tuple, trust: tuple, preprocessing, facts: RunFacts, run_uri: str,
                 precision: str = "bf16", device: str | None = None, runner: ModelRunner | None = None,
                 concurrency: int = 1, compile_batch: int | None = None):
        """runner: the loaded teacher to use instead of loading ``specs`` (in-process benches);
        compile_batch: torch.compile the teacher for batches of this many rows (ModelRunner.compile)."""
        self.runner = runner or ModelRunner.from_specs(specs, trust, preprocessing, device, precision)
        if compile_batch and runner is None:
            self.runner.compile(compile_batch)
        self.facts = facts
        self.run_uri = run_uri
        self.schema = part_schema(facts.level, facts.k, facts.num_classes)
        self.node = node_id()
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for _ in range(max(1, concurrency)):
            self._slots.put(_Slot(self.runner.device))
        self._device_lock = threading.Lock()

    def __call__(self, table: pa.Table) -> pa.Table:
        kinds = table.column("kind").to_numpy()
        samples = table if (kinds == Row.SAMPLE).all() else table.filter(pa.array(kinds == Row.SAMPLE))
        slot = self._slots.get()
        try:  # the slot's buffers back the tables until their parts are written
            parts = [self._predict(samples, slot)] if samples.num_rows else []
            errs = table.filter(pa.array(kinds == Row.ERROR))
            if errs.num_rows:
                parts.append(self._errors(errs.column("key"), errs.column("reason"), errs.column("detail"),
                                          errs.column("shard")))
            out = pa.concat_tables(parts) if parts else None
            records = self._write_parts(out) if out is not None else []
        finally:
            self._slots.put(slot)
        ends = table.filter(pa.array(kinds == Row.END))
        for name, count, h in zip(ends.column("shard").to_pylist(), ends.column("count").to_pylist(),
                                  ends.column("key_hash").to_pylist()):
            records.append({"shard": name, "kind": Record.END, "rows": count, "key_hash": h})
        return records_table(records)

    def _errors(self, keys, reasons, details, shards) -> pa.Table:
        n = len(keys)
        cols = {f.name: pa.nulls(n, f.type) for f in self.schema}
        cols.update(key=keys, kind=pa.array(np.full(n, Row.ERROR, np.int8)), reason=reasons, detail=details)
        return _with_side_columns(pa.table(cols, schema=self.schema), shards, np.full(n, NO_PATH, np.int8))

    def _on_device(self, samples: pa.Table, slot: _Slot):
        """Image decode="gpu": the batch's JPEGs decoded on the device, on the slot's stream ->
        (samples that decoded, x (B_ok, crop, crop, 3) uint8 on the device, their decode paths,
        an error part for those that did not, or None)."""
        from pipeline.modalities.device_decode import decode_batch

        with torch.cuda.stream(slot.stream) if slot.cuda else contextlib.nullcontext():
            dec = decode_batch(samples.column("payload"), self.runner.prep, self.runner.device)
        failed = None
        if dec.errors:
            bad = sorted(dec.errors)
            failed = self._errors(samples.column("key").take(pa.array(bad)),
                                  pa.array([dec.errors[i].reason for i in bad], pa.string()),
                                  pa.array([dec.errors[i].detail[:500] for i in bad], pa.string()),
                                  samples.column("shard").take(pa.array(bad)))
            samples = samples.filter(pa.array(dec.ok))
        return samples, dec.x, dec.paths[dec.ok], failed

    def _predict(self, samples: pa.Table, slot: _Slot) -> pa.Table:
        f = self.facts
        runner = self.runner
        failed = None
        if encoded(runner.prep):  # 1-2. decoded on the device, on the slot's stream
            samples, x, paths, failed = self._on_device(samples, slot)
            lengths = None
            if not samples.num_rows:
                return failed
        else:
            x, lengths = payload_batch(samples.column("payload"), runner.prep, staging=slot.input)  # 1. host
            paths = np.full(samples.num_rows, NO_PATH, np.int8)
        if slot.cuda and not x.is_cuda:  # 2. copy, on the slot's stream: overlaps the forward of another call
            if lengths is not None:  # from pinned memory too: a pageable source would make the copy wait
                lengths = slot.pinned("lengths", lengths)
            with torch.cuda.stream(slot.stream):
                x = x.to(runner.device, non_blocking=True)
                lengths = lengths.to(runner.device, non_blocking=True) if lengths is not None else None
        with self._device_lock, torch.inference_mode():  # 3. device: enqueue, do not wait
            if slot.cuda:
                compute = torch.cuda.current_stream(runner.device)
                compute.wait_stream(slot.stream)
                for t in (x, lengths):  # allocated on the copy stream, used on this one
                    if t is not None:
                        t.record_stream(compute)
            out = runner.predict(x, lengths)
            if slot.cuda:  # queued right behind this forward, before the next one's: its results come sooner
                host, done = self._results(out, slot)
                # The device tensors are not needed once their copies are queued (the stream keeps
                # them alive for those): the calls waiting below hold no device memory.
                del out, x, lengths
        if not slot.cuda:  # on a CPU device this is host work: outside the lock, beside the next forward
            with torch.inference_mode():
                host, done = self._results(out, slot)
        if done is not None:  # 4. host: the GIL is released while the device finishes
            done.synchronize()
        finite = host["finite"].numpy()
        good, bad = np.nonzero(finite)[0], np.nonzero(~finite)[0]
        keys = samples.column("key")
        parts = []
        if len(good):
            topk = TopK(**{c: host[c] for c in TopK.__dataclass_fields__})
            frames = host["frames"].numpy() if "frames" in host else None
            if len(good) < len(finite):
                sel = torch.from_numpy(good)
                topk = TopK(**{c: getattr(topk, c).index_select(0, sel) for c in TopK.__dataclass_fields__})
                frames = frames[good] if frames is not None else None
            good_keys = keys if len(good) == len(keys) else keys.take(pa.array(good))
            st = table_from_topk(good_keys, topk, f.level, f.k, f.num_classes, frames)
            n = len(good)
            cols = {c: st.column(c) for c in st.column_names}
            cols.update(kind=pa.array(np.full(n, Row.SAMPLE, np.int8)), reason=pa.nulls(n, pa.string()),
                        detail=pa.nulls(n, pa.string()))
            part = pa.table(cols).cast(self.schema)
            parts.append(_with_side_columns(part, samples.column("shard").take(pa.array(good)), paths[good]))
        if len(bad):
            n = len(bad)
            parts.append(self._errors(keys.take(pa.array(bad)), pa.array(["nonfinite_output"] * n),
                                      pa.array(["teacher output has NaN or inf"] * n),
                                      samples.column("shard").take(pa.array(bad))))
        if failed is not None:
            parts.append(failed)
        return pa.concat_tables(parts)

    def _results(self, out, slot: _Slot) -> tuple[dict[str, torch.Tensor], "torch.cuda.Event | None"]:
        """Top-k, the finiteness check and frames of a forward's outputs, copied into the slot's
        pinned buffers without blocking: {name: host tensor} and the event after which they
        are there (None on a CPU device: they are there already)."""
        topk, finite = _topk_and_finite(out, self.facts.k, self.facts.level)
        host = {c: slot.host(c, getattr(topk, c)) for c in TopK.__dataclass_fields__}
        host["finite"] = slot.host("finite", finite)
        if out.frames is not None:
            host["frames"] = slot.host("frames", out.frames)
        if not slot.cuda:
            return host, None
        done = torch.cuda.Event(blocking=True)  # its synchronize() sleeps; a default event spins a core
        done.record(torch.cuda.current_stream(self.runner.device))
        return host, done

    def _write_parts(self, rows: pa.Table) -> list[dict]:
        """One part file per shard in the batch (atomic, not fsync'ed: the shard file the
        compaction writes from it is); returns their PART records."""
        records = []
        shard_col = rows.column("shard")
        for name in pc.unique(shard_col).to_pylist():
            part = rows.filter(pc.equal(shard_col, name))
            paths = part.column("decode_path").to_numpy()
            part = part.drop_columns(list(SIDE_COLUMNS))
            buf = io.BytesIO()
            pq.write_table(part, buf, compression="lz4")
            data = buf.getvalue()
            rel = f"{PARTS_DIR}/{name}/{uuid.uuid4().hex}.parquet"
            storage.atomic_write_bytes(storage.join(self.run_uri, rel), data, durable=False)
            kinds = part.column("kind").to_numpy()
            frames = 0
            if self.facts.level == "frame":
                frames = int(pc.sum(part.column("num_frames")).as_py() or 0)
            records.append({"shard": name, "kind": Record.PART, "part": rel, "rows": int((kinds == Row.SAMPLE).sum()),
                            "errors": int((kinds == Row.ERROR).sum()), "frames": frames,
                            "key_hash": key_hash(part.column("key")), "bytes": len(data),
                            "node": self.node, **decode_counts(paths)})
        return records


# Columns the rows of a call carry until their part is written, never into it: the shard a
# row belongs to and how its image was decoded (device_decode's path codes; NO_PATH: not
# applicable, as for audio, CPU-decoded caches and error rows).
SIDE_COLUMNS = ("shard", "decode_path")
NO_PATH = -1


def _with_side_columns(table: pa.Table, shards, paths: np.ndarray) -> pa.Table:
    return table.append_column("shard", shards).append_column("decode_path", pa.array(paths, pa.int8()))


def decode_counts(paths: np.ndarray) -> dict[str, int]:
    """A part's rows by decode path (image decode="gpu"): the PART record's counts."""
    from pipeline.modalities.device_decode import CPU_FALLBACK

    on_gpu = (paths == JPEG) | (paths == JPEG_PROGRESSIVE)
    return {"gpu_decoded": int(on_gpu.sum()), "gpu_progressive": int((paths == JPEG_PROGRESSIVE).sum()),
            "cpu_decoded": int((paths == PIXELS).sum()), "cpu_fallback": int((paths == CPU_FALLBACK).sum())}
