"""Collate: an Arrow batch of training rows (``pipeline.student.data.train_schema``) into
padded tensors, vectorised (no per-row Python). Runs in the training worker, on the batches
Ray Data hands it; the decode tasks upstream never import torch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from pipeline.modalities.payload import list_values, pad_rows
from pipeline.modalities.staging import payload_batch
from pipeline.student.data import LP_PAD
from pipeline.student.plan import DataPlan


def _fixed_values(col, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed_size_list column (nulls allowed) -> ((B, width) values, (B,) valid)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    values = arr.values.slice(arr.offset * width, len(arr) * width).to_numpy(zero_copy_only=False)
    valid = ~arr.is_null().to_numpy(zero_copy_only=False)
    return values.reshape(len(arr), width), valid


def collate(batch: pa.Table, data: DataPlan, pin: bool = False) -> dict[str, torch.Tensor]:
    """An Arrow batch of ``train_schema`` rows -> padded tensors (vectorised, no per-row Python).

    x: audio (B, N) float32 zero-padded with lengths (B,); image (B, H, W, 3) uint8.
    label (B,) long, -1 = none; flabels (B, F) long, -1 padded; f0 (B, F0) float Hz reference pitch
    at the label frame rate, 0-padded, with f0_len (B,) its valid frames; src (B,); has_t (B,) bool.
    Utterance: t_ids (B, k) long, t_lp (B, k), t_lse (B,), t_conf (B,).
    Frame: t_ids (B, T, k), t_lp (B, T, k), t_lse / t_conf (B, T), t_frames (B,) valid frames.
    Rows without teacher targets have has_t False, ids 0 and log-probs LP_PAD.
    """
    n, k = batch.num_rows, data.stored_k
    out: dict[str, torch.Tensor] = {}
    x, lengths = payload_batch(batch.column("payload"), data.preprocessing, pin=pin, multiple=data.pad_samples)
    out["x"] = x
    if lengths is not None:
        out["lengths"] = lengths
    out["src"] = torch.from_numpy(batch.column("src").to_numpy().astype(np.int64))
    out["label"] = torch.from_numpy(batch.column("label").to_numpy().astype(np.int64))
    flat, offsets = list_values(batch.column("flabels"))
    out["flabels"] = torch.from_numpy(pad_rows(flat.to_numpy(zero_copy_only=False).astype(np.int64), offsets, fill=-1))
    flat, offsets = list_values(batch.column("f0"))
    out["f0"] = torch.from_numpy(pad_rows(flat.to_numpy(zero_copy_only=False).astype(np.float32), offsets, fill=0.0))
    out["f0_len"] = torch.from_numpy(np.diff(offsets))
    t_ids = batch.column("t_ids")
    has_t = ~(t_ids.is_null().to_numpy(zero_copy_only=False)) if n else np.zeros(0, bool)
    out["has_t"] = torch.from_numpy(has_t)
    if data.level == "frame":
        def frames_of(col, fill, dtype):
            flat, offs = list_values(col)
            if pa.types.is_fixed_size_list(flat.type):
                vals = flat.values.slice(flat.offset * k, len(flat) * k).to_numpy(zero_copy_only=False).reshape(-1, k)
            else:
                vals = flat.to_numpy(zero_copy_only=False)
            return torch.from_numpy(pad_rows(vals.astype(dtype), offs, fill=fill))

        out["t_ids"] = frames_of(t_ids, 0, np.int64)
        out["t_lp"] = frames_of(batch.column("t_lp"), LP_PAD, np.float32)
        out["t_lse"] = frames_of(batch.column("t_lse"), 0.0, np.float32)
        out["t_conf"] = frames_of(batch.column("t_conf"), 0.0, np.float32)
        out["t_frames"] = torch.from_numpy(batch.column("t_frames").to_numpy().astype(np.int64))
    else:
        ids, _ = _fixed_values(t_ids, k)
        lp, _ = _fixed_values(batch.column("t_lp"), k)
        ids = np.where(has_t[:, None], ids, 0).astype(np.int64)
        lp = np.where(has_t[:, None], lp.astype(np.float32), LP_PAD).astype(np.float32)
        out["t_ids"], out["t_lp"] = torch.from_numpy(ids), torch.from_numpy(lp)
        for c in ("t_lse", "t_conf"):
            vals = pc.fill_null(batch.column(c), 0).to_numpy().astype(np.float32) if n else np.zeros(0, np.float32)
            out[c] = torch.from_numpy(vals)
    if pin:
        out = {c: (v if v.is_pinned() else v.pin_memory()) for c, v in out.items()}
    return out


class Collate(ArrowBatchCollateFn):
    """``collate`` as the callable Ray's iter_torch_batches(collate_fn=...) takes (Arrow batches)."""

    def __init__(self, data: DataPlan, pin: bool = False):
        self.data, self.pin = data, pin

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        return collate(batch, self.data, self.pin)
