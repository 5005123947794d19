"""jobs/pseudo_label.py on a real local Ray, over real encoded shards made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.shards import SoftTargetRun
from pipeline.teacher.job import run
from tests.helpers import (
    assert_topk_matches, audio_corpus, direct_logprobs, flac_bytes, image_bytes, parquet_input, tone, write_tar,
)

CNN = "pipeline.models.zoo:audio_cnn?width=8"


def _run(argv, capsys):
    rc = run([str(a) for a in argv] + ["--progress-interval", "0.5"])
    out = capsys.readouterr().out
    summary = json.loads([line for line in out.splitlines() if line.startswith('{"summary"')][-1])["summary"]
    return rc, out, summary


def _all_rows(run_dir: str):
    r = SoftTargetRun(run_dir)
    cols = {name: r.read_numpy(name) for name in r.shard_names}
    return r, cols


def test_audio_utterance_values_cache_hit_and_fingerprint_guard(tmp_path, ray_local, capsys):
    waves = audio_corpus(tmp_path / "in", shards=3, per_shard=5, seed=1)
    out = tmp_path / "st"
    argv = ["--input", tmp_path / "in", "--output", out, "--teacher", CNN, "--top-k", "4", "--batch-size", "4"]
    rc, text, summary = _run(argv, capsys)
    assert rc == 0
    assert summary["samples"] == 15 and summary["errors"] == 0 and summary["shards_done"] == 3
    assert summary["bytes_per_sample"] > 0 and "ETA" in text

    r, cols = _all_rows(str(out))
    m = r.manifest
    assert (m.modality, m.level, m.k, m.num_classes, m.encoding) == ("audio", "utterance", 4, 10, "parquet")
    assert sorted(r.shard_names) == ["shard-0000", "shard-0001", "shard-0002"]
    assert all(rec.rows == 5 and rec.error_rows == 0 and rec.node for rec in m.shards.values())
    keys = [k for c in cols.values() for k in c["key"]]
    assert sorted(keys) == sorted(waves)  # every key exactly once
    ref = dict(zip(sorted(waves), direct_logprobs(CNN, m.preprocessing, [waves[k] for k in sorted(waves)])))
    for c in cols.values():
        for i, key in enumerate(c["key"]):
            assert_topk_matches(c["ids"][i], c["logprobs"][i], ref[key])
            full = ref[key]
            assert int(c["argmax"][i]) == int(full.argmax())
            assert abs(float(c["confidence"][i]) - float(full.exp().max())) < 2e-3
            assert abs(float(c["entropy"][i]) - float(-(full.exp() * full).sum())) < 1e-2

    # Same command again: a full cache hit, decided before Ray is even asked for a teacher.
    rc, text, summary = _run(argv, capsys)
    assert rc == 0 and summary["cache_hit"] is True and summary["shards_skipped"] == 3 and summary["samples"] == 0
    assert "no teacher batch was run" in text and "teacher actor" not in text

    # Another k is another fingerprint: refused before anything runs, the directory untouched.
    with pytest.raises(SystemExit) as e:
        run([str(a) for a in argv[:-4]] + ["--top-k", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and str(out) in err
    assert SoftTargetRun(str(out)).manifest.fingerprint == m.fingerprint


def test_image_parquet_input_webdataset_output(tmp_path, ray_local, capsys):
    rng = np.random.default_rng(3)
    imgs = {f"im{i:03d}": rng.integers(0, 256, size=(36, 44, 3), dtype=np.uint8) for i in range(10)}
    (tmp_path / "in").mkdir()
    parquet_input(tmp_path / "in" / "part-0.parquet", [(k, image_bytes(v, "PNG")) for k, v in list(imgs.items())[:6]])
    parquet_input(tmp_path / "in" / "part-1.parquet", [(k, image_bytes(v, "JPEG")) for k, v in list(imgs.items())[6:]])
    spec = "pipeline.models.zoo:image_cnn?width=8&num_classes=12"
    out = tmp_path / "st"
    rc, _, summary = _run(["--input", tmp_path / "in", "--output", out, "--teacher", spec, "--format", "webdataset",
                           "--top-k", "5", "--image-resize", "32", "--image-crop", "28"], capsys)
    assert rc == 0 and summary["samples"] == 10
    r, cols = _all_rows(str(out))
    assert r.manifest.modality == "image" and r.manifest.encoding == "webdataset"
    assert r.manifest.preprocessing["crop"] == 28
    import webdataset as wds

    tar_keys = [s["__key__"] for s in wds.WebDataset(r.shard_uri("part-0"), shardshuffle=False)]
    assert sorted(tar_keys) == sorted(list(imgs)[:6])
    from pipeline.modalities import preprocessing_from_dict
    from pipeline.modalities.image import prepare_image

    prep = preprocessing_from_dict(r.manifest.preprocessing)
    from tests.helpers import image_bytes as enc

    for name, c in cols.items():
        fmt = "PNG" if name == "part-0" else "JPEG"
        inputs = [prepare_image(enc(imgs[k], fmt), prep) for k in c["key"]]
        refs = direct_logprobs(spec, r.manifest.preprocessing, inputs)
        for i in range(len(inputs)):
            assert_topk_matches(c["ids"][i], c["logprobs"][i], refs[i])


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_frame_level_with_chunking(tmp_path, ray_local, capsys, fmt):
    waves = audio_corpus(tmp_path / "in", shards=1, per_shard=3, seed=5, seconds=(2.3, 2.9))
    spec = "pipeline.models.zoo:audio_cnn?width=8&level=frame&time_stride=2&num_classes=11"
    out = tmp_path / "st"
    rc, _, summary = _run(["--input", tmp_path / "in", "--output", out, "--teacher", spec, "--format", fmt,
                           "--top-k", "3", "--chunk-seconds", "1.0"], capsys)
    assert rc == 0
    r, cols = _all_rows(str(out))
    m = r.manifest
    assert m.level == "frame" and m.frame_shift_ms == 20.0 and m.k == 3 and m.id_dtype == "uint8"
    c = cols["shard-0000"]
    # 2.3-2.9 s in 1 s windows: two full chunks and a tail >= 0.25 s -> 3 chunks per clip
    assert len(c["key"]) == 9 and summary["samples"] == 9
    assert summary["frames"] == int(c["num_frames"].sum()) and summary["bytes_per_frame"] > 0
    for i, key in enumerate(c["key"]):
        base, span = key.split("@")
        lo, hi = map(int, span.split("-"))
        chunk = waves[base][lo:hi]
        ref = direct_logprobs(spec, m.preprocessing, [chunk])[0]  # (T, C)
        n = int(c["num_frames"][i])
        assert n == ref.shape[0] == -(-(len(chunk) // 160 + 1) // 2)
        sl = slice(c["offsets"][i], c["offsets"][i + 1])
        assert_topk_matches(c["ids"][sl], c["logprobs"][sl], ref)


def test_ensemble_of_torchscript_and_weights_file(tmp_path, ray_local, capsys):
    from safetensors.torch import save_file

    from pipeline.models.spec import build_model, parse_spec
    from pipeline.models.zoo import audio_cnn

    waves = audio_corpus(tmp_path / "in", shards=1, per_shard=6, seed=7)
    a = str(tmp_path / "member_a.pt")  # a TorchScript archive
    torch.jit.save(torch.jit.script(build_model(parse_spec(CNN)).eval()), a)
    other = audio_cnn(width=12, depth=3)
    torch.nn.init.normal_(other.head.weight, std=0.5)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "b.safetensors"))
    b = f"pipeline.models.zoo:audio_cnn?width=12&depth=3&weights={tmp_path / 'b.safetensors'}"
    out = tmp_path / "st"
    rc, _, _ = _run(["--input", tmp_path / "in", "--output", out, "--teacher", a, "--teacher", b, "--top-k", "10"],
                    capsys)
    assert rc == 0
    r, cols = _all_rows(str(out))
    ids = r.manifest.teacher["identities"]
    assert [i["kind"] for i in ids] == ["torchscript", "module"] and ids[1]["weights_sha256"]
    assert r.manifest.teacher["ensemble"] == "mean-probability"
    c = cols["shard-0000"]
    xs = [waves[k] for k in c["key"]]
    ra, rb = direct_logprobs(a, r.manifest.preprocessing, xs), direct_logprobs(b, r.manifest.preprocessing, xs)
    for i in range(len(xs)):
        mixed = torch.log((ra[i].double().exp() + rb[i].double().exp()) / 2).float()
        assert_topk_matches(c["ids"][i], c["logprobs"][i], mixed)
        assert float(c["logsumexp"][i]) == 0.0  # an ensemble stores log p itself as its logits


def test_bad_inputs_are_quarantined_once(tmp_path, ray_local, capsys):
    rng = np.random.default_rng(11)
    good = {f"ok{i}": tone(rng, 0.6) for i in range(6)}
    loud = 0.9 * np.sign(tone(rng, 0.6))  # NaN from the teacher below
    samples = [(k, {"flac": flac_bytes(w)}) for k, w in list(good.items())[:3]]
    samples += [
        ("corrupt", {"flac": flac_bytes(good["ok0"])[:60]}),
        ("empty", {"wav": __import__("tests.helpers", fromlist=["wav_bytes"]).wav_bytes(np.zeros(0, np.float32))}),
        ("notaudio", {"txt": b"hello"}),
        ("animage", {"png": image_bytes(np.zeros((4, 4, 3), np.uint8))}),
        ("loud", {"flac": flac_bytes(loud.astype(np.float32))}),
        ("ok0", {"flac": flac_bytes(good["ok0"])}),  # duplicate key
    ]
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", samples)
    write_tar(tmp_path / "in" / "b.tar", [(k, {"flac": flac_bytes(w)}) for k, w in list(good.items())[3:]])
    data = (tmp_path / "in" / "b.tar").read_bytes()
    (tmp_path / "in" / "b.tar").write_bytes(data[: len(data) // 2 + 700])  # truncated mid-member
    teacher = "tests.teacher_models:nan_on_loud?threshold=3.0&width=8"
    argv = ["--input", tmp_path / "in", "--output", tmp_path / "st", "--teacher", teacher, "--modality", "audio"]
    rc, text, summary = _run(argv + ["--max-error-rate", "0.9"], capsys)
    assert rc == 0
    r, cols = _all_rows(str(tmp_path / "st"))
    errors = r.errors().to_pylist()
    reasons = {e["key"]: e["reason"] for e in errors}
    assert reasons["corrupt"] == "corrupt_audio"
    assert reasons["empty"] == "empty_audio"
    assert reasons["notaudio"] == "no_media"
    assert reasons["animage"] == "wrong_modality"
    assert reasons["loud"] == "nonfinite_output"
    assert [e["reason"] for e in errors if e["key"] == "ok0"] == ["duplicate_key"]
    assert any(e["reason"] == "truncated_tar" and e["input"].endswith("b.tar") for e in errors)
    out_keys = [k for c in cols.values() for k in c["key"]]
    assert len(out_keys) == len(set(out_keys))  # exactly once
    assert {"ok0", "ok1", "ok2"} <= set(out_keys)
    assert not ({"corrupt", "empty", "notaudio", "animage", "loud"} & set(out_keys))
    b_keys = set(cols["b"]["key"])
    assert b_keys < {"ok3", "ok4", "ok5"} and len(b_keys) >= 1  # what precedes the cut survives
    assert summary["errors_by_reason"]["nonfinite_output"] == 1 and "nonfinite_output" in text

    # Over the limit: the exit code says so (judged over the whole run directory).
    rc, text, _ = _run(argv + ["--max-error-rate", "0.1"], capsys)
    assert rc == 1


def test_config_file_and_early_errors(tmp_path, capsys):
    audio_corpus(tmp_path / "in", shards=1, per_shard=2)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: [{tmp_path / 'in'}]\nteacher: {CNN}\ntop-k: 0\n")
    with pytest.raises(SystemExit) as e:  # a bad value from the file fails before Ray starts
        run(["--config", str(cfg), "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "--top-k" in capsys.readouterr().err
    cfg.write_text("tpo_k: 3\n")
    with pytest.raises(SystemExit):
        run(["--config", str(cfg)])
    assert "unknown option 'tpo_k'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--teacher", CNN])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--teacher", "no.such.module:f"])
    assert "cannot import" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
