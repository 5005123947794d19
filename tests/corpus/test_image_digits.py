# python -m pytest tests/corpus/test_image_digits.py -q
"""The handwritten-digits image corpus on a real local Ray: shards, PNG, labels, determinism,
and no source image in both training and test splits. ``ray_local`` (one local Ray for the
suite) comes from tests/conftest.py."""

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from recipes.corpus import common
from recipes.corpus import image_digits as im

REPO = Path(__file__).resolve().parents[2]


def _cfg(**kw):
    base = dict(labeled=30, unlabeled=250, test=60, shard_size=100, seed=3)
    base.update(kw)
    return im.ImageDigitsConfig(**base)


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("image_digits")
    cfg = _cfg()
    return cfg, out, im.generate(cfg, str(out), progress=None)


def _samples(path: Path) -> list[dict]:
    return list(wds.WebDataset(str(path), shardshuffle=False))


def _all(out: Path, corpus: dict, split: str) -> list[dict]:
    return [s for rel in corpus["splits"][split]["shards"] for s in _samples(out / rel)]


def test_layout_and_corpus_json(corpus):
    cfg, out, c = corpus
    assert json.loads((out / "corpus.json").read_text()) == json.loads(json.dumps(c))
    assert c["modality"] == "image" and c["classes"] == [str(d) for d in range(10)] and c["num_classes"] == 10
    assert c["image_size"] == [32, 32] and c["members"] == {"image": "png", "label": "cls", "meta": "json"}
    assert {s: v["count"] for s, v in c["splits"].items()} == {"labeled": 30, "unlabeled": 250, "test": 60}
    assert c["splits"]["unlabeled"]["shards"] == [f"unlabeled/shard-{i:06d}.tar" for i in range(3)]
    assert c["splits"]["unlabeled"]["shard_counts"] == [100, 100, 50]
    for split, s in c["splits"].items():
        for rel in s["shards"]:
            with tarfile.open(out / rel) as tar:  # plain tar, KEY.ext members
                names = tar.getnames()
            assert all(n.count(".") == 1 and n.startswith(split + "-") for n in names)


def test_images_and_labels(corpus):
    cfg, out, c = corpus
    _, targets = im.load_sources()
    for split in im.SPLITS:
        samples = _all(out, c, split)
        assert [s["__key__"] for s in samples] == [common.key_for(split, i, len(samples)) for i in range(len(samples))]
        for s in samples:
            img = Image.open(io.BytesIO(s["png"]))
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
            x = np.asarray(img)
            assert x.std() > 10 and (x[..., 0] == x[..., 2]).all()  # not blank; gray as RGB
            meta = json.loads(s["json"])
            if split == "unlabeled":
                assert "cls" not in s and meta["augment"] is not None
            else:
                assert int(s["cls"]) == targets[meta["source_index"]] and meta["augment"] is None
    labeled = [int(s["cls"]) for s in _all(out, c, "labeled")]
    assert np.bincount(labeled, minlength=10).tolist() == [3] * 10  # class-balanced


def test_no_source_image_in_train_and_test(corpus):
    cfg, out, c = corpus
    used = {split: {json.loads(s["json"])["source_index"] for s in _all(out, c, split)} for split in im.SPLITS}
    train = used["labeled"] | used["unlabeled"]
    assert train and used["test"] and not train & used["test"]
    sp = c["splits"]
    assert not (set(sp["labeled"]["source_indices"]) | set(sp["unlabeled"]["source_indices"])) & set(sp["test"]["source_indices"])
    assert used["test"] <= set(sp["test"]["source_indices"]) and used["unlabeled"] <= set(sp["unlabeled"]["source_indices"])
    # the full partition covers every one of the 1,797 images exactly once
    _, targets = im.load_sources()
    parts = im.partition_sources(_cfg(test=None), targets)
    assert sorted(parts["train"] + parts["test"]) == list(range(len(targets)))


def test_deterministic(corpus, tmp_path):
    cfg, out, c = corpus
    rel = c["splits"]["unlabeled"]["shards"][1]
    spec = common.ShardSpec("unlabeled", 1, 100, 100, cfg.unlabeled)
    im.make_shard(spec, im.resolve_settings(cfg), str(tmp_path / "again"))
    assert (tmp_path / "again" / rel).read_bytes() == (out / rel).read_bytes()
    im.make_shard(spec, im.resolve_settings(_cfg(seed=4)), str(tmp_path / "seed4"))
    assert (tmp_path / "seed4" / rel).read_bytes() != (out / rel).read_bytes()
    assert im.partition_sources(_cfg(seed=4), im.load_sources()[1]) != im.partition_sources(cfg, im.load_sources()[1])


def test_too_many_labeled_is_an_error():
    with pytest.raises(ValueError, match="labeled"):
        im.partition_sources(_cfg(labeled=5000), im.load_sources()[1])
    with pytest.raises(ValueError, match="test"):
        im.partition_sources(_cfg(test=5000), im.load_sources()[1])


def test_job_cli(ray_local, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_image_digits", REPO / "jobs" / "make_image_digits.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "cli"
    assert job.main(["--output", str(out), "--labeled", "20", "--unlabeled", "40", "--test", "20", "--size", "28"]) == 0
    assert "images/s" in capsys.readouterr().out
    c = json.loads((out / "corpus.json").read_text())
    assert c["image_size"] == [28, 28] and c["splits"]["unlabeled"]["count"] == 40
