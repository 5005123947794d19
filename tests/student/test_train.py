"""jobs/train_student.py and jobs/evaluate.py on a real local Ray: 2-worker DDP over real shards."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.shards import SoftTargetRun
from pipeline.student import evaluate as evaluate_job
from pipeline.student.job import run as train
from pipeline.student.train import read_metrics
from pipeline.teacher.job import run as pseudo_label
from tests.helpers import audio_corpus, direct_logprobs, flac_bytes, tone, write_tar

REPO = Path(__file__).resolve().parents[2]
TEACHER = "pipeline.models.zoo:audio_cnn?width=8"
STUDENT = "pipeline.models.zoo:audio_cnn?width=4&depth=2"
COMMON = ["--workers", "2", "--cpus-per-worker", "0.5", "--batch-size", "4", "--lr", "0.01"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("cache")
    audio_corpus(root / "pool", shards=4, per_shard=6, seed=31, labels=False)
    audio_corpus(root / "lab", shards=1, per_shard=8, seed=32, prefix="lab")
    assert pseudo_label(["--input", str(root / "pool"), "--output", str(root / "st"), "--teacher", TEACHER,
                         "--top-k", "5", "--progress-interval", "5"]) == 0
    return root


def _metrics_epochs(out) -> list[int]:
    return [m["epoch"] for m in read_metrics(str(out))]


def test_train_resume_evaluate_and_self_teach(cache, tmp_path, capsys):
    out = tmp_path / "student"
    argv = ["--soft-targets", str(cache / "st"), "--labeled", str(cache / "lab"), "--labeled-ratio", "0.25",
            "--student", STUDENT, "--output", str(out), "--epochs", "4", "--eval", str(cache / "lab"), *COMMON]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train_student.py"), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_metrics_epochs(out)) < 1:
        assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, mid-training
    proc.wait()
    first = read_metrics(str(out))
    assert 1 <= len(first) < 4, "the kill must land mid-run"

    assert train(argv) == 0  # the same command resumes
    text = capsys.readouterr().out
    history = read_metrics(str(out))
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]  # each epoch once: the metrics continue
    # The epochs before the kill continue unchanged: metrics.jsonl is written only once Ray
    # Train has committed the epoch's checkpoint, so the wait above ends after a commit and the
    # rerun replays none of them (a replayed epoch would differ: DDP's split of the blocks
    # between workers is not deterministic). Only the timings are the new process's.
    timing = ("seconds", "samples_per_s", "data_wait_share", "phases", "startup_s")
    assert [{k: v for k, v in m.items() if k not in timing} for m in history[: len(first)]] == \
        [{k: v for k, v in m.items() if k not in timing} for m in first]
    # 24 pool samples, 8 labeled x 1 repeat (ratio 0.25 of 32) -> 32 rows / 2 workers / batch 4 = 4 steps
    assert [m["step"] for m in history] == [4, 8, 12, 16]
    assert all(m["eval_accuracy"] is not None and m["kd"] is not None for m in history)
    summary = json.loads([ln for ln in text.splitlines() if ln.startswith('{"summary"')][-1])["summary"]
    final = Path(summary["final"])
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["epoch"] == 4 and cfg["step"] == 16
    assert cfg["softtargets_fingerprint"] == SoftTargetRun(str(cache / "st")).manifest.fingerprint
    assert (final / "model.safetensors").exists() and not (final / "train_state.pt").exists()

    # Rerunning a finished job does nothing.
    assert train(argv) == 0
    assert "already complete" in capsys.readouterr().out

    # Evaluation equals a direct computation with the checkpoint.
    result_file = tmp_path / "eval.json"
    assert evaluate_job.run(["--checkpoint", str(final), "--input", str(cache / "lab"),
                             "--output", str(result_file)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    got = json.loads(last)
    assert got == json.loads(result_file.read_text())
    import tarfile

    from pipeline.modalities.audio import decode_audio

    with tarfile.open(cache / "lab" / "shard-0000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    keys = sorted({n.split(".")[0] for n in members})
    waves = [decode_audio(members[f"{k}.flac"])[0] for k in keys]
    labels = [int(members[f"{k}.cls"]) for k in keys]
    preds = [int(lp.argmax()) for lp in direct_logprobs(str(final), cfg["preprocessing"], waves)]
    assert got["samples"] == 8 and got["accuracy"] == pytest.approx(np.mean(np.array(preds) == np.array(labels)))

    # Against the soft-target run: agreement with the teacher's top-1 and KL to its top-k.
    assert evaluate_job.run(["--checkpoint", str(final), "--input", str(cache / "st")]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    st = SoftTargetRun(str(cache / "st"))
    agree, kls = [], []
    for name in st.shard_names:
        c = st.read_numpy(name)
        with tarfile.open(cache / "pool" / f"{name}.tar") as tar:
            audio = {m.name.split(".")[0]: decode_audio(tar.extractfile(m).read())[0] for m in tar}
        refs = direct_logprobs(str(final), cfg["preprocessing"], [audio[k] for k in c["key"]])
        for i, q in enumerate(refs):
            ids = c["ids"][i].astype(np.int64)
            p = np.exp(c["logprobs"][i].astype(np.float64))
            p /= p.sum()
            kls.append(float((p * (np.log(p) - q.double().numpy()[ids])).sum()))
            agree.append(int(q.argmax()) == int(ids[0]))
    assert got["mode"] == "softtargets" and got["samples"] == 24
    assert got["agreement"] == pytest.approx(np.mean(agree)) and got["kl"] == pytest.approx(np.mean(kls), abs=1e-4)

    # The student's final checkpoint is a valid --teacher (self-training).
    assert pseudo_label(["--input", str(cache / "lab"), "--output", str(tmp_path / "self"), "--teacher", str(final),
                         "--progress-interval", "5"]) == 0
    capsys.readouterr()
    assert SoftTargetRun(str(tmp_path / "self")).manifest.preprocessing == cfg["preprocessing"]


def test_killed_worker_recovers(cache, tmp_path, capsys):
    out = tmp_path / "student"
    killed = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline:
            if _metrics_epochs(out):
                for p in psutil.process_iter(["pid", "cmdline"]):
                    if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                        os.kill(p.info["pid"], signal.SIGKILL)
                        killed.append(p.info["pid"])
                        return
            time.sleep(0.2)

    t = threading.Thread(target=killer)
    t.start()
    rc = train(["--soft-targets", str(cache / "st"), "--student", STUDENT, "--output", str(out), "--epochs", "3",
                "--max-failures", "2", *COMMON])
    t.join()
    capsys.readouterr()
    assert rc == 0 and killed
    history = read_metrics(str(out))
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert [m["step"] for m in history] == [3, 6, 9]  # 24 rows / 2 workers / batch 4


def test_relative_paths_mean_the_launch_directory(cache, tmp_path, monkeypatch, capsys):
    """Relative --labeled/--eval/--output and a relative weights file name the same files in the
    Ray Train workers as in the driver, although the workers run in a directory of their own."""
    from safetensors.torch import save_file

    from pipeline.models.spec import build_model, parse_spec

    monkeypatch.chdir(tmp_path)
    shutil.copytree(cache / "lab", tmp_path / "lab")
    init = build_model(parse_spec(STUDENT))
    save_file({k: v.contiguous() for k, v in init.state_dict().items()}, "init.safetensors")
    assert train(["--labeled", "lab", "--eval", "lab", "--student", STUDENT + "&weights=init.safetensors",
                  "--output", "out", "--epochs", "1", *COMMON]) == 0
    text = capsys.readouterr().out
    summary = json.loads([ln for ln in text.splitlines() if ln.startswith('{"summary"')][-1])["summary"]
    assert summary["final"] == str(tmp_path / "out" / "final")
    history = read_metrics("out")
    assert [m["epoch"] for m in history] == [1] and history[0]["eval_accuracy"] is not None
    assert 0 <= history[0]["data_wait_share"] <= 1
    from pipeline.student.stats import PHASES

    # where the epoch went, and when the first step came (after this process started)
    assert set(history[0]["phases"]) == set(PHASES) and all(v >= 0 for v in history[0]["phases"].values())
    assert 0 < summary["startup_s"] == history[0]["startup_s"] and "first step" in text
    assert (tmp_path / "out" / "metrics.jsonl").is_file() and (tmp_path / "out" / "final" / "model.safetensors").is_file()
    assert summary["last"]["epoch"] == 1 and "done: epoch 1 step 1" in text
    # the teacher stage's workers write the run directory: a relative --output is the launch directory's
    assert pseudo_label(["--input", "lab", "--output", "st", "--teacher", TEACHER, "--progress-interval", "5"]) == 0
    capsys.readouterr()
    assert SoftTargetRun("st").shard_names == ["shard-0000"] and (tmp_path / "st" / "shards" / "shard-0000.parquet").is_file()


def test_incompatible_caches_are_refused(cache, tmp_path, capsys):
    def refused(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            train(["--output", str(tmp_path / "o"), *argv])
        assert e.value.code == 2
        return capsys.readouterr().err

    st = str(cache / "st")
    assert "between 1 and the stored k=5" in refused("--soft-targets", st, "--student", STUDENT, "--top-k", "6")
    assert "10 classes but the student outputs 7" in refused(
        "--soft-targets", st, "--student", STUDENT + "&num_classes=7")
    assert "utterance level but the student outputs frame level" in refused(
        "--soft-targets", st, "--student", STUDENT + "&level=frame")
    assert "image model but the data is audio" in refused(
        "--soft-targets", st, "--student", "pipeline.models.zoo:image_cnn")
    bad = tmp_path / "v9"
    shutil.copytree(cache / "st", bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 9
    (bad / "manifest.json").write_text(json.dumps(m))
    assert "unsupported format_version 9" in refused("--soft-targets", str(bad), "--student", STUDENT)
    for blur in ("-1", "nan"):
        assert "--label-blur must be a finite number >= 0" in refused("--soft-targets", st, "--student", STUDENT,
                                                                      "--label-blur", blur)
    assert not (tmp_path / "o").exists()


def _frame_corpus(root, shards: int, per_shard: int, seed: int, labels: bool):
    """Clips of tone / silence / tone; frame label 1 over tones, 0 over silence (10 ms frames)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            parts, lab = [], []
            for j in range(3):
                seg = tone(rng, rng.uniform(0.2, 0.4)) if j != 1 else np.zeros(int(rng.uniform(0.2, 0.4) * 16000),
                                                                                np.float32)
                seg = seg[: len(seg) // 160 * 160]
                parts.append(seg)
                lab += [1 if j != 1 else 0] * (len(seg) // 160)
            members = {"flac": flac_bytes(np.concatenate(parts))}
            if labels:
                buf = io.BytesIO()
                np.save(buf, np.array(lab, np.int16))
                members["frames.npy"] = buf.getvalue()
            samples.append((f"f{s}-{i:03d}", members))
        write_tar(root / f"shard-{s:04d}.tar", samples)


def test_frame_level_teacher_pool_student(tmp_path, ray_local, capsys):
    _frame_corpus(tmp_path / "lab", 1, 12, seed=41, labels=True)
    _frame_corpus(tmp_path / "pool", 2, 8, seed=42, labels=False)
    frame = "pipeline.models.zoo:audio_cnn?level=frame&time_stride=2&num_classes=2"
    # 1) a frame-level teacher trained on labels only
    assert train(["--labeled", str(tmp_path / "lab"), "--student", frame + "&width=8", "--output",
                  str(tmp_path / "teacher"), "--epochs", "3", *COMMON]) == 0
    # 2) its frame posteriors over the pool
    assert pseudo_label(["--input", str(tmp_path / "pool"), "--output", str(tmp_path / "st"), "--teacher",
                         str(tmp_path / "teacher" / "final"), "--top-k", "2", "--progress-interval", "5"]) == 0
    st = SoftTargetRun(str(tmp_path / "st"))
    assert st.manifest.level == "frame" and st.manifest.frame_shift_ms == 20.0
    # 3) a student at another frame rate is refused before any worker starts
    with pytest.raises(SystemExit):
        train(["--soft-targets", str(tmp_path / "st"), "--student",
               "pipeline.models.zoo:audio_cnn?level=frame&time_stride=4&num_classes=2", "--output", str(tmp_path / "x")])
    assert "frame rate must match" in capsys.readouterr().err  # 40 ms student frames over 20 ms teacher frames
    # 4) the student from the frame-level cache, with labeled frames mixed in
    assert train(["--soft-targets", str(tmp_path / "st"), "--labeled", str(tmp_path / "lab"), "--student",
                  frame + "&width=4&depth=2", "--output", str(tmp_path / "student"), "--epochs", "2",
                  "--eval", str(tmp_path / "lab"), *COMMON]) == 0
    hist = read_metrics(str(tmp_path / "student"))
    assert len(hist) == 2 and hist[-1]["kd"] is not None and hist[-1]["ce"] is not None
    capsys.readouterr()
    # 5) frame accuracy from the evaluator equals a direct count
    final = tmp_path / "student" / "final"
    assert evaluate_job.run(["--checkpoint", str(final), "--input", str(tmp_path / "lab")]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    import tarfile

    from pipeline.modalities.audio import decode_audio
    from pipeline.student.data import resample_frame_labels

    cfg = json.loads((final / "config.json").read_text())
    correct = total = 0
    with tarfile.open(tmp_path / "lab" / "shard-0000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    for key in sorted({n.split(".")[0] for n in members}):
        wave = decode_audio(members[f"{key}.flac"])[0]
        lab = resample_frame_labels(np.load(io.BytesIO(members[f"{key}.frames.npy"])), 10.0, 20.0)
        pred = direct_logprobs(str(final), cfg["preprocessing"], [wave])[0].argmax(-1).numpy()
        n = min(len(pred), len(lab))
        correct += int((pred[:n] == lab[:n]).sum())
        total += n
    assert got["frames"] == total and got["accuracy"] == pytest.approx(correct / total)
