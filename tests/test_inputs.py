"""Input shard readers: Parquet in the Hugging Face ``datasets`` layout (write, then read)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.inputs import check_parquet_shard, iter_parquet, sniff_modality
from pipeline.modalities import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, AudioPreprocessing, prepare
from tests.helpers import flac_bytes, hf_parquet, image_bytes, tone


def test_datasets_audio_layout_without_key_column(tmp_path):
    rng = np.random.default_rng(0)
    waves = [tone(rng, 0.3) for _ in range(6)]
    items = [(f"clips/{i}.flac", flac_bytes(w)) for i, w in enumerate(waves)]
    items[4] = ("clips/4.flac", None)  # a row whose bytes were not embedded
    path = tmp_path / "train-00000-of-00002.parquet"
    hf_parquet(path, "audio", items)
    samples = list(iter_parquet(str(path), AUDIO_EXTENSIONS))
    # no key column: stable ids from the file and the row (the same on every read)
    assert [s.key for s in samples] == [f"train-00000-of-00002/{i:06d}" for i in range(6)]
    assert [s.key for s in iter_parquet(str(path), AUDIO_EXTENSIONS)] == [s.key for s in samples]
    assert samples[0].ext == "flac" and samples[0].data == items[0][1]
    assert samples[4].error.reason == "no_media" and "clips/4.flac" in samples[4].error.detail
    (_, got), = prepare(samples[1].data, AudioPreprocessing(features="none"))
    assert np.abs(got - waves[1]).max() < 1e-4  # 16-bit FLAC
    assert sniff_modality(str(path)) == "audio"


def test_datasets_image_layout_with_key_and_data_columns(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / "part.parquet"
    hf_parquet(path, "image", [(None, image_bytes(im, "PNG")) for im in imgs], feature="Image",
               extra={"image_id": ["a", "b", "c"], "thumb": [b"x", b"y", b"z"]})
    # --data-column picks the struct over the plain binary column, --key-column the key
    samples = list(iter_parquet(str(path), IMAGE_EXTENSIONS, key_column="image_id", data_column="image"))
    assert [s.key for s in samples] == ["a", "b", "c"] and samples[2].data == image_bytes(imgs[2], "PNG")
    assert [s.data for s in iter_parquet(str(path), IMAGE_EXTENSIONS, key_column="image_id")] == [b"x", b"y", b"z"]
    # the job checks the first shard before Ray starts; a later shard that differs is one error row
    with pytest.raises(ValueError, match="no key column 'id'"):
        check_parquet_shard(str(path), key_column="id")
    with pytest.raises(ValueError, match="not media bytes"):
        check_parquet_shard(str(path), data_column="image_id")
    (bad,) = iter_parquet(str(path), IMAGE_EXTENSIONS, data_column="image_id")
    assert bad.key == "part#file" and bad.error.reason == "bad_columns" and "not media bytes" in bad.error.detail


def test_decoded_array_struct(tmp_path):
    rng = np.random.default_rng(2)
    waves = [tone(rng, 0.2, sr=8000), tone(rng, 0.25, sr=8000)]
    struct = pa.struct([("array", pa.list_(pa.float32())), ("sampling_rate", pa.int64()), ("path", pa.string())])
    col = pa.array([{"array": w.tolist(), "sampling_rate": 8000, "path": None} for w in waves], type=struct)
    pq.write_table(pa.table({"key": ["u0", "u1"], "audio": col}), tmp_path / "a.parquet")
    samples = list(iter_parquet(str(tmp_path / "a.parquet"), AUDIO_EXTENSIONS))
    assert [s.key for s in samples] == ["u0", "u1"]
    (_, got), = prepare(samples[1].data, AudioPreprocessing(sample_rate=8000, features="none"))
    assert np.array_equal(got, waves[1])  # float WAV: lossless
