"""Real input shards for tests: FLAC/WAV via soundfile, PNG/JPEG via PIL, tar and Parquet files."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import torch
from PIL import Image


def flac_bytes(wave: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def wav_bytes(wave: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def image_bytes(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def tone(rng: np.random.Generator, seconds: float, sr: int = 16000) -> np.ndarray:
    """A noisy tone at a random pitch, in [-1, 1]: distinct inputs give distinct teacher outputs."""
    t = np.arange(int(seconds * sr)) / sr
    f = rng.uniform(200, 2000)
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """samples: [(key, {ext: bytes})] -> a WebDataset tar (members KEY.EXT, in order)."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def audio_corpus(root, shards: int, per_shard: int, seed: int = 0, seconds=(0.4, 1.2), labels: bool = True,
                 prefix: str = "utt") -> dict[str, np.ndarray]:
    """Writes root/shard-XXXX.tar of FLAC clips; returns {key: waveform at 16 kHz}."""
    rng = np.random.default_rng(seed)
    waves = {}
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key = f"{prefix}{s:02d}-{i:04d}"
            w = tone(rng, rng.uniform(*seconds))
            waves[key] = w
            members = {"flac": flac_bytes(w)}
            if labels:
                members["cls"] = str(int(rng.integers(0, 10))).encode()
            samples.append((key, members))
        write_tar(root / f"shard-{s:04d}.tar", samples)
    return waves


def image_corpus(root, shards: int, per_shard: int, seed: int = 0, size=(40, 48), fmt: str = "PNG"):
    """Writes root/shard-XXXX.tar of images; returns {key: uint8 (H, W, 3)}."""
    rng = np.random.default_rng(seed)
    images = {}
    root.mkdir(parents=True, exist_ok=True)
    ext = "png" if fmt == "PNG" else "jpg"
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key = f"img{s:02d}-{i:04d}"
            img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            images[key] = img
            samples.append((key, {ext: image_bytes(img, fmt), "cls": str(int(rng.integers(0, 10))).encode()}))
        write_tar(root / f"shard-{s:04d}.tar", samples)
    return images


def parquet_input(path, items: list[tuple[str, bytes]]) -> None:
    """A Parquet input shard: columns key (string) and audio (binary)."""
    pq.write_table(pa.table({"key": [k for k, _ in items], "audio": pa.array([b for _, b in items], pa.binary())}),
                   path)


def direct_logprobs(spec: str, prep: dict, inputs: list[np.ndarray]) -> list[torch.Tensor]:
    """The teacher's log-softmax for each input alone (no batching, no Ray): the reference."""
    from pipeline.models.spec import build_model, parse_spec
    from pipeline.modalities import preprocessing_from_dict
    from pipeline.modalities.frontends import make_frontend

    model = build_model(parse_spec(spec)).eval()
    frontend = make_frontend(preprocessing_from_dict(prep))
    out = []
    with torch.inference_mode():
        for x in inputs:
            if prep["modality"] == "audio":
                feats, lengths = frontend(torch.from_numpy(x)[None], torch.tensor([len(x)]))
                out.append(torch.log_softmax(model(feats, lengths).float(), -1)[0])
            else:
                feats, _ = frontend(torch.from_numpy(x)[None])
                out.append(torch.log_softmax(model(feats).float(), -1)[0])
    return out


def assert_topk_matches(ids: np.ndarray, logprobs: np.ndarray, reference: torch.Tensor, tol: float = 2e-3) -> None:
    """Stored top-k (ids (..., k), fp16 logprobs) against a full reference log-softmax (..., C).

    The stored values must equal the reference at the stored ids, and the stored ids must be a
    top-k of the reference (no other class more probable than the k-th stored one, up to tol).
    """
    ref = reference.numpy().astype(np.float64)
    ids = ids.astype(np.int64)
    got = logprobs.astype(np.float64)
    at_ids = np.take_along_axis(ref, ids, axis=-1)
    assert np.abs(at_ids - got).max() <= tol, np.abs(at_ids - got).max()
    others = ref.copy()
    np.put_along_axis(others, ids, -np.inf, axis=-1)
    if others.shape[-1] > ids.shape[-1]:
        assert (others.max(-1) <= at_ids[..., -1] + tol).all()


def hf_parquet(path, column: str, items: list[tuple[str | None, bytes | None]], feature: str = "Audio",
               extra: dict | None = None, sampling_rate: int = 16000) -> None:
    """A Parquet file in the layout the Hugging Face ``datasets`` library writes: the media
    column a struct {bytes: binary, path: string}, the features in the schema's "huggingface"
    metadata, no key column unless ``extra`` adds one. items: [(path or None, bytes or None)]."""
    import json

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    media = pa.array([{"bytes": b, "path": p} for p, b in items], type=struct)
    cols = {column: media, **{k: pa.array(v) for k, v in (extra or {}).items()}}
    feat = {"_type": feature, **({"sampling_rate": sampling_rate} if feature == "Audio" else {})}
    features = {column: feat, **{k: {"dtype": "string", "_type": "Value"} for k in extra or {}}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    table = pa.table(cols).replace_schema_metadata(meta)
    pq.write_table(table, path, row_group_size=4)
