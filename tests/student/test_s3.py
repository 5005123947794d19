"""The student stage end to end on S3 (moto's server on 127.0.0.1), on the suite's local Ray:
soft targets read from s3://, Ray Train's storage (checkpoints) in s3://, a rerun resumes from
the checkpoint in s3://, metrics.jsonl and final/ in s3://, and final/ teaches again from s3://.

    python -m pytest tests/student/test_s3.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import s3fs

from pipeline.shards import SoftTargetRun
from pipeline.student.job import run as train
from pipeline.student.train import read_metrics
from pipeline.teacher.job import run as pseudo_label
from tests.helpers import audio_corpus

TEACHER = "pipeline.models.zoo:audio_cnn?width=8"
STUDENT = "pipeline.models.zoo:audio_cnn?width=4&depth=2"
COMMON = ["--workers", "2", "--cpus-per-worker", "0.5", "--batch-size", "4", "--lr", "0.01"]


def _summary(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith('{"summary"')][-1])["summary"]


def _checkpoints(keys) -> list[str]:
    """Ray Train checkpoint directories under student/train/ (not its checkpoint_manager_snapshot.json)."""
    return sorted({k.split("/")[2] for k in keys if k.startswith("student/train/checkpoint_") and k.count("/") >= 3})


def test_student_on_s3_checkpoints_resumes_and_teaches(tmp_path, ray_local, s3_bucket, capsys, monkeypatch):
    # A relative s3 "path" handed to Ray Train without its filesystem would land under the
    # working directory; run from an empty one to catch that.
    monkeypatch.chdir(tmp_path)
    fs = s3fs.S3FileSystem()
    audio_corpus(tmp_path / "pool", shards=2, per_shard=6, seed=61, labels=False)
    audio_corpus(tmp_path / "lab", shards=1, per_shard=4, seed=62, prefix="lab")
    for d in ("pool", "lab"):
        for p in sorted((tmp_path / d).iterdir()):
            fs.put_file(str(p), f"{s3_bucket}/{d}/{p.name}")
    base = f"s3://{s3_bucket}"
    assert pseudo_label(["--input", f"{base}/pool", "--output", f"{base}/st", "--teacher", TEACHER, "--top-k", "5",
                         "--progress-interval", "5"]) == 0
    capsys.readouterr()
    out = f"{base}/student"
    argv = ["--soft-targets", f"{base}/st", "--student", STUDENT, "--output", out, *COMMON]

    # 1) one epoch: checkpoint, metrics and final/ all in the bucket
    assert train(argv + ["--epochs", "1"]) == 0
    s1 = _summary(capsys.readouterr().out)
    first = read_metrics(out)
    assert [m["epoch"] for m in first] == [1] and [m["step"] for m in first] == [2]  # 12 rows / 2 workers / batch 4
    listing = sorted(p.split("/", 1)[1] for p in fs.find(f"{s3_bucket}/student"))
    ckpts = _checkpoints(listing)
    assert len(ckpts) == 1, listing
    files = ("model.safetensors", "config.json", "train_state.pt")
    assert {f"student/train/{ckpts[0]}/{f}" for f in files} <= set(listing)
    assert s1["checkpoint"].endswith(f"{s3_bucket}/student/train/{ckpts[0]}")
    assert s1["final"] == f"{out}/final"
    assert {"student/metrics.jsonl", "student/final/model.safetensors", "student/final/config.json"} <= set(listing)
    assert "student/final/train_state.pt" not in listing
    assert not [p for p in listing if ".tmp" in p]
    assert sorted(os.listdir(tmp_path)) == ["lab", "pool"], "nothing may be written to the local working directory"

    # 2) more epochs, same output: Ray Train resumes from the checkpoint in s3, metrics continue
    assert train(argv + ["--epochs", "3"]) == 0
    s2 = _summary(capsys.readouterr().out)
    history = read_metrics(out)
    assert [m["epoch"] for m in history] == [1, 2, 3] and [m["step"] for m in history] == [2, 4, 6]
    assert history[0] == first[0]  # epoch 1 was not trained again
    ckpts = _checkpoints(p.split("/", 1)[1] for p in fs.find(f"{s3_bucket}/student"))
    assert len(ckpts) == 2  # --keep-checkpoints 2, older ones deleted from the bucket
    assert s2["checkpoint"].endswith(ckpts[-1])
    final_cfg = json.loads(fs.cat_file(f"{s3_bucket}/student/final/config.json"))
    assert final_cfg["epoch"] == 3 and final_cfg["step"] == 6
    assert final_cfg["softtargets_fingerprint"] == SoftTargetRun(f"{base}/st").manifest.fingerprint

    # 3) the same command again: nothing to do
    assert train(argv + ["--epochs", "3"]) == 0
    s3 = _summary(capsys.readouterr().out)
    assert s3["already_complete"] is True and s3["epoch"] == 3

    # 4) final/ in s3 is a valid --teacher (self-training), read straight from the bucket
    assert pseudo_label(["--input", f"{base}/lab", "--output", f"{base}/self", "--teacher", f"{out}/final",
                         "--progress-interval", "5"]) == 0
    s4 = _summary(capsys.readouterr().out)
    assert s4["samples"] == 4 and s4["errors"] == 0
    m = SoftTargetRun(f"{base}/self").manifest
    assert m.preprocessing == final_cfg["preprocessing"] and m.num_classes == 10
    assert sorted(os.listdir(tmp_path)) == ["lab", "pool"]
    assert not Path(s3_bucket).exists()
