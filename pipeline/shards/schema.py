"""The soft-target columns and their Arrow schema: the in-memory form every encoding shares.

Utterance/image level, one row per key:
    key        string
    ids        fixed_size_list<uintN>[k]      top-k class ids, most probable first
    logprobs   fixed_size_list<float16>[k]    log p(class) at T=1
    logsumexp  float32                        logsumexp of the logits (logit = logprob + lse)
    argmax     uintN                          top-1 of the full distribution
    confidence float16                        max probability of the full distribution
    entropy    float16                        entropy (nats) of the full distribution

Frame level, one row per key, every per-frame column a list over the T frames:
    key, num_frames int32, ids list<fixed_size_list<uintN>[k]>,
    logprobs list<fixed_size_list<float16>[k]>, logsumexp list<float32>,
    argmax list<uintN>, confidence list<float16>, entropy list<float16>

uintN is the smallest unsigned integer type that holds num_classes - 1.

Stored log-probabilities are finite: anything below LOGPROB_FLOOR = -65504 (the most negative
finite float16), including -inf from masked classes or softmax underflow, is stored as
LOGPROB_FLOOR. exp(-65504) is 0 in every float type, so no probability is lost, and readers
never meet ``0 * -inf = nan`` (e.g. in ``kl_div(..., log_target=True)``). NaN is refused.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the format needs no torch; only rows_from_topk takes a TopK
    from pipeline.softtargets import TopK

FORMAT_NAME = "kdpipe.softtargets"
FORMAT_VERSION = 2
LOGPROB_FLOOR = float(np.finfo(np.float16).min)  # -65504.0
LEVELS = ("utterance", "frame")
# Per-row value columns (after key / num_frames), in file order.
VALUE_COLUMNS = ("ids", "logprobs", "logsumexp", "argmax", "confidence", "entropy")
ERRORS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("input", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def id_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds class ids 0..C-1."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def arrow_id_type(num_classes: int) -> pa.DataType:
    return pa.from_numpy_dtype(id_dtype(num_classes))


def softtarget_schema(level: str, k: int, num_classes: int, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """The canonical Arrow schema for a soft-target shard."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    idt = arrow_id_type(num_classes)
    scalar = {
        "ids": pa.list_(idt, k),
        "logprobs": pa.list_(pa.float16(), k),
        "logsumexp": pa.float32(),
        "argmax": idt,
        "confidence": pa.float16(),
        "entropy": pa.float16(),
    }
    fields = [pa.field("key", pa.string(), nullable=False)]
    if level == "frame":
        fields.append(pa.field("num_frames", pa.int32(), nullable=False))
        fields += [pa.field(c, pa.list_(scalar[c]), nullable=False) for c in VALUE_COLUMNS]
    else:
        fields += [pa.field(c, scalar[c], nullable=False) for c in VALUE_COLUMNS]
    return pa.schema(fields, metadata=metadata)


def _storage_dtypes(num_classes: int) -> dict[str, np.dtype]:
    idt = id_dtype(num_classes)
    return {
        "ids": idt,
        "logprobs": np.dtype(np.float16),
        "logsumexp": np.dtype(np.float32),
        "argmax": idt,
        "confidence": np.dtype(np.float16),
        "entropy": np.dtype(np.float16),
    }


def _to_storage(c: str, a, dtype: np.dtype, num_classes: int, what: str) -> np.ndarray:
    """One column's values in their storage dtype, enforcing the value rules of the format."""
    a = np.asarray(a)
    if c == "logprobs" or c == "logsumexp":
        if np.isnan(a).any():
            raise ValueError(f"{what}: {c} contains NaN; quarantine the key instead of caching it")
        if c == "logprobs":
            a = np.maximum(a, LOGPROB_FLOOR)  # -inf and underflow -> -65504 (probability 0)
    elif c in ("ids", "argmax") and a.size:
        if a.min() < 0 or a.max() >= num_classes:
            raise ValueError(f"{what}: {c} {int(a.min())}..{int(a.max())} out of range for num_classes={num_classes}")
    return a.astype(dtype, copy=False)


def rows_from_topk(topk: TopK, num_classes: int, num_frames: np.ndarray | None = None) -> dict[str, list]:
    """Split a batch of TopK into per-row numpy arrays in storage dtypes.

    topk fields have leading dims (B,) or (B, T); for frame level pass num_frames (B,) so
    each row keeps only its first num_frames[b] frames (the rest is padding).
    Returns {"ids": [ (k,) or (T_b, k) ...], ...} with B entries per column.
    """
    arrays = topk.to_numpy()
    dtypes = _storage_dtypes(num_classes)
    out: dict[str, list] = {}
    for c in VALUE_COLUMNS:
        if num_frames is None:
            out[c] = list(_to_storage(c, arrays[c], dtypes[c], num_classes, "batch"))
        else:  # frames beyond num_frames[b] are padding: neither checked nor kept
            out[c] = [_to_storage(c, arrays[c][b, : int(n)], dtypes[c], num_classes, f"batch row {b}")
                      for b, n in enumerate(num_frames)]
    if num_frames is not None:
        out["num_frames"] = [np.int32(n) for n in num_frames]
    return out


def table_from_rows(keys: list[str], rows: dict[str, list], level: str, k: int, num_classes: int,
                    metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    """Build a canonical Arrow table from per-row arrays (as made by rows_from_topk).

    rows[c][i] is (k,) / scalar at utterance level and (T_i, k) / (T_i,) at frame level.
    """
    schema = softtarget_schema(level, k, num_classes, metadata)
    dtypes = _storage_dtypes(num_classes)
    n = len(keys)
    cols: dict[str, pa.Array] = {"key": pa.array(keys, type=pa.string())}
    if level == "utterance":
        for c in VALUE_COLUMNS:
            vals = (_to_storage(c, rows[c], dtypes[c], num_classes, "rows") if n
                    else np.zeros((0, k) if c in ("ids", "logprobs") else (0,), dtypes[c]))
            if c in ("ids", "logprobs"):
                vals = vals.reshape(n, k)
                cols[c] = pa.FixedSizeListArray.from_arrays(pa.array(vals.reshape(-1)), k)
            else:
                cols[c] = pa.array(vals.reshape(n))
    else:
        frames = np.asarray([int(x) for x in rows.get("num_frames", [])], dtype=np.int32) if n else np.zeros(0, np.int32)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(frames, out=offsets[1:])
        cols["num_frames"] = pa.array(frames, type=pa.int32())
        for c in VALUE_COLUMNS:
            per = [_to_storage(c, r, dtypes[c], num_classes, f"key {keys[i]!r}") for i, r in enumerate(rows[c])]
            for i, r in enumerate(per):
                if r.shape[0] != frames[i]:
                    raise ValueError(f"key {keys[i]!r}: column {c} has {r.shape[0]} frames, num_frames says {frames[i]}")
            if c in ("ids", "logprobs"):
                flat = np.concatenate([r.reshape(-1, k) for r in per]) if per else np.zeros((0, k), dtypes[c])
                values = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), k)
            else:
                flat = np.concatenate([r.reshape(-1) for r in per]) if per else np.zeros(0, dtypes[c])
                values = pa.array(flat)
            cols[c] = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pa.Table.from_arrays([cols[f.name].cast(f.type) for f in schema], schema=schema)


def table_from_topk(keys, topk: TopK, level: str, k: int, num_classes: int,
                    num_frames: np.ndarray | None = None) -> pa.Table:
    """A batch of TopK straight into a canonical table, column by column (no per-row arrays).

    keys: B strings (list or Arrow array); topk fields (B, ...) or (B, T, ...); frame level:
    num_frames (B,) valid frames per row (the rest is padding, neither checked nor kept).
    Equal to table_from_rows(keys, rows_from_topk(...)) and much cheaper for large batches.
    """
    schema = softtarget_schema(level, k, num_classes)
    dtypes = _storage_dtypes(num_classes)
    arrays = topk.to_numpy()
    n = len(keys)
    cols: dict[str, pa.Array] = {"key": keys if isinstance(keys, (pa.Array, pa.ChunkedArray))
                                 else pa.array(list(keys), type=pa.string())}
    if level == "frame":
        frames = np.asarray(num_frames, dtype=np.int32).reshape(n)
        T = arrays["ids"].shape[1] if n else 0
        mask = np.arange(T)[None, :] < frames[:, None]  # (B, T) valid frames, row-major = row order
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(frames, out=offsets[1:])
        cols["num_frames"] = pa.array(frames, type=pa.int32())
    for c in VALUE_COLUMNS:
        vals = arrays[c][mask] if level == "frame" else arrays[c]  # (F, k) / (F,) or (B, k) / (B,)
        vals = _to_storage(c, vals, dtypes[c], num_classes, "batch")
        if c in ("ids", "logprobs"):
            col = pa.FixedSizeListArray.from_arrays(pa.array(vals.reshape(-1)), k)
        else:
            col = pa.array(vals.reshape(-1))
        cols[c] = pa.ListArray.from_arrays(pa.array(offsets), col) if level == "frame" else col
    return pa.Table.from_arrays([cols[f.name].cast(f.type) if cols[f.name].type != f.type else cols[f.name]
                                 for f in schema], schema=schema)


def table_to_numpy(table: pa.Table, level: str) -> dict[str, np.ndarray]:
    """Canonical table -> numpy columns.

    Utterance: key (N,) object, ids (N, k), logprobs (N, k) float16, others (N,).
    Frame: key (N,), num_frames (N,), and per-frame columns flattened over all frames with
    ``offsets`` (N + 1,) so that row i is rows offsets[i]:offsets[i+1]: ids (F, k), ... (F,).
    """
    out: dict[str, np.ndarray] = {"key": np.asarray(table.column("key").to_pylist(), dtype=object)}
    if level == "frame":
        frames = table.column("num_frames").to_numpy().astype(np.int64)
        out["num_frames"] = frames
        out["offsets"] = np.concatenate([[0], np.cumsum(frames)])
    for c in VALUE_COLUMNS:
        col = table.column(c).combine_chunks()
        if level == "frame":
            col = col.flatten()  # drop the per-row list level -> per-frame values
        if pa.types.is_fixed_size_list(col.type):
            k = col.type.list_size
            out[c] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        else:
            out[c] = col.to_numpy(zero_copy_only=False)
    return out
