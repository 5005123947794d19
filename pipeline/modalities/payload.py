"""Decoded samples as one Arrow column, and that column as one padded tensor batch.

Decode tasks (teacher and student alike) ship every sample's prepared array in a
``payload`` column whose type is fixed by the preprocessing:

    audio   large_list<float32>            a waveform (N,) at the model's rate, any N
    image   fixed_size_list<uint8>[H*W*3]  an (H, W, 3) crop

Building the column costs one concatenation of the arrays, and turning a batch of it back
into a tensor costs one vectorised copy: no per-row Python on either side. This is the one
batch-padding implementation (teacher actors, student collate, evaluation).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.modalities.audio import AudioPreprocessing


def payload_type(prep) -> pa.DataType:
    """The Arrow type of the payload column for a preprocessing."""
    if isinstance(prep, AudioPreprocessing):
        return pa.large_list(pa.float32())
    return pa.list_(pa.uint8(), prep.crop * prep.crop * 3)


def payload_array(arrays: list[np.ndarray], prep) -> pa.Array:
    """Prepared arrays (audio (N_i,) float32 / image (H, W, 3) uint8) -> one payload column."""
    typ = payload_type(prep)
    if isinstance(prep, AudioPreprocessing):
        lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(arrays).astype(np.float32, copy=False) if arrays else np.zeros(0, np.float32)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))
    size = typ.list_size
    flat = np.stack(arrays).reshape(-1) if arrays else np.zeros(0, np.uint8)
    if flat.size != len(arrays) * size:
        raise ValueError(f"image payloads must be {prep.crop}x{prep.crop}x3 uint8")
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.uint8()), size)


def _combined(col) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def list_values(col) -> tuple[np.ndarray, np.ndarray]:
    """A (large_)list column -> (flat values, offsets (B + 1,) int64 from 0), zero-copy where
    Arrow allows; null rows have no values."""
    arr = _combined(col)
    values = arr.values  # all child values, including those of a sliced-off prefix
    offsets = arr.offsets.to_numpy().astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    flat = values.slice(start, end - start)
    return flat, offsets - start


def pad_rows(flat: np.ndarray, offsets: np.ndarray, width: int | None = None, fill=0) -> np.ndarray:
    """Ragged rows (flat (total, *tail), offsets (B + 1,)) -> (B, width, *tail) padded with ``fill``.

    One boolean-mask assignment: row b's values land in [b, :len_b] in order."""
    lens = np.diff(offsets)
    n = len(lens)
    width = int(lens.max()) if width is None and n else (width or 0)
    out = np.full((n, width) + flat.shape[1:], fill, dtype=flat.dtype)
    if n and width:
        mask = np.arange(width)[None, :] < lens[:, None]  # (B, width)
        out[mask] = flat
    return out


def _host(view: np.ndarray, pin: bool) -> torch.Tensor:
    """One copy of ``view`` into a fresh (page-locked if ``pin``) tensor; Arrow buffers are
    read-only, and a pinned buffer is what lets the device copy run asynchronously."""
    out = torch.empty(view.shape, dtype=torch.from_numpy(view[:0].copy()).dtype, pin_memory=pin)
    out.numpy()[...] = view
    return out


def payload_batch(col, prep, pin: bool = False, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of the payload column -> model input on the host.

    audio: (B, N) float32 zero-padded and lengths (B,) int64, N = the longest clip rounded up to
    a multiple of ``multiple`` samples; image: (B, H, W, 3) uint8 and None. ``pin``: into
    page-locked memory, so the copy to a CUDA device can be asynchronous.
    """
    if isinstance(prep, AudioPreprocessing):
        flat, offsets = list_values(col)
        values = flat.to_numpy(zero_copy_only=False)
        lens = np.diff(offsets)
        n = len(lens)
        width = -(-int(lens.max()) // multiple) * multiple if n else 0
        if n and (lens == width).all():  # equal lengths (cropped clips): a reshape, no scatter
            view = values.reshape(n, width)
        else:
            view = pad_rows(values, offsets, width=width)
        return _host(view, pin), torch.from_numpy(lens)
    arr = _combined(col)
    c, size = prep.crop, arr.type.list_size
    values = arr.values.slice(arr.offset * size, len(arr) * size).to_numpy(zero_copy_only=False)
    return _host(values.reshape(len(arr), c, c, 3), pin), None
