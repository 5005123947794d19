"""Training data: input shards paired with their soft-target shards, and labeled shards.

Pairing is per shard and streaming: a CPU task reads one input shard and its soft-target
shard (found through the run's manifest), decodes the inputs with the run's preprocessing,
and matches them by key. No global join or shuffle ever happens. Keys are checked: an input
key with neither soft targets nor an entry in the run's errors table, or a soft-target key
missing from the input shard, is an error naming the shard and the key.

Rows leave the task in ``TRAIN_SCHEMA`` (per-row arrays as raw bytes, so Ray moves them
without per-element overhead); ``collate`` turns a batch of them into padded tensors.
"""

from __future__ import annotations

import io
import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline import storage
from pipeline.inputs import iter_shard
from pipeline.modalities import DecodeError, chunk_key, media_extensions, prepare, preprocessing_from_dict
from pipeline.shards import SoftTargetRun

log = logging.getLogger("kdpipe.data")
PSEUDO, LABELED = 0, 1
TRAIN_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("src", pa.int8()),  # PSEUDO (has teacher targets) or LABELED
    ("length", pa.int64()),  # audio samples; 0 for images
    ("payload", pa.large_binary()),  # float32 waveform or uint8 (H, W, 3) image
    ("label", pa.int64()),  # utterance label, -1 if none
    ("flabels", pa.binary()),  # int16 frame labels at the student's frame rate, empty if none
    ("t_frames", pa.int32()),  # teacher frames (frame level), 0 at utterance level
    ("t_ids", pa.binary()),  # (k,) or (T, k) ids in the manifest's id dtype
    ("t_lp", pa.binary()),  # float16 log-probs, same shape
    ("t_lse", pa.binary()),  # float32 logsumexp, () or (T,)
    ("t_conf", pa.binary()),  # float16 confidence, () or (T,)
])


class PairingError(ValueError):
    """Input and soft-target shards that do not match; names the shard and the key."""


def _labels(members: dict[str, bytes] | None) -> tuple[int, np.ndarray | None]:
    """(utterance label or -1, frame labels (F,) int16 or None) from a sample's members."""
    label, frames = -1, None
    if members:
        if "cls" in members:
            try:
                label = int(members["cls"].decode().strip())
            except ValueError:
                raise DecodeError("bad_label", f".cls member {members['cls'][:20]!r} is not an integer") from None
        if "frames.npy" in members:
            frames = np.load(io.BytesIO(members["frames.npy"]), allow_pickle=False).astype(np.int16)
    return label, frames


def resample_frame_labels(labels: np.ndarray, label_shift_ms: float, target_shift_ms: float,
                          num_samples: int | None = None, sample_rate: int | None = None) -> np.ndarray:
    """Frame labels at one frame rate -> another: each target frame takes the label at its centre.

    labels (F,) at label_shift_ms -> (F',) at target_shift_ms, F' = ceil(F * label/target).
    """
    if label_shift_ms == target_shift_ms:
        return labels
    n_out = int(np.ceil(len(labels) * label_shift_ms / target_shift_ms))
    centres = (np.arange(n_out) + 0.5) * target_shift_ms
    idx = np.minimum((centres // label_shift_ms).astype(np.int64), len(labels) - 1)
    return labels[idx]


class ShardRows:
    """Ray Data UDF (CPU task): shard tasks {kind, name, input} -> TRAIN_SCHEMA row tables.

    kind "pseudo": pair input shard ``input`` with soft-target shard ``name`` of ``run_uri``;
    kind "labeled": decode ``input`` with its labels (.cls / .frames.npy members);
    kind "raw": decode ``input``, labels where present (online distillation).
    """

    def __init__(self, preprocessing: dict, run_uri: str | None = None, level: str = "utterance",
                 label_frame_shift_ms: float = 10.0, student_frame_shift_ms: float | None = None,
                 parquet_options: dict | None = None, rows_per_block: int = 256):
        self.prep = preprocessing_from_dict(preprocessing)
        self.modality = preprocessing["modality"]
        self.exts = media_extensions(self.modality)
        self.run_uri = run_uri
        self.level = level
        self.label_shift = label_frame_shift_ms
        self.student_shift = student_frame_shift_ms or label_frame_shift_ms
        self.parquet_options = parquet_options or {}
        self.rows_per_block = rows_per_block
        self._run: SoftTargetRun | None = None

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        for kind, name, uri in zip(batch["kind"], batch["name"], batch["input"]):
            if kind == "pseudo":
                gen = self.pseudo(str(name), str(uri))
            else:  # "labeled", or "raw" (decode only: online distillation, evaluation of unlabeled data)
                gen = self.labeled(str(uri), require_labels=(kind == "labeled"))
            rows: list[dict] = []
            for row in gen:
                rows.append(row)
                if len(rows) >= self.rows_per_block:
                    yield pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA)

    @property
    def run(self) -> SoftTargetRun:
        if self._run is None:
            self._run = SoftTargetRun(self.run_uri)
        return self._run

    def _pieces(self, raw) -> list[tuple[str, np.ndarray, tuple[int, int] | None]]:
        return [(chunk_key(raw.key, b), arr, b) for b, arr in prepare(raw.data, self.prep)]

    def _frame_labels(self, frames: np.ndarray | None, bounds) -> bytes:
        if frames is None or self.level != "frame":
            return b""
        if bounds is not None:  # a chunk of a long recording: its slice of the labels
            per_sample = 1000.0 / self.prep.sample_rate / self.label_shift
            frames = frames[int(bounds[0] * per_sample): int(np.ceil(bounds[1] * per_sample))]
        return resample_frame_labels(frames, self.label_shift, self.student_shift).astype(np.int16).tobytes()

    def labeled(self, uri: str, require_labels: bool = True) -> Iterator[dict]:
        """Decoded samples with their labels; require_labels=False also takes unlabeled ones."""
        seen = set()
        skipped: dict[str, int] = {}
        for raw in iter_shard(uri, self.exts, **self.parquet_options):
            if raw.key in seen:
                skipped["duplicate_key"] = skipped.get("duplicate_key", 0) + 1
                continue
            seen.add(raw.key)
            try:
                if raw.error is not None:
                    raise raw.error
                label, frames = _labels(raw.members)
                pieces = self._pieces(raw)
            except DecodeError as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                continue
            if require_labels and label < 0 and frames is None:
                raise PairingError(f"{uri}: labeled sample {raw.key!r} has no .cls or .frames.npy label")
            for key, arr, bounds in pieces:
                yield self._row(key, LABELED, arr, label, self._frame_labels(frames, bounds))
        if skipped:  # unusable labeled samples are skipped, and said so (they reach the job's log)
            log.warning(f"{uri}: skipped {sum(skipped.values())} unusable sample(s): {skipped}")

    def pseudo(self, name: str, uri: str) -> Iterator[dict]:
        cols = self.run.read_numpy(name)
        rec = self.run.manifest.shards[name]
        err_keys = set(pq.read_table(io.BytesIO(storage.read_bytes(storage.join(self.run.uri, rec.errors))),
                                     columns=["key"]).column("key").to_pylist())
        index = {k: i for i, k in enumerate(cols["key"])}
        matched: set[str] = set()
        seen = set()
        for raw in iter_shard(uri, self.exts, **self.parquet_options):
            if raw.key in seen:
                continue  # duplicates were quarantined by the teacher run
            seen.add(raw.key)
            if raw.error is not None:
                if raw.key in index:
                    raise PairingError(f"shard {name}: key {raw.key!r} has soft targets but cannot be read from {uri} "
                                       f"now ({raw.error})")
                continue
            try:
                pieces = self._pieces(raw)
            except DecodeError as e:
                if raw.key in err_keys:
                    continue
                raise PairingError(f"shard {name}: key {raw.key!r} in {uri} does not decode ({e}) "
                                   "but the teacher run had no error for it") from None
            for key, arr, bounds in pieces:
                i = index.get(key)
                if i is None:
                    if key in err_keys or raw.key in err_keys:
                        continue
                    raise PairingError(f"shard {name}: input key {key!r} from {uri} has no soft target and is not in "
                                       f"the run's errors table; was {uri} changed after pseudo-labelling?")
                matched.add(key)
                # Rows of the pool carry no labels even where the shard has them: labeled data
                # comes in through --labeled, at its own ratio, so nothing leaks in by accident.
                yield self._row(key, PSEUDO, arr, -1, b"", cols, i)
        if len(matched) != len(index):
            missing = sorted(set(index) - matched)
            raise PairingError(f"shard {name}: {len(missing)} soft-target key(s) not found in input shard "
                               f"{uri}, e.g. {missing[:3]}")

    def _row(self, key, src, arr, label, flabels, cols=None, i=None) -> dict:
        row = {"key": key, "src": src, "length": int(arr.shape[0]) if self.modality == "audio" else 0,
               "payload": arr.tobytes(), "label": int(label), "flabels": flabels, "t_frames": 0,
               "t_ids": b"", "t_lp": b"", "t_lse": b"", "t_conf": b""}
        if cols is not None:
            if self.level == "frame":
                lo, hi = int(cols["offsets"][i]), int(cols["offsets"][i + 1])
                sl = slice(lo, hi)
                row["t_frames"] = hi - lo
            else:
                sl = i
            row["t_ids"] = np.ascontiguousarray(cols["ids"][sl]).tobytes()
            row["t_lp"] = np.ascontiguousarray(cols["logprobs"][sl]).tobytes()
            row["t_lse"] = np.ascontiguousarray(cols["logsumexp"][sl]).tobytes()
            row["t_conf"] = np.ascontiguousarray(cols["confidence"][sl]).tobytes()
        return row


def collate(batch: dict[str, np.ndarray], *, modality: str, level: str, k: int, id_dtype: str,
            crop: int | None = None) -> dict[str, torch.Tensor]:
    """A numpy batch of TRAIN_SCHEMA rows -> padded tensors.

    x: audio (B, N) float32 zero-padded with lengths (B,); image (B, H, W, 3) uint8.
    label (B,) long, -1 = none; flabels (B, F) long, -1 padded.
    Utterance: t_ids (B, k) long, t_lp (B, k), t_lse (B,), t_conf (B,); rows without teacher
    targets have has_t False. Frame: t_ids (B, T, k), t_lp (B, T, k), t_lse / t_conf (B, T),
    t_frames (B,) valid teacher frames.
    """
    n = len(batch["key"])
    out: dict[str, torch.Tensor] = {}
    if modality == "audio":
        lengths = batch["length"].astype(np.int64)
        width = int(lengths.max()) if n else 0
        if n and (lengths == width).all():  # cropped clips: one join, no per-row copies
            x = np.frombuffer(b"".join(batch["payload"]), dtype=np.float32).reshape(n, width).copy()
        else:
            x = np.zeros((n, width), dtype=np.float32)
            for i, b in enumerate(batch["payload"]):
                w = np.frombuffer(b, dtype=np.float32)
                x[i, : w.shape[0]] = w
        out["x"], out["lengths"] = torch.from_numpy(x), torch.from_numpy(lengths)
    else:
        x = np.stack([np.frombuffer(b, dtype=np.uint8).reshape(crop, crop, 3) for b in batch["payload"]]) if n else \
            np.zeros((0, crop, crop, 3), np.uint8)
        out["x"] = torch.from_numpy(x)
    out["src"] = torch.from_numpy(batch["src"].astype(np.int64))
    out["label"] = torch.from_numpy(batch["label"].astype(np.int64))
    flab = [np.frombuffer(b, dtype=np.int16) for b in batch["flabels"]]
    width = max((f.shape[0] for f in flab), default=0)
    fl = np.full((n, width), -1, dtype=np.int64)
    for i, f in enumerate(flab):
        fl[i, : f.shape[0]] = f
    out["flabels"] = torch.from_numpy(fl)
    has_t = np.array([len(b) > 0 for b in batch["t_ids"]], dtype=bool)
    out["has_t"] = torch.from_numpy(has_t)
    idt = np.dtype(id_dtype)
    if level == "frame":
        frames = batch["t_frames"].astype(np.int64)
        T = int(frames.max()) if n else 0
        ids = np.zeros((n, T, k), np.int64)
        lp = np.full((n, T, k), -1e4, np.float32)
        lse = np.zeros((n, T), np.float32)
        conf = np.zeros((n, T), np.float32)
        for i in np.nonzero(has_t)[0]:
            t = frames[i]
            ids[i, :t] = np.frombuffer(batch["t_ids"][i], idt).reshape(t, k)
            lp[i, :t] = np.frombuffer(batch["t_lp"][i], np.float16).reshape(t, k)
            lse[i, :t] = np.frombuffer(batch["t_lse"][i], np.float32)
            conf[i, :t] = np.frombuffer(batch["t_conf"][i], np.float16)
        out["t_frames"] = torch.from_numpy(frames)
    else:
        ids = np.zeros((n, k), np.int64)
        lp = np.full((n, k), -1e4, np.float32)
        lse = np.zeros(n, np.float32)
        conf = np.zeros(n, np.float32)
        sel = np.nonzero(has_t)[0]
        if len(sel):  # fixed-size rows: one join per column instead of a loop over rows
            ids[sel] = np.frombuffer(b"".join(batch["t_ids"][sel]), idt).reshape(-1, k)
            lp[sel] = np.frombuffer(b"".join(batch["t_lp"][sel]), np.float16).reshape(-1, k)
            lse[sel] = np.frombuffer(b"".join(batch["t_lse"][sel]), np.float32)
            conf[sel] = np.frombuffer(b"".join(batch["t_conf"][sel]), np.float16)
    out["t_ids"], out["t_lp"] = torch.from_numpy(ids), torch.from_numpy(lp)
    out["t_lse"], out["t_conf"] = torch.from_numpy(lse), torch.from_numpy(conf)
    return out


class Collate(NumpyBatchCollateFn):
    """``collate`` as the callable class Ray's iter_torch_batches(collate_fn=...) expects."""

    def __init__(self, **options):
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch, **self.options)


def count_samples(uri: str) -> int:
    """Samples in an input shard without decoding media (tar: distinct keys; Parquet: rows)."""
    if uri.endswith(".parquet"):
        with storage.open_read(uri) as f:
            return pq.ParquetFile(f).metadata.num_rows
    import tarfile

    from pipeline.inputs import _split_member

    keys, last = 0, None
    with storage.open_read(uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            key = _split_member(m.name)[0]
            if key != last:
                keys, last = keys + 1, key
    return keys
