"""Stage 2 of pseudo-labelling: the teacher (one model or an ensemble) in a Ray Data actor pool.

Loads its models once in ``__init__`` (Ray's batch-inference pattern); ``__call__`` turns a
batch of decoded rows into top-k soft targets. Error and end-marker rows pass through
unchanged; a sample whose teacher output is NaN/inf becomes an error row.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import torch

from pipeline.models.base import output_lengths
from pipeline.models.spec import build_model, parse_spec
from pipeline.modalities import make_frontend, preprocessing_from_dict
from pipeline.shards.schema import rows_from_topk, softtarget_schema, table_from_rows
from pipeline.softtargets import TopK, ensemble_logprobs, topk_from_logits, topk_from_logprobs
from pipeline.teacher.decode import ERROR, SAMPLE

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASS_COLUMNS = ("shard", "kind", "reason", "detail", "count")


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def output_schema(level: str, k: int, num_classes: int) -> pa.Schema:
    """Soft-target columns (nullable: only sample rows have them) + the pass-through columns."""
    st = softtarget_schema(level, k, num_classes)
    fields = [f.with_nullable(True) for f in st]
    return pa.schema(fields + [
        pa.field("shard", pa.string()), pa.field("kind", pa.int8()), pa.field("reason", pa.string()),
        pa.field("detail", pa.string()), pa.field("count", pa.int64()),
    ])


class Teacher:
    """Models + frontend on one device; ``logits(x, lengths)`` -> per-model outputs.

    Shared by the pseudo-label actors, the evaluator and online distillation.
    """

    def __init__(self, specs: list, preprocessing: dict, precision: str = "bf16", device: str | None = None):
        self.device = pick_device(device)
        self.models = []
        for s in specs:
            model = build_model(parse_spec(s)).to(self.device).eval()
            self.models.append(model)
        self.frontend = make_frontend(preprocessing_from_dict(preprocessing)).to(self.device)
        self.modality = preprocessing["modality"]
        self.prep = preprocessing_from_dict(preprocessing)
        # Autocast only where it pays: reduced precision on CUDA; CPU stays fp32.
        self.dtype = PRECISIONS[precision] if self.device.type == "cuda" else torch.float32
        self.pin = self.device.type == "cuda"

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def to_device(self, payloads: list[bytes], lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoded payload bytes -> a padded model-input batch on the device.

        audio: (B, N_max) float32 waveforms zero-padded, lengths (B,); image: (B, H, W, 3) uint8.
        """
        n = len(payloads)
        if self.modality == "audio":
            width = int(lengths.max()) if n else 0
            host = torch.zeros((n, width), dtype=torch.float32, pin_memory=self.pin)
            hv = host.numpy()
            for i, b in enumerate(payloads):
                wave = np.frombuffer(b, dtype=np.float32)
                hv[i, : wave.shape[0]] = wave
            lens = torch.from_numpy(lengths.astype(np.int64))
            return host.to(self.device, non_blocking=True), lens.to(self.device, non_blocking=True)
        c = self.prep.crop
        host = torch.empty((n, c, c, 3), dtype=torch.uint8, pin_memory=self.pin)
        hv = host.numpy()
        for i, b in enumerate(payloads):
            hv[i] = np.frombuffer(b, dtype=np.uint8).reshape(c, c, 3)
        return host.to(self.device, non_blocking=True), None

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None):
        """-> (list of per-model logits (B, C) or (B, T', C) float32, output frames (B,) or None)."""
        feats, feat_len = self.frontend(x, lengths)
        outs = []
        with self._autocast():
            for model in self.models:
                outs.append((model(feats, feat_len) if feat_len is not None else model(feats)).float())
        out_frames = None
        if outs[0].dim() == 3:
            in_frames = feats.shape[1]
            if feat_len is None:
                feat_len = torch.full((feats.shape[0],), in_frames, device=feats.device)
            out_frames = output_lengths(self.models[0], feat_len, in_frames, outs[0].shape[1])
        return outs, out_frames


class TeacherPredictor:
    """Ray Data UDF (actor): decoded rows (pyarrow) -> soft-target rows (pyarrow)."""

    def __init__(self, specs: list, preprocessing: dict, level: str, k: int, num_classes: int,
                 precision: str = "bf16", device: str | None = None):
        self.teacher = Teacher(specs, preprocessing, precision, device)
        self.level, self.k, self.num_classes = level, k, num_classes
        self.schema = output_schema(level, k, num_classes)

    def __call__(self, table: pa.Table) -> pa.Table:
        kinds = table.column("kind").to_numpy()
        idx = np.nonzero(kinds == SAMPLE)[0]
        passthrough = table.filter(pa.array(kinds != SAMPLE))
        parts = []
        if len(idx):
            samples = table.take(pa.array(idx))
            parts += self._predict(samples)
        parts.append(self._passthrough(passthrough))
        return pa.concat_tables([p.cast(self.schema) if p.schema != self.schema else p for p in parts])

    def _passthrough(self, t: pa.Table) -> pa.Table:
        cols = {f.name: (t.column(f.name) if f.name in t.column_names and f.name in PASS_COLUMNS + ("key",)
                         else pa.nulls(t.num_rows, f.type)) for f in self.schema}
        return pa.table(cols, schema=self.schema)

    def _predict(self, samples: pa.Table) -> list[pa.Table]:
        keys = samples.column("key").to_pylist()
        x, lengths = self.teacher.to_device(samples.column("payload").to_pylist(),
                                            samples.column("length").to_numpy())
        outs, out_frames = self.teacher.forward(x, lengths)
        if len(outs) > 1:
            topk = topk_from_logprobs(ensemble_logprobs(outs), self.k)
            logits = torch.stack(outs)  # (M, B, ...) only for the finiteness check
        else:
            topk = topk_from_logits(outs[0], self.k)
            logits = outs[0]
        if self.level == "frame":
            t = torch.arange(logits.shape[-2], device=logits.device)
            valid = (t.unsqueeze(0) < out_frames.unsqueeze(1)).unsqueeze(-1)  # (B, T', 1)
            finite = (torch.isfinite(logits) | ~valid).flatten(-2).all(-1)
        else:
            finite = torch.isfinite(logits).all(-1)
        if finite.dim() > 1:  # ensemble: every member must be finite
            finite = finite.all(0)
        finite = finite.cpu().numpy()
        good = np.nonzero(finite)[0]
        parts = []
        if len(good):
            sel = torch.from_numpy(good).to(topk.ids.device)
            topk = TopK(**{f: getattr(topk, f).index_select(0, sel) for f in TopK.__dataclass_fields__})
            frames = out_frames.index_select(0, sel).cpu().numpy() if out_frames is not None else None
            rows = rows_from_topk(topk, self.num_classes, frames)
            st = table_from_rows([keys[i] for i in good], rows, self.level, self.k, self.num_classes)
            n = len(good)
            shard = samples.column("shard").take(pa.array(good))
            extra = {"shard": shard, "kind": pa.array(np.full(n, SAMPLE, np.int8)), "reason": pa.nulls(n, pa.string()),
                     "detail": pa.nulls(n, pa.string()), "count": pa.array(np.zeros(n, np.int64))}
            parts.append(pa.table({**{c: st.column(c) for c in st.column_names}, **extra}).cast(self.schema))
        bad = np.nonzero(~finite)[0]
        if len(bad):
            err = samples.select(["shard", "key"]).take(pa.array(bad))
            n = len(bad)
            err = err.append_column("kind", pa.array(np.full(n, ERROR, np.int8)))
            err = err.append_column("reason", pa.array(["nonfinite_output"] * n))
            err = err.append_column("detail", pa.array(["teacher output has NaN or inf"] * n))
            err = err.append_column("count", pa.array(np.zeros(n, np.int64)))
            parts.append(self._passthrough(err))
        return parts
