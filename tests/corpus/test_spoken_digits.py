# python -m pytest tests/corpus/test_spoken_digits.py -q
"""The spoken-digits corpus on a real local Ray: shards, FLAC, labels, frame labels,
determinism, speakers held out for test, and s3:// output. ``ray_local`` (one local Ray for the
suite) and ``s3_bucket`` (a moto S3 server) come from tests/conftest.py."""

import hashlib
import importlib.util
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from recipes.corpus import common, tts
from recipes.corpus import spoken_digits as sd

REPO = Path(__file__).resolve().parents[2]
SR = 16000


def _cfg(**kw):
    base = dict(labeled=20, unlabeled=24, test=20, shard_size=10, seed=7)
    base.update(kw)
    return sd.SpokenDigitsConfig(**base)


@pytest.fixture(scope="module")
def utt_corpus(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    cfg = _cfg()
    corpus = sd.generate(cfg, str(out), progress=None)
    return cfg, out, corpus


@pytest.fixture(scope="module")
def frame_corpus(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_frames")
    cfg = _cfg(labeled=10, unlabeled=10, test=10, frame_level=True)
    corpus = sd.generate(cfg, str(out), progress=None)
    return cfg, out, corpus


def _samples(path: Path) -> list[dict]:
    """All samples of a shard through webdataset (raw bytes, no decoding)."""
    return list(wds.WebDataset(str(path), shardshuffle=False))


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


# ---------------------------------------------------------------------------- TTS


def test_tts_repeatable_and_varied():
    a, sr = tts.synthesize("seven", "en-us", "m3", rate_wpm=160, pitch=50, volume=100, fresh=True)
    c, _ = tts.synthesize("seven", "en-us", "f2", rate_wpm=160, pitch=50, volume=100)
    for _ in range(3):  # eSpeak carries state from call to call; fresh=True starts from scratch
        tts.synthesize("three", "en-gb-scotland", "klatt", rate_wpm=300, pitch=80, volume=50)
    b, _ = tts.synthesize("seven", "en-us", "m3", rate_wpm=160, pitch=50, volume=100, fresh=True)
    fast, _ = tts.synthesize("seven", "en-us", "m3", rate_wpm=300, pitch=50, volume=100)
    assert sr == 22050 and a.dtype == np.float32 and a.ndim == 1
    assert 0.1 < np.abs(a).max() <= 1.0 and 0.2 < len(a) / sr < 1.5
    assert np.array_equal(a, b)  # same settings, same samples, whatever came before
    assert not np.array_equal(a, c) and len(fast) < len(a)
    assert {"m3", "f2", "klatt"} <= set(tts.available_variants())
    assert "en-us" in tts.available_voices()
    with pytest.raises(ValueError):
        tts.synthesize("one", "en", "no-such-variant")


def test_speaker_partition_is_disjoint_and_seeded():
    parts = sd.partition_speakers(_cfg())
    for what in ("voices", "variants"):
        assert parts["test"][what] and parts["train"][what]
        assert not set(parts["test"][what]) & set(parts["train"][what])
    assert sd.partition_speakers(_cfg()) == parts
    assert sd.partition_speakers(_cfg(seed=8)) != parts


def test_coloured_noise_slopes():
    rng = np.random.default_rng(0)
    def low_high_ratio(colour):
        x = sd.coloured_noise(rng, 1 << 15, colour)
        p = np.abs(np.fft.rfft(x)) ** 2
        return p[10:200].mean() / p[-2000:].mean()
    r = {c: low_high_ratio(c) for c in sd.NOISE_COLOURS}
    assert r["brown"] > r["pink"] > r["white"] > r["blue"] > r["violet"]
    assert 0.5 < r["white"] < 2


# -------------------------------------------------------------------------- utterance level


def test_layout_and_corpus_json(utt_corpus):
    cfg, out, corpus = utt_corpus
    on_disk = json.loads((out / "corpus.json").read_text())
    assert on_disk == json.loads(json.dumps(corpus))
    assert on_disk["classes"] == list(sd.DIGITS) and on_disk["num_classes"] == 10
    assert on_disk["sample_rate"] == SR and on_disk["level"] == "utterance" and on_disk["seed"] == 7
    assert on_disk["members"] == {"audio": "flac", "label": "cls", "meta": "json"}
    assert on_disk["generator"]["settings"]["snr_db"] == list(cfg.snr_db)
    for split, n in cfg.split_counts().items():
        s = on_disk["splits"][split]
        assert s["count"] == n and sum(s["shard_counts"]) == n
        assert s["shards"] == [f"{split}/shard-{i:06d}.tar" for i in range(math.ceil(n / cfg.shard_size))]
        assert sorted(p.name for p in (out / split).iterdir()) == [Path(p).name for p in s["shards"]]  # no temp files
        assert s["labeled"] == (split != "unlabeled")


def test_shards_read_by_webdataset_and_tarfile(utt_corpus):
    cfg, out, corpus = utt_corpus
    for split, s in corpus["splits"].items():
        keys = []
        for rel, count in zip(s["shards"], s["shard_counts"]):
            names = list(_members(out / rel))
            assert all(n.count(".") == 1 for n in names)  # KEY.ext, keys without dots
            samples = _samples(out / rel)
            assert len(samples) == count
            for smp in samples:
                keys.append(smp["__key__"])
                assert "." not in smp["__key__"] and smp["__key__"].startswith(split + "-")
                wave, sr = sf.read(io.BytesIO(smp["flac"]), dtype="float32")
                info = sf.info(io.BytesIO(smp["flac"]))
                assert sr == SR and info.subtype == "PCM_16" and info.channels == 1 and wave.ndim == 1
                assert 0.3 < len(wave) / SR < 2.5  # one word plus silences
                assert len(wave) % 160 == 0
                assert np.sqrt(np.mean(wave**2)) > 1e-3 and np.abs(wave).max() <= 1.0
                meta = json.loads(smp["json"])
                assert meta["num_samples"] == len(wave)
                assert cfg.snr_db[0] <= meta["snr_db"] <= cfg.snr_db[1] and meta["noise"] in sd.NOISE_COLOURS
                if split == "unlabeled":
                    assert "cls" not in smp and "digits" not in meta and "text" not in meta
                else:
                    label = int(smp["cls"].decode("ascii"))
                    assert 0 <= label <= 9 and meta["digits"] == [label] and meta["text"] == sd.DIGITS[label]
        assert keys == [common.key_for(split, i, s["count"]) for i in range(s["count"])]


def test_labels_are_balanced(utt_corpus):
    cfg, out, corpus = utt_corpus
    labels = [int(smp["cls"]) for rel in corpus["splits"]["labeled"]["shards"] for smp in _samples(out / rel)]
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10  # 20 = 2 blocks of 10


def test_test_speakers_never_heard_in_training(utt_corpus):
    cfg, out, corpus = utt_corpus
    sp = corpus["splits"]
    for what in ("voices", "variants"):
        train = set(sp["labeled"][what]) | set(sp["unlabeled"][what])
        assert train and sp["test"][what] and not train & set(sp["test"][what])
    used = {split: set() for split in sp}
    for split, s in sp.items():
        for rel in s["shards"]:
            for smp in _samples(out / rel):
                meta = json.loads(smp["json"])
                used[split].add((meta["voice"], meta["variant"]))
                assert meta["voice"] in s["voices"] and meta["variant"] in s["variants"]
    train_voices = {v for split in ("labeled", "unlabeled") for v, _ in used[split]}
    train_variants = {x for split in ("labeled", "unlabeled") for _, x in used[split]}
    assert not train_voices & {v for v, _ in used["test"]}
    assert not train_variants & {x for _, x in used["test"]}


def test_deterministic_regardless_of_sharding(utt_corpus, tmp_path):
    cfg, out, corpus = utt_corpus
    rel = corpus["splits"]["unlabeled"]["shards"][1]
    # the same shard again, in this process, without Ray: identical bytes
    settings = sd.resolve_settings(cfg)
    spec = common.ShardSpec("unlabeled", 1, 10, 10, cfg.unlabeled)
    sd.make_shard(spec, settings, str(tmp_path / "again"))
    assert (tmp_path / "again" / rel).read_bytes() == (out / rel).read_bytes()
    # other shard boundaries: each sample's members are still identical
    odd = common.ShardSpec("unlabeled", 0, 7, 9, cfg.unlabeled)
    sd.make_shard(odd, settings, str(tmp_path / "odd"))
    ray_members = {}
    for r in corpus["splits"]["unlabeled"]["shards"]:
        ray_members.update(_members(out / r))
    for name, data in _members(tmp_path / "odd" / "unlabeled" / "shard-000000.tar").items():
        assert ray_members[name] == data, name
    # another seed: different audio
    other = sd.resolve_settings(_cfg(seed=8))
    sd.make_shard(spec, other, str(tmp_path / "seed8"))
    assert (tmp_path / "seed8" / rel).read_bytes() != (out / rel).read_bytes()


def test_rerun_removes_stale_shards(ray_local, tmp_path):
    big = _cfg(labeled=0, unlabeled=30, test=0)
    sd.generate(big, str(tmp_path), progress=None)
    assert len(list((tmp_path / "unlabeled").glob("shard-*.tar"))) == 3
    small = _cfg(labeled=0, unlabeled=10, test=0)
    corpus = sd.generate(small, str(tmp_path), progress=None)
    assert sorted(p.name for p in (tmp_path / "unlabeled").iterdir()) == ["shard-000000.tar"]
    assert corpus["splits"]["unlabeled"]["count"] == 10


def test_s3_output(ray_local, s3_bucket):
    from pipeline import storage

    root = f"s3://{s3_bucket}/digits"
    cfg = _cfg(labeled=4, unlabeled=6, test=4, shard_size=4)
    corpus = sd.generate(cfg, root, progress=None)
    assert common.read_corpus_json(root) == json.loads(json.dumps(corpus))
    uris = storage.listdir(storage.join(root, "unlabeled"))
    assert [storage.basename(u) for u in uris] == ["shard-000000.tar", "shard-000001.tar"]
    data = storage.read_bytes(uris[1])
    assert hashlib.sha256(data).hexdigest() == corpus["splits"]["unlabeled"]["shard_sha256"][1]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert names[0] == "unlabeled-000004.flac" and not any(n.endswith(".cls") for n in names)


# ------------------------------------------------------------------------------ frame level


def test_frame_labels(frame_corpus):
    cfg, out, corpus = frame_corpus
    assert corpus["classes"] == list(sd.DIGITS) + ["silence"] and corpus["num_classes"] == 11
    assert corpus["frame_shift_ms"] == 10.0 and corpus["frame_shift_samples"] == 160 and corpus["silence_class"] == 10
    assert corpus["members"]["label"] == "frames.npy"
    for split, s in corpus["splits"].items():
        for rel in s["shards"]:
            for smp in _samples(out / rel):
                wave, sr = sf.read(io.BytesIO(smp["flac"]), dtype="float32")
                meta = json.loads(smp["json"])
                assert "cls" not in smp
                if split == "unlabeled":
                    assert "frames.npy" not in smp and "digits" not in meta
                    continue
                frames = np.load(io.BytesIO(smp["frames.npy"]))
                assert frames.dtype == np.int16 and frames.shape == (math.ceil(len(wave) / 160),)
                assert (frames == 10).any() and (frames < 10).any() and frames.min() >= 0 and frames.max() <= 10
                assert frames[0] == 10 and frames[-1] == 10  # leading / trailing silence
                # the digit runs, in order, are exactly the spoken digits
                runs = [int(v) for i, v in enumerate(frames) if v != 10 and (i == 0 or frames[i - 1] != v)]
                assert runs == meta["digits"] and 2 <= len(runs) <= 5
                for (a, b), d in zip(meta["spans_frames"], meta["digits"]):
                    assert (frames[a:b] == d).all() and 10 <= b - a <= 150  # 0.1..1.5 s per word
                # speech is louder in digit frames than in silence frames, even with the noise
                fr = wave[: len(frames) * 160].reshape(-1, 160)
                e = (fr**2).mean(1)
                if meta["snr_db"] > 5:
                    assert e[frames < 10].mean() > 2 * e[frames == 10].mean()


# ----------------------------------------------------------------------------------- the job


def test_job_cli(ray_local, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_spoken_digits", REPO / "jobs" / "make_spoken_digits.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "cli"
    rc = job.main(["--output", str(out), "--labeled", "10", "--unlabeled", "10", "--test", "10", "--shard-size", "10",
                   "--snr-db", "5", "15", "--noise-colours", "pink", "brown"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "utterances/s" in text and "unlabeled" in text
    corpus = json.loads((out / "corpus.json").read_text())
    assert corpus["generator"]["settings"]["noise_colours"] == ["pink", "brown"]
    assert {s: v["count"] for s, v in corpus["splits"].items()} == {"labeled": 10, "unlabeled": 10, "test": 10}
