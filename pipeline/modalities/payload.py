"""Decoded samples as one Arrow column, and that column as one padded tensor batch.

Decode tasks (teacher and student alike) ship every sample's prepared array in a
``payload`` column whose type is fixed by the preprocessing:

    audio   large_list<float32>            a waveform (N,) at the model's rate, any N
    image   fixed_size_list<uint8>[H*W*3]  an (H, W, 3) crop
    image, decode="gpu"
            struct<path: int8, data: large_binary>
                                           path JPEG / JPEG_PROGRESSIVE: the file's bytes, for
                                           the teacher actor to decode (device_decode);
                                           PIXELS: an (H, W, 3) crop decoded by the task

Building the column costs one concatenation of the arrays, and turning a batch of it back
into a padded array costs one copy into the caller's buffer: no per-sample Python on either
side. This is the one batch-padding implementation (teacher actors, student collate,
evaluation); ``pipeline.modalities.staging`` puts it into reused pinned tensors. No torch
here: decode workers import this module.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.modalities.audio import AudioPreprocessing
from pipeline.modalities.image import JPEG, JPEG_PROGRESSIVE, PIXELS

ENCODED_TYPE = pa.struct([("path", pa.int8()), ("data", pa.large_binary())])


def encoded(prep) -> bool:
    """Whether the payload may hold undecoded images (image preprocessing with decode="gpu")."""
    return getattr(prep, "decode", "cpu") == "gpu"


def payload_type(prep) -> pa.DataType:
    """The Arrow type of the payload column for a preprocessing."""
    if isinstance(prep, AudioPreprocessing):
        return pa.large_list(pa.float32())
    if encoded(prep):
        return ENCODED_TYPE
    return pa.list_(pa.uint8(), prep.crop * prep.crop * 3)


def payload_array(arrays: list, prep) -> pa.Array:
    """Prepared arrays (audio (N_i,) float32 / image (H, W, 3) uint8, or with decode="gpu"
    also image.EncodedImage) -> one payload column."""
    typ = payload_type(prep)
    if encoded(prep):
        paths = [PIXELS if isinstance(a, np.ndarray) else JPEG_PROGRESSIVE if a.progressive else JPEG
                 for a in arrays]
        datas = [a.tobytes() if isinstance(a, np.ndarray) else a.data for a in arrays]
        return pa.StructArray.from_arrays([pa.array(paths, pa.int8()), pa.array(datas, pa.large_binary())],
                                          fields=list(typ))
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


def payload_shape(col, prep, multiple: int = 1) -> tuple[tuple[int, ...], np.dtype]:
    """The host batch a payload column becomes: audio ((B, N), float32) with N the longest clip
    rounded up to a multiple of ``multiple`` samples; image ((B, H, W, 3), uint8)."""
    if isinstance(prep, AudioPreprocessing):
        # per chunk, without combining them: fill_payload does that once
        chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
        longest = max((int(np.diff(c.offsets.to_numpy()).max()) for c in chunks if len(c)), default=0)
        return (len(col), -(-longest // multiple) * multiple), np.dtype(np.float32)
    return (len(col), prep.crop, prep.crop, 3), np.dtype(np.uint8)


def fill_payload(col, prep, out: np.ndarray) -> np.ndarray | None:
    """Write a payload column into ``out`` (shaped as payload_shape says, any writable memory:
    a reused pinned staging buffer) -> lengths (B,) int64 for audio, None for images.

    Audio rows are copied one slice each and only their padding is zeroed: for a batch of 64
    ten-second clips that is 64 memcpys (numpy releases the GIL for them), not a masked scatter
    over the whole (B, N) array."""
    if isinstance(prep, AudioPreprocessing):
        flat, offsets = list_values(col)
        values = flat.to_numpy(zero_copy_only=False)
        lens = np.diff(offsets)
        width = out.shape[1]
        if len(lens) and (lens == width).all():  # equal lengths (cropped clips): one copy
            out[...] = values.reshape(len(lens), width)
            return lens
        for b, (start, n) in enumerate(zip(offsets[:-1].tolist(), lens.tolist())):
            out[b, :n] = values[start:start + n]
            out[b, n:] = 0
        return lens
    arr = _combined(col)
    size = arr.type.list_size
    out.reshape(-1)[...] = arr.values.slice(arr.offset * size, len(arr) * size).to_numpy(zero_copy_only=False)
    return None
