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


def payload_buffers(payloads) -> tuple[np.ndarray, np.ndarray]:
    """Binary payloads -> (data (total bytes,) uint8, offsets (B + 1,) int64), row i being
    data[offsets[i]:offsets[i + 1]]. An Arrow (large_)binary array is read in place (a
    chunked one is combined first); a list of bytes is packed once."""
    if isinstance(payloads, pa.ChunkedArray):
        payloads = payloads.chunk(0) if payloads.num_chunks == 1 else payloads.combine_chunks()
    if not isinstance(payloads, pa.Array):
        payloads = pa.array(list(payloads), type=pa.large_binary())
    if not (pa.types.is_binary(payloads.type) or pa.types.is_large_binary(payloads.type)):
        raise TypeError(f"payloads must be binary, got {payloads.type}")
    off_type = np.int64 if pa.types.is_large_binary(payloads.type) else np.int32
    _, off_buf, data_buf = payloads.buffers()
    n = len(payloads)
    offsets = np.frombuffer(off_buf, dtype=off_type, count=n + 1,
                            offset=payloads.offset * np.dtype(off_type).itemsize).astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None and data_buf.size else np.zeros(0, np.uint8)
    return data, offsets


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

    def to_device(self, payloads, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoded payloads -> a padded model-input batch on the device.

        payloads: an Arrow (large_)binary column (read in place, no per-row Python objects) or
        a list of bytes. audio: (B, N_max) float32 waveforms zero-padded, lengths (B,);
        image: (B, H, W, 3) uint8. One host copy (into pinned memory on CUDA), then an async
        copy to the device.
        """
        data, off = payload_buffers(payloads)  # (total bytes,) uint8, (B + 1,) int64
        n = len(off) - 1
        if self.modality == "audio":
            counts = (off[1:] - off[:-1]) // 4  # float32 samples per row
            width = int(counts.max()) if n else 0
            host = torch.zeros((n, width), dtype=torch.float32, pin_memory=self.pin)
            hv = host.numpy()
            if n and (counts == width).all():  # equal lengths (cropped or fixed-size clips): one copy
                hv[:] = data[off[0]: off[n]].view(np.float32).reshape(n, width)
            else:
                for i in range(n):
                    hv[i, : counts[i]] = data[off[i]: off[i + 1]].view(np.float32)
            lens = torch.from_numpy(np.asarray(lengths).astype(np.int64))
            return host.to(self.device, non_blocking=True), lens.to(self.device, non_blocking=True)
        c = self.prep.crop
        size = c * c * 3
        if n and not (off[1:] - off[:-1] == size).all():
            raise ValueError(f"image payloads must be {c}x{c}x3 uint8 ({size} bytes each)")
        host = torch.empty((n, c, c, 3), dtype=torch.uint8, pin_memory=self.pin)
        if n:
            host.numpy()[:] = data[off[0]: off[0] + n * size].reshape(n, c, c, 3)
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
        is_sample = kinds == SAMPLE
        parts = []
        if is_sample.all():  # the usual batch: no copy of the payloads
            samples, passthrough = table, table.slice(0, 0)
        else:
            samples = table.filter(pa.array(is_sample))
            passthrough = table.filter(pa.array(~is_sample))
        if samples.num_rows:
            parts += self._predict(samples)
        parts.append(self._passthrough(passthrough))
        return pa.concat_tables([p.cast(self.schema) if p.schema != self.schema else p for p in parts])

    def _passthrough(self, t: pa.Table) -> pa.Table:
        cols = {f.name: (t.column(f.name) if f.name in t.column_names and f.name in PASS_COLUMNS + ("key",)
                         else pa.nulls(t.num_rows, f.type)) for f in self.schema}
        return pa.table(cols, schema=self.schema)

    def _predict(self, samples: pa.Table) -> list[pa.Table]:
        keys = samples.column("key").to_pylist()
        x, lengths = self.teacher.to_device(samples.column("payload"), samples.column("length").to_numpy())
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
