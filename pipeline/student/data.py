"""Training data: input shards paired with their soft-target shards, and labeled shards.

Pairing is per shard and streaming: a CPU task gets one input shard and its soft-target
shard's commit record (the driver read the commit log once; no task opens the manifest),
reads the soft-target file, decodes the inputs with the run's preprocessing and joins them
by key with one vectorised ``index_in``. No global join or shuffle ever happens. Keys are
checked: an input key with neither soft targets nor an entry in the shard's errors table, or
a soft-target key missing from the input shard, is a PairingError naming the shard and key.

Rows leave the task as Arrow columns (``train_schema``): the prepared payload as a list or
fixed-size-list column, the teacher's top-k columns taken straight from the soft-target
table. ``pipeline.student.collate`` turns a batch of them into padded tensors. This module
imports no torch: a decode worker starts ~1.5 s sooner without it (2 cores).
"""

from __future__ import annotations

import io
import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.inputs import iter_prepared, split_member
from pipeline.modalities import DecodeError, chunk_key
from pipeline.modalities.payload import list_values, pad_rows, payload_array, payload_type
from pipeline.shards.files import read_errors, read_shard_table
from pipeline.shards.manifest import RunFacts, ShardRecord
from pipeline.shards.schema import softtarget_schema
from pipeline.student.plan import DataPlan
from pipeline.student.tasks import LABELED, PSEUDO, ShardTask

log = logging.getLogger("kdpipe.data")
SRC_PSEUDO, SRC_LABELED = 0, 1  # the "src" column: a row with teacher targets, or a labeled row
LP_PAD = -1e4  # log-prob of padded target slots: exp() is 0, and never -inf (no 0 * inf)
F0_FRAME_MS = 10.0  # .f0.npy reference contours are per 10 ms frame (pipeline.pitch)


class PairingError(ValueError):
    """Input and soft-target shards that do not match; names the shard and the key."""


def teacher_types(data: DataPlan) -> dict[str, pa.DataType]:
    """Arrow types of the teacher columns: those of the soft-target schema (so a row's
    targets are the cache's own arrays, taken by index)."""
    st = softtarget_schema(data.level, data.stored_k, data.num_classes)
    return {"t_ids": st.field("ids").type, "t_lp": st.field("logprobs").type,
            "t_lse": st.field("logsumexp").type, "t_conf": st.field("confidence").type}


def train_schema(data: DataPlan) -> pa.Schema:
    """Columns of a training row; teacher columns are null on labeled rows."""
    return pa.schema([
        ("key", pa.string()),
        ("src", pa.int8()),  # SRC_PSEUDO (teacher targets) or SRC_LABELED
        ("payload", payload_type(data.preprocessing)),
        ("label", pa.int64()),  # utterance label, -1 if none
        ("flabels", pa.list_(pa.int16())),  # frame labels at the student's frame rate (empty if none)
        ("f0", pa.list_(pa.float32())),  # reference pitch in Hz per label frame (.f0.npy; empty if none)
        ("t_frames", pa.int32()),  # teacher frames (frame level), 0 otherwise
        *[(c, t) for c, t in teacher_types(data).items()],
    ])


def _labels(members: dict[str, bytes] | None) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """(utterance label or -1, frame labels (F,) int16 or None, reference f0 (F,) float32 Hz or
    None) from a sample's members (.cls, .frames.npy, .f0.npy)."""
    label, frames, f0 = -1, None, None
    if members:
        if "cls" in members:
            try:
                label = int(members["cls"].decode().strip())
            except ValueError:
                raise DecodeError("bad_label", f".cls member {members['cls'][:20]!r} is not an integer") from None
        if "frames.npy" in members:
            try:
                frames = np.load(io.BytesIO(members["frames.npy"]), allow_pickle=False).astype(np.int16).reshape(-1)
            except ValueError as e:
                raise DecodeError("bad_label", f".frames.npy member is not an array ({e})") from None
        if "f0.npy" in members:
            try:
                f0 = np.load(io.BytesIO(members["f0.npy"]), allow_pickle=False).astype(np.float32).reshape(-1)
            except ValueError as e:
                raise DecodeError("bad_label", f".f0.npy member is not an array ({e})") from None
    return label, frames, f0


def resample_frame_labels(labels: np.ndarray, label_shift_ms: float, target_shift_ms: float) -> np.ndarray:
    """Frame labels at one frame rate -> another: each target frame takes the label at its centre.

    labels (F,) at label_shift_ms -> (F',) at target_shift_ms, F' = ceil(F * label/target).
    """
    if label_shift_ms == target_shift_ms:
        return labels
    n_out = int(np.ceil(len(labels) * label_shift_ms / target_shift_ms))
    centres = (np.arange(n_out) + 0.5) * target_shift_ms
    idx = np.minimum((centres // label_shift_ms).astype(np.int64), len(labels) - 1)
    return labels[idx]


def _lists(rows: list[np.ndarray], dtype) -> pa.Array:
    """Per-row 1-D arrays -> one list<dtype> column (one concatenation)."""
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.concatenate(rows).astype(dtype) if rows else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


class _Block:
    """Decoded samples waiting to become one output table."""

    def __init__(self):
        self.keys: list[str] = []
        self.arrays: list[np.ndarray] = []
        self.labels: list[int] = []
        self.flabels: list[np.ndarray] = []
        self.f0: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.keys)


class ShardRows:
    """Ray Data UDF (CPU task): shard tasks -> ``train_schema`` tables.

    Its rows are ShardTask rows (student.tasks): PSEUDO pairs the input shard with the
    soft-target shard of its commit record; LABELED decodes the input with its labels
    (.cls / .frames.npy members); RAW decodes it, labels where present (online distillation).
    """

    def __init__(self, data: DataPlan, run_uri: str | None = None, facts: RunFacts | None = None,
                 parquet_options: dict | None = None, pool_options: dict | None = None):
        """parquet_options: how labeled / raw Parquet shards are read (key_column, data_column);
        pool_options: how the teacher run read its inputs (the manifest's input_options)."""
        self.data = data
        self.prep = data.preprocessing
        self.run_uri, self.facts = run_uri, facts
        self.schema = train_schema(data)
        self.types = teacher_types(data)
        self.parquet_options = {k: v for k, v in (parquet_options or {}).items() if v is not None}
        self.pool_options = dict(pool_options or {})
        self.student_shift = data.frame_shift_ms or data.label_frame_shift_ms

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        for task in ShardTask.from_batch(batch):
            if task.kind == PSEUDO:
                yield from self.pseudo(task.name, task.input, task.record)
            else:  # LABELED, or RAW (decode only: online distillation)
                yield from self.labeled(task.input, require_labels=(task.kind == LABELED))

    # -- rows -----------------------------------------------------------------------------
    def _table(self, block: _Block, src: int, targets: pa.Table | None = None) -> pa.Table:
        n = len(block)
        cols = {
            "key": pa.array(block.keys, pa.string()),
            "src": pa.array(np.full(n, src, np.int8)),
            "payload": payload_array(block.arrays, self.prep),
            "label": pa.array(np.asarray(block.labels, np.int64)),
            "flabels": _lists(block.flabels if block.flabels else [np.zeros(0, np.int16)] * n, np.int16),
            "f0": _lists(block.f0 if block.f0 else [np.zeros(0, np.float32)] * n, np.float32),
        }
        if targets is None:
            cols["t_frames"] = pa.array(np.zeros(n, np.int32))
            cols.update({c: pa.nulls(n, t) for c, t in self.types.items()})
        else:
            cols["t_frames"] = (targets.column("num_frames").cast(pa.int32()) if self.data.level == "frame"
                                else pa.array(np.zeros(n, np.int32)))
            for c, src_col in (("t_ids", "ids"), ("t_lp", "logprobs"), ("t_lse", "logsumexp"),
                               ("t_conf", "confidence")):
                cols[c] = targets.column(src_col)
        return pa.table(cols, schema=self.schema)

    def _chunk(self, values: np.ndarray, bounds, shift_ms: float) -> np.ndarray:
        """A chunk of a long recording: its slice of values given every ``shift_ms``."""
        if bounds is None:
            return values
        per_sample = 1000.0 / self.prep.sample_rate / shift_ms
        return values[int(bounds[0] * per_sample): int(np.ceil(bounds[1] * per_sample))]

    def _frame_labels(self, frames: np.ndarray | None, bounds) -> np.ndarray:
        if frames is None or self.data.level != "frame":
            return np.zeros(0, np.int16)
        frames = self._chunk(frames, bounds, self.data.label_frame_shift_ms)
        return resample_frame_labels(frames, self.data.label_frame_shift_ms, self.student_shift).astype(np.int16)

    def _samples(self, uri: str, options: dict):
        return iter_prepared(uri, self.prep, self.data.limits, **options)

    def labeled(self, uri: str, require_labels: bool = True) -> Iterator[pa.Table]:
        """Decoded samples with their labels; require_labels=False also takes unlabeled ones."""
        skipped: dict[str, int] = {}
        block = _Block()
        for raw, pieces in self._samples(uri, self.parquet_options):
            try:
                if isinstance(pieces, DecodeError):
                    raise pieces
                label, frames, f0 = _labels(raw.members)
            except DecodeError as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                continue
            if require_labels and label < 0 and frames is None:
                raise PairingError(f"{uri}: labeled sample {raw.key!r} has no .cls or .frames.npy label")
            for bounds, arr in pieces:
                block.keys.append(chunk_key(raw.key, bounds))
                block.arrays.append(arr)
                block.labels.append(label)
                block.flabels.append(self._frame_labels(frames, bounds))
                block.f0.append(self._chunk(f0, bounds, F0_FRAME_MS) if f0 is not None and self.data.level == "frame"
                                else np.zeros(0, np.float32))
            if len(block) >= self.data.rows_per_block:
                yield self._table(block, SRC_LABELED)
                block = _Block()
        if len(block):
            yield self._table(block, SRC_LABELED)
        if skipped:  # unusable labeled samples are skipped, and said so (they reach the job's log)
            log.warning(f"{uri}: skipped {sum(skipped.values())} unusable sample(s): {skipped}")

    def pseudo(self, name: str, uri: str, rec: ShardRecord) -> Iterator[pa.Table]:
        targets = read_shard_table(self.run_uri, self.facts, rec)
        err_keys = set(read_errors(self.run_uri, rec).column("key").to_pylist())
        st_keys = targets.column("key")
        matched = np.zeros(targets.num_rows, dtype=bool)
        block = _Block()

        def flush() -> pa.Table:
            idx = pc.index_in(pa.array(block.keys, pa.string()), value_set=st_keys)  # one vectorised join
            missing = idx.is_null().to_numpy(zero_copy_only=False)
            for i in np.nonzero(missing)[0]:
                if block.keys[i] not in err_keys:
                    raise PairingError(f"shard {name}: input key {block.keys[i]!r} from {uri} has no soft target and "
                                       f"is not in the run's errors table; was {uri} changed after pseudo-labelling?")
            keep = np.nonzero(~missing)[0]
            take = idx.to_numpy(zero_copy_only=False)[keep].astype(np.int64) if len(keep) else np.zeros(0, np.int64)
            matched[take] = True
            sub = _Block()
            sub.keys = [block.keys[i] for i in keep]
            sub.arrays = [block.arrays[i] for i in keep]
            # Rows of the pool carry no labels even where the shard has them: labeled data
            # comes in through --labeled, at its own ratio, so nothing leaks in by accident.
            sub.labels = [-1] * len(keep)
            return self._table(sub, SRC_PSEUDO, targets.take(pa.array(take)))

        for raw, pieces in self._samples(uri, self.pool_options):
            if isinstance(pieces, DecodeError):
                if raw.member_error or raw.key in err_keys:
                    continue  # the teacher run quarantined the same, by the same rule
                raise PairingError(f"shard {name}: key {raw.key!r} in {uri} does not decode now ({pieces}) but the "
                                   "teacher run had no error for it")
            for bounds, arr in pieces:
                block.keys.append(chunk_key(raw.key, bounds))
                block.arrays.append(arr)
            if len(block) >= self.data.rows_per_block:
                yield flush()
                block = _Block()
        if len(block):
            yield flush()
        if not matched.all():
            missing = st_keys.take(pa.array(np.nonzero(~matched)[0])).to_pylist()
            raise PairingError(f"shard {name}: {len(missing)} soft-target key(s) not found in input shard {uri}, "
                               f"e.g. {missing[:3]}")


def count_samples(uri: str) -> int:
    """Samples in an input shard without decoding media (tar: distinct keys; Parquet: rows)."""
    if uri.endswith(".parquet"):
        with storage.open_read(uri) as f:
            return pq.ParquetFile(f).metadata.num_rows
    import tarfile

    keys, last = 0, None
    with storage.open_read(uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            key = split_member(m.name)[0]
            if key != last:
                keys, last = keys + 1, key
    return keys
