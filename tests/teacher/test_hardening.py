"""A hostile new user's inputs, made for real here: link members, repeated members, a
decompression bomb, dotted keys, one file under two spellings, damaged runs, checkpoints that
name code, unreachable stores and badly typed configs. Each test asserts the exact outcome:
which keys are soft targets, which are errors with which reason, the exit code, and that
nothing ran that data chose."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest

from pipeline.shards import SoftTargetRun
from pipeline.student import evaluate as evaluate_job
from pipeline.student.job import run as train
from pipeline.teacher.job import run as pseudo_label
from tests.helpers import audio_corpus, image_bytes

IMAGE_TEACHER = "pipeline.models.zoo:image_cnn?width=4&num_classes=5"
AUDIO_TEACHER = "pipeline.models.zoo:audio_cnn?width=8"


def _summary(out: str) -> dict:
    return json.loads([ln for ln in out.splitlines() if ln.startswith('{"summary"')][-1])["summary"]


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, ray_local):
    """One image shard with every kind of trouble, pseudo-labelled once (WebDataset output)."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(5)
    img = {k: rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8) for k in ("a", "b", "c", "v1.2/d", "e")}
    (root / "in").mkdir()
    with tarfile.open(root / "in" / "s1.tar", "w") as tar:
        _member(tar, "a.png", image_bytes(img["a"]))
        _member(tar, "a.cls", b"1")
        _member(tar, "b.png", image_bytes(img["b"]))
        _member(tar, "c.png", image_bytes(img["c"]))
        _member(tar, "c.png", image_bytes(img["a"]))  # the same member twice in a row: the first counts
        _member(tar, "bomb.png", bomb_png())  # 177 bytes declaring 30000 x 30000 pixels
        _member(tar, "sym.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _member(tar, "hard.png", kind=tarfile.LNKTYPE, link="a.png")
        _member(tar, "v1.2/d.png", image_bytes(img["v1.2/d"]))  # a key with a dot (in its directory)
        _member(tar, "../../e.png", image_bytes(img["e"]))  # a hostile name: only ever a key
    out = root / "st"
    argv = ["--input", str(root / "in" / "s1.tar"), f"{root}/in/./s1.tar", "--output", str(out),
            "--teacher", IMAGE_TEACHER, "--image-resize", "8", "--image-crop", "8", "--top-k", "3",
            "--format", "webdataset", "--max-error-rate", "0.9", "--progress-interval", "5"]
    return root, out, argv, img


def test_every_member_is_accounted_for_once(hostile, capsys):
    root, out, argv, _ = hostile
    rc = pseudo_label(argv)
    text = capsys.readouterr().out
    assert rc == 0
    s = _summary(text)
    # the same file under two spellings is one input, said so
    assert "given 2 times" in text and s["shards_done"] == 1 and s["shards_total"] == 1
    r = SoftTargetRun(str(out))
    (name,) = r.shard_names
    keys = r.read_table(name).column("key").to_pylist()
    assert sorted(keys) == sorted(["a", "b", "c", "v1.2/d", "../../e"])
    reasons = sorted((e["key"], e["reason"]) for e in r.errors().to_pylist())
    assert reasons == [("bomb", "image_too_large"), ("c", "duplicate_key"), ("hard", "link_member"),
                       ("sym", "link_member")]
    assert s["errors_by_reason"] == {"duplicate_key": 1, "image_too_large": 1, "link_member": 2}
    # the dotted and the hostile key are escaped in the output tar; no member climbs out
    with tarfile.open(out / "shards" / f"{name}.tar") as tar:
        names = tar.getnames()
    assert "v1%2E2/d.ids.npy" in names and "%2E%2E/%2E%2E/e.ids.npy" in names
    assert not [n for n in names if n.startswith("/") or ".." in n.split("/")]
    # c's soft targets are those of its first copy: the same as a's? no: c's own image
    import torch

    from pipeline.models.spec import build_model, parse_spec
    from pipeline.modalities import preprocessing_from_dict
    from pipeline.modalities.frontends import make_frontend
    from pipeline.modalities.image import prepare_image
    from tests.helpers import image_bytes as enc

    prep = preprocessing_from_dict(r.manifest.preprocessing)
    model = build_model(parse_spec(IMAGE_TEACHER)).eval()
    cols = r.read_numpy(name)
    i = list(cols["key"]).index("c")
    with torch.inference_mode():
        x, _ = make_frontend(prep)(torch.from_numpy(prepare_image(enc(hostile[3]["c"]), prep))[None])
        want = torch.log_softmax(model(x), -1)[0]
    assert int(cols["ids"][i][0]) == int(want.argmax())
    assert abs(float(cols["logprobs"][i][0]) - float(want.max())) < 2e-3

    # a rerun naming the input another way recognises it: a cache hit, nothing recomputed
    again = [a if not a.endswith("s1.tar") else f"{root}/in/../in/s1.tar" for a in argv[:3]]
    rc = pseudo_label(["--input", again[1], *argv[3:]])
    s2 = _summary(capsys.readouterr().out)
    assert rc == 0 and s2["cache_hit"] and s2["shards_skipped"] == 1 and s2["shards_total"] == 1


def test_student_and_evaluation_apply_the_same_rule(hostile, tmp_path, capsys):
    """The student pairs the same shard under the same duplicate / link rules (no PairingError),
    through the tasks its driver plans, and evaluation against the run agrees."""
    root, out, _, _ = hostile
    if not (out / "manifest.json").exists():
        pytest.skip("needs the hostile run")
    from pipeline.student.data import ShardRows
    from pipeline.student.job import build_parser, plan

    student = "pipeline.models.zoo:image_cnn?width=2&num_classes=5"
    setup = plan(build_parser().parse_args(["--soft-targets", str(out), "--student", student,
                                            "--output", str(tmp_path / "o")]))
    sp, cache = setup.plan, setup.cache
    rows = ShardRows(sp.data, cache.uri, cache.facts)
    (task,) = setup.tasks
    keys = [k for t in rows({c: [v] for c, v in task.to_row().items()})
            for k in t.column("key").to_pylist()]
    assert sorted(keys) == sorted(["a", "b", "c", "v1.2/d", "../../e"])  # the first c, nothing else
    from pipeline.models.spec import build_model, parse_spec, save_checkpoint

    save_checkpoint(str(tmp_path / "ck"), build_model(parse_spec(student)), "pipeline.models.zoo:image_cnn",
                    {"width": 2, "num_classes": 5}, sp.checkpoint_config())
    assert evaluate_job.run(["--checkpoint", str(tmp_path / "ck"), "--input", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == 5


def test_damaged_runs_are_recomputed_and_refused_before_training(tmp_path, ray_local, capsys):
    audio_corpus(tmp_path / "in", shards=3, per_shard=3, seed=81, labels=False)
    out = tmp_path / "st"
    argv = ["--input", str(tmp_path / "in"), "--output", str(out), "--teacher", AUDIO_TEACHER, "--top-k", "3",
            "--progress-interval", "5"]
    assert pseudo_label(argv) == 0
    capsys.readouterr()
    good = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    # truncate one shard, delete another's errors file
    s0 = out / "shards" / "shard-0000.parquet"
    s0.write_bytes(s0.read_bytes()[:-50])
    (out / "errors" / "shard-0001.parquet").unlink()
    rc = pseudo_label(argv)
    text = capsys.readouterr().out
    s = _summary(text)
    assert rc == 0 and not s["cache_hit"] and s["shards_recomputed_damaged"] == 2 and s["shards_skipped"] == 1
    assert "shard-0000 is damaged" in text and "shard-0001 is damaged" in text
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == good  # same bytes as before
    assert (out / "errors" / "shard-0001.parquet").exists()

    # an edited checksum (same size) passes the cheap check, is caught by --verify
    idx = out / json.loads((out / "manifest.json").read_text())["commits"]["index"]
    lines = [json.loads(x) for x in idx.read_text().splitlines()]
    for d in lines:
        if d["name"] == "shard-0002":
            d["sha256"] = "0" * 64
    idx.write_text("".join(json.dumps(d) + "\n" for d in lines))
    assert pseudo_label(argv) == 0 and _summary(capsys.readouterr().out)["cache_hit"]
    # the student's driver checks sizes only: it starts, and the data task's checksum check
    # stops it with one line, no retries (a damaged cache does not heal)
    student = ["--soft-targets", str(out), "--student", "pipeline.models.zoo:audio_cnn?width=4&depth=2",
               "--output", str(tmp_path / "student"), "--epochs", "1", "--workers", "1", "--max-failures", "2"]
    assert train(student) == 1
    err = capsys.readouterr().err
    lines_err = [ln for ln in err.splitlines() if ln.startswith("[train] error:")]
    assert len(lines_err) == 1 and "checksum mismatch" in lines_err[0] and "shard-0002" in lines_err[0]
    rc = pseudo_label(argv + ["--verify"])
    s = _summary(capsys.readouterr().out)
    assert rc == 0 and s["shards_recomputed_damaged"] == 1 and s["shards_done"] == 1
    assert (out / "shards" / "shard-0002.parquet").read_bytes() == good["shard-0002.parquet"]

    # a shard cut short is refused by train_student before any worker starts
    s1 = out / "shards" / "shard-0001.parquet"
    s1.write_bytes(s1.read_bytes()[:100])
    with pytest.raises(SystemExit) as e:
        train(student)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "shard-0001" in err and "100 bytes" in err and "rerun pseudo_label.py" in err


def _hostile_checkpoint(path, marker) -> str:
    """A checkpoint directory whose config.json names os:system with a command as its kwargs."""
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"w": __import__("torch").zeros(1)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "format": "kdpipe.checkpoint/1", "model": {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}},
        "num_classes": 10, "modality": "audio", "level": "utterance",
        "preprocessing": {"modality": "audio", "sample_rate": 16000}}))
    return str(path)


def test_a_checkpoint_cannot_choose_code(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    ck = _hostile_checkpoint(tmp_path / "ck", marker)
    audio_corpus(tmp_path / "in", shards=1, per_shard=2)
    jobs = [
        (pseudo_label, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "st"), "--teacher", ck]),
        (train, ["--labeled", str(tmp_path / "in"), "--student", ck, "--output", str(tmp_path / "o")]),
        (evaluate_job.run, ["--checkpoint", ck, "--input", str(tmp_path / "in")]),
    ]
    for job, argv in jobs:
        with pytest.raises(SystemExit) as e:
            job(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "'os:system'" in err and "cannot choose code" in err and "--trust-module os" in err
    assert not marker.exists()
    assert not (tmp_path / "st").exists() and not (tmp_path / "o").exists()

    # a factory of kdpipe's own modules that is not a model factory is refused too
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model"] = {"factory": "pipeline.models.spec:save_checkpoint", "kwargs": {}}
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        evaluate_job.run(["--checkpoint", ck, "--input", str(tmp_path / "in")])
    assert "not one of kdpipe's model factories" in capsys.readouterr().err

    # a user's own module: refused from a checkpoint unless trusted explicitly
    from pipeline.models.spec import SpecError, build_model, parse_spec, save_checkpoint

    model = build_model(parse_spec("tests.teacher_models:slow_audio_cnn?delay=0&width=8"))
    save_checkpoint(str(tmp_path / "mine"), model, "tests.teacher_models:slow_audio_cnn", {"delay": 0, "width": 8},
                    {"num_classes": 10, "modality": "audio", "level": "utterance",
                     "preprocessing": {"modality": "audio", "sample_rate": 16000}})
    with pytest.raises(SpecError, match="--trust-module tests.teacher_models"):
        parse_spec(str(tmp_path / "mine"))
    assert parse_spec(str(tmp_path / "mine"), trust=["tests"]).factory == "tests.teacher_models:slow_audio_cnn"


def test_errors_are_one_line_before_ray_starts(tmp_path, s3_bucket, capsys, monkeypatch):
    from pipeline.models.zoo import audio_cnn

    def refused(argv) -> str:
        with pytest.raises(SystemExit) as e:
            pseudo_label([str(a) for a in argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    audio_corpus(tmp_path / "in", shards=1, per_shard=2)
    base = ["--output", tmp_path / "o", "--teacher", AUDIO_TEACHER]
    # a Parquet input whose data column is text
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["a"], "audio": ["not bytes"]}), tmp_path / "text.parquet")
    msg = refused(["--input", tmp_path / "text.parquet", "--data-column", "audio", *base])
    assert "text.parquet" in msg and "'audio'" in msg and "string" in msg
    # --config values are type-checked like flags
    for body, words in (("top_k: [3]\n", "top_k: expected one value"), ("batch_size: 2.5\n", "invalid int value"),
                        ("input: 5\n", "'5' (from '5') does not exist")):
        (tmp_path / "c.yaml").write_text(body)
        argv = ["--config", tmp_path / "c.yaml"] + ([] if body.startswith("input") else ["--input", tmp_path / "in"])
        msg = refused(argv + base)
        assert words in msg and ("c.yaml" in msg or "input" in body)
    # weights on s3:// inside a factory spec work (the spec is not mistaken for a URL)
    import s3fs
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in audio_cnn(width=8).state_dict().items()}, str(tmp_path / "w.safetensors"))
    s3fs.S3FileSystem().put_file(str(tmp_path / "w.safetensors"), f"{s3_bucket}/w.safetensors")
    from pipeline.models.spec import build_model, parse_spec

    spec = parse_spec(f"{AUDIO_TEACHER}&weights=s3://{s3_bucket}/w.safetensors")
    assert spec.kind == "factory" and build_model(spec) is not None
    # an unreachable S3 endpoint: one line naming the URI (a new process would read the
    # variables afresh; here the cached filesystem objects are dropped instead)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        msg = refused(["--input", "s3://nowhere/corpus/", *base])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert "s3://nowhere/corpus/" in msg and "cannot list" in msg and "EndpointConnectionError" in msg
    assert not (tmp_path / "o").exists()
