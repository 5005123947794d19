# python -m pytest tests/corpus/test_pitch_corpus.py -q
"""The pitch corpus: partition, exact f0 labels, CREPE's frame count, determinism, and the
Ray Data job's shards (``ray_local`` comes from tests/conftest.py)."""

import io
import json
import math
import tarfile

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import hilbert

from pipeline import pitch
from recipes.corpus import common
from recipes.corpus import pitch as pc

SR = 16000


def _cfg(**kw):
    base = dict(pool=8, labeled=6, test=6, shard_size=4, seed=3, label_hop_ms=40.0)
    base.update(kw)
    return pc.PitchCorpusConfig(**base)


def test_partition_is_disjoint():
    cfg = pc.PitchCorpusConfig()
    part = pc.partition(cfg)
    bands = pc.f0_bands(cfg.band_cents)
    assert bands[0][0] == pytest.approx(pitch.hz_to_cents(60.0))
    assert all(b[1] <= pitch.hz_to_cents(1000.0) + 1e-9 for b in bands)
    assert part["train"]["bands"] == bands[0::2] and part["test"]["bands"] == bands[1::2]
    for (a, b), (c, d) in zip(bands, bands[1:]):
        assert b == pytest.approx(c) and b - a == pytest.approx(cfg.band_cents)  # contiguous, no overlap
    assert not set(part["train"]["vowels"]) & set(part["test"]["vowels"])
    assert set(part["train"]["vowels"]) | set(part["test"]["vowels"]) == set(pc.VOWELS)
    assert part["train"]["tilt"][0] >= part["test"]["tilt"][1]  # tilt ranges touch at most
    assert set(part["test"]["patterns"]) != set(part["train"]["patterns"])
    with pytest.raises(ValueError):
        pc.PitchCorpusConfig(label_hop_ms=15.0)
    with pytest.raises(ValueError):
        pc.PitchCorpusConfig(test_vowels=("x",))


def test_clips_are_deterministic_and_seeded():
    settings = pc.resolve_settings(_cfg())
    for split, i in (("test", 0), ("labeled", 2), ("pool", 0), ("pool", 1)):
        a, b = pc.make_clip(settings, split, i), pc.make_clip(settings, split, i)
        assert np.array_equal(a.audio, b.audio) and a.meta == b.meta
    other = pc.resolve_settings(_cfg(seed=4))
    assert not np.array_equal(pc.make_clip(settings, "test", 0).audio, pc.make_clip(other, "test", 0).audio)
    kinds = [pc.make_clip(settings, "pool", i).meta["kind"] for i in range(8)]
    assert kinds.count("speech") == 4 and kinds.count("synth") == 4  # pool_speech_fraction 0.5


def test_frame_count_is_crepes_and_f0_stays_in_its_band():
    settings = pc.resolve_settings(_cfg(clip_seconds=(0.5, 1.5)))
    for split in ("labeled", "test"):
        part = settings["partition"]["test" if split == "test" else "train"]
        for i in range(6):
            clip = pc.make_clip(settings, split, i)
            n = len(clip.audio)
            assert n % 160 == 0 and clip.f0.shape == (1 + n // 160,) and clip.f0.dtype == np.float32
            assert clip.f0[-1] == 0.0  # the last frame is centred on sample N, past the end
            voiced = clip.f0 > 0
            assert 0.3 < voiced.mean() < 1.0
            lo, hi = clip.meta["band_cents"]
            assert [lo, hi] in [[round(a, 3), round(b, 3)] for a, b in part["bands"]]
            cents = pitch.hz_to_cents(clip.f0[voiced])
            assert cents.min() >= lo - 1e-3 and cents.max() <= hi + 1e-3
            assert clip.meta["vowel"] in part["vowels"] and clip.meta["pattern"] in part["patterns"]
            lab = pc.frame_labels(clip.f0, 40.0)
            assert lab.shape == (1 + n // 640,) and lab.dtype == np.int16
            assert np.array_equal(lab, pitch.hz_to_bin(clip.f0[::4]))
            assert ((lab == -1) == (clip.f0[::4] == 0)).all()


def test_f0_label_is_the_synthesised_frequency():
    """A pure tone (one harmonic) with vibrato and glides, at 40 dB SNR: its instantaneous
    frequency at each voiced frame centre (from the analytic signal) matches the stored f0."""
    settings = pc.resolve_settings(_cfg())
    settings.update(harmonics=[1, 1], snr_db_choices=[40.0], noise_colours=["white"], fricative_probability=0.0,
                    vibrato_cents=[30.0, 60.0], glides=[2, 3])
    part = dict(settings["partition"]["train"], patterns=["all"])
    checked = 0
    for i in range(4):
        clip = pc.synth_clip(settings, part, common.item_rng(0, "tone", i))
        phase = np.unwrap(np.angle(hilbert(clip.audio.astype(np.float64))))
        segs = clip.meta["segments"]
        for t in np.nonzero(clip.f0 > 0)[0]:
            c = t * 160
            if not any(a + 400 <= c < b - 400 for a, b in segs):
                continue  # away from onsets, offsets and ramps
            p = int(SR / clip.f0[t])  # mean frequency over +-1 period around the centre
            est = (phase[c + p] - phase[c - p]) / (2 * p) * SR / (2 * np.pi)
            assert abs(pitch.hz_to_cents(est) - pitch.hz_to_cents(clip.f0[t])) < 10.0, (i, t, est, clip.f0[t])
            checked += 1
        for t in np.nonzero(clip.f0 == 0)[0]:
            c = t * 160
            assert c >= len(clip.audio) or not any(a <= c < b for a, b in segs)
    assert checked > 100


# ----------------------------------------------------------------------------- the Ray job


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("pitch")
    cfg = _cfg()
    return cfg, out, pc.generate(cfg, str(out), progress=None)


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_layout_members_and_labels(corpus):
    cfg, out, c = corpus
    on_disk = json.loads((out / "corpus.json").read_text())
    assert on_disk == json.loads(json.dumps(c))
    assert on_disk["num_classes"] == 360 and on_disk["frame_shift_ms"] == 40.0 and on_disk["f0_frame_shift_ms"] == 10.0
    assert on_disk["generator"]["config"] == json.loads(json.dumps(cfg.to_dict()))
    for split, n in cfg.split_counts().items():
        s = on_disk["splits"][split]
        assert s["count"] == n and s["shards"] == [f"{split}/shard-{i:06d}.tar" for i in range(math.ceil(n / 4))]
        keys = []
        for rel in s["shards"]:
            members = _members(out / rel)
            for name in members:
                key, ext = name.split(".", 1)
                assert ext in ("flac", "frames.npy", "f0.npy", "json")
                keys.append(key)
            for key in sorted({k.split(".")[0] for k in members}):
                wave, sr = sf.read(io.BytesIO(members[f"{key}.flac"]), dtype="float32")
                meta = json.loads(members[f"{key}.json"])
                assert sr == SR and len(wave) == meta["num_samples"] and len(wave) % 160 == 0
                if split == "pool":
                    assert f"{key}.frames.npy" not in members and f"{key}.f0.npy" not in members
                    continue
                f0 = np.load(io.BytesIO(members[f"{key}.f0.npy"]))
                lab = np.load(io.BytesIO(members[f"{key}.frames.npy"]))
                assert f0.dtype == np.float32 and f0.shape == (1 + len(wave) // 160,)
                assert lab.dtype == np.int16 and lab.shape == (1 + len(wave) // 640,)
                assert np.array_equal(lab, pitch.hz_to_bin(f0[::4]))
        assert sorted(set(keys)) == [common.key_for(split, i, n) for i in range(n)]


def test_deterministic_regardless_of_sharding(corpus, tmp_path):
    cfg, out, c = corpus
    settings = pc.resolve_settings(cfg)
    pc.make_shard(common.ShardSpec("test", 1, 4, 2, cfg.test), settings, str(tmp_path))
    assert (tmp_path / "test" / "shard-000001.tar").read_bytes() == (out / "test" / "shard-000001.tar").read_bytes()
    odd = common.ShardSpec("pool", 0, 3, 4, cfg.pool)
    pc.make_shard(odd, settings, str(tmp_path / "odd"))
    ray_members = {}
    for rel in c["splits"]["pool"]["shards"]:
        ray_members.update(_members(out / rel))
    for name, data in _members(tmp_path / "odd" / "pool" / "shard-000000.tar").items():
        assert ray_members[name] == data, name
