"""Stage 2 of pseudo-labelling: the teacher (one model or an ensemble) in a Ray Data actor pool,
writing what it computes straight into the run directory.

Loads its models once in ``__init__`` (Ray's batch-inference pattern). ``__call__`` turns a
batch of decoded rows into top-k soft targets, writes the rows of each shard in the batch
(soft targets and errors, including a sample whose teacher output is NaN/inf) as one part
file ``RUN/_parts/NAME/<uuid>.parquet``, and returns only PART records and the decode
stage's END rows (pipeline.teacher.accounting): a few dozen bytes per part.
"""

from __future__ import annotations

import io
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.models.runner import ModelRunner
from pipeline.models.spec import build_model, parse_spec
from pipeline.shards.files import node_id
from pipeline.shards.manifest import PARTS_DIR, RunFacts
from pipeline.shards.schema import softtarget_schema, table_from_topk
from pipeline.softtargets import TopK, ensemble_logprobs, topk_from_logits, topk_from_logprobs
from pipeline.teacher.accounting import END as END_RECORD
from pipeline.teacher.accounting import PART, key_hash, records_table
from pipeline.teacher.accounting import END_ROW as END
from pipeline.teacher.accounting import ERROR, SAMPLE


def part_schema(level: str, k: int, num_classes: int) -> pa.Schema:
    """A part file: soft-target columns (null on error rows) + kind, reason, detail."""
    st = softtarget_schema(level, k, num_classes)
    return pa.schema([f.with_nullable(True) for f in st] + [
        pa.field("kind", pa.int8()), pa.field("reason", pa.string()), pa.field("detail", pa.string()),
    ])


def load_teacher(specs, trust, preprocessing, precision: str, device) -> ModelRunner:
    """The teacher's models (eval mode, on the device) in a ModelRunner."""
    runner = ModelRunner([], preprocessing, device, precision)
    runner.models = [build_model(parse_spec(s, trust)).to(runner.device).eval() for s in specs]
    return runner


class TeacherPredictor:
    """Ray Data UDF (actor): decoded rows (pyarrow) -> part files + PART/END records (pyarrow)."""

    def __init__(self, specs: tuple, trust: tuple, preprocessing, facts: RunFacts, run_uri: str,
                 precision: str = "bf16", device: str | None = None, runner: ModelRunner | None = None):
        """runner: the loaded teacher to use instead of loading ``specs`` (in-process benches)."""
        self.runner = runner or load_teacher(specs, trust, preprocessing, precision, device)
        self.facts = facts
        self.run_uri = run_uri
        self.schema = part_schema(facts.level, facts.k, facts.num_classes)
        self.node = node_id()

    def __call__(self, table: pa.Table) -> pa.Table:
        kinds = table.column("kind").to_numpy()
        samples = table if (kinds == SAMPLE).all() else table.filter(pa.array(kinds == SAMPLE))
        parts = [self._predict(samples)] if samples.num_rows else []
        errs = table.filter(pa.array(kinds == ERROR))
        if errs.num_rows:
            parts.append(self._errors(errs.column("key"), errs.column("reason"), errs.column("detail"),
                                      errs.column("shard")))
        out = pa.concat_tables(parts) if parts else None
        records = self._write_parts(out) if out is not None else []
        ends = table.filter(pa.array(kinds == END))
        for name, count, h in zip(ends.column("shard").to_pylist(), ends.column("count").to_pylist(),
                                  ends.column("key_hash").to_pylist()):
            records.append({"shard": name, "kind": END_RECORD, "rows": count, "key_hash": h})
        return records_table(records)

    def _errors(self, keys, reasons, details, shards) -> pa.Table:
        n = len(keys)
        cols = {f.name: pa.nulls(n, f.type) for f in self.schema}
        cols.update(key=keys, kind=pa.array(np.full(n, ERROR, np.int8)), reason=reasons, detail=details)
        return pa.table(cols, schema=self.schema).append_column("shard", shards)

    def _predict(self, samples: pa.Table) -> pa.Table:
        f = self.facts
        x, lengths = self.runner.to_device(samples.column("payload"))
        out = self.runner.predict(x, lengths)
        outs, out_frames = out.logits, out.frames
        if len(outs) > 1:
            topk = topk_from_logprobs(ensemble_logprobs(outs), f.k)
            logits = torch.stack(outs)  # (M, B, ...) only for the finiteness check
        else:
            topk = topk_from_logits(outs[0], f.k)
            logits = outs[0]
        if f.level == "frame":
            t = torch.arange(logits.shape[-2], device=logits.device)
            valid = (t.unsqueeze(0) < out_frames.unsqueeze(1)).unsqueeze(-1)  # (B, T', 1)
            finite = (torch.isfinite(logits) | ~valid).flatten(-2).all(-1)
        else:
            finite = torch.isfinite(logits).all(-1)
        if finite.dim() > 1:  # ensemble: every member must be finite
            finite = finite.all(0)
        finite = finite.cpu().numpy()
        good, bad = np.nonzero(finite)[0], np.nonzero(~finite)[0]
        keys = samples.column("key")
        parts = []
        if len(good):
            sel = torch.from_numpy(good).to(topk.ids.device)
            topk = TopK(**{c: getattr(topk, c).index_select(0, sel) for c in TopK.__dataclass_fields__})
            frames = out_frames.index_select(0, sel).cpu().numpy() if out_frames is not None else None
            good_keys = keys if len(good) == len(keys) else keys.take(pa.array(good))
            st = table_from_topk(good_keys, topk, f.level, f.k, f.num_classes, frames)
            n = len(good)
            cols = {c: st.column(c) for c in st.column_names}
            cols.update(kind=pa.array(np.full(n, SAMPLE, np.int8)), reason=pa.nulls(n, pa.string()),
                        detail=pa.nulls(n, pa.string()))
            part = pa.table(cols).cast(self.schema)
            parts.append(part.append_column("shard", samples.column("shard").take(pa.array(good))))
        if len(bad):
            n = len(bad)
            parts.append(self._errors(keys.take(pa.array(bad)), pa.array(["nonfinite_output"] * n),
                                      pa.array(["teacher output has NaN or inf"] * n),
                                      samples.column("shard").take(pa.array(bad))))
        return pa.concat_tables(parts)

    def _write_parts(self, rows: pa.Table) -> list[dict]:
        """One part file per shard in the batch (atomic, not fsync'ed: the shard file the
        compaction writes from it is); returns their PART records."""
        records = []
        shard_col = rows.column("shard")
        for name in pc.unique(shard_col).to_pylist():
            part = rows.filter(pc.equal(shard_col, name)).drop_columns(["shard"])
            buf = io.BytesIO()
            pq.write_table(part, buf, compression="lz4")
            data = buf.getvalue()
            rel = f"{PARTS_DIR}/{name}/{uuid.uuid4().hex}.parquet"
            storage.atomic_write_bytes(storage.join(self.run_uri, rel), data, durable=False)
            kinds = part.column("kind").to_numpy()
            frames = 0
            if self.facts.level == "frame":
                frames = int(pc.sum(part.column("num_frames")).as_py() or 0)
            records.append({"shard": name, "kind": PART, "part": rel, "rows": int((kinds == SAMPLE).sum()),
                            "errors": int((kinds == ERROR).sum()), "frames": frames,
                            "key_hash": key_hash(part.column("key")), "bytes": len(data),
                            "node": self.node})
        return records
