"""jobs/pseudo_label.py with ecosystem teachers (hf:, timm:, torchvision:, onnx:) on local Ray.

Each run's stored top-k log-probabilities are compared with what the test computes itself
with the library's own processor / transforms and model, on the same clips and images decoded
the usual way (soundfile, PIL, torchvision.io). Tolerance: the stored values are float16, so a
stored log-prob may be off by half an ulp, |lp| * 2^-11; 2e-4 more covers float32 rounding
between a padded batch on the actor and one clip at a time here (measured: ~1e-6).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from pipeline.shards import SoftTargetRun  # noqa: E402
from pipeline.teacher.job import run as pseudo_label  # noqa: E402
from tests import external_models as em  # noqa: E402
from tests.helpers import audio_corpus, flac_bytes, hf_parquet, image_bytes, tone, write_tar  # noqa: E402


def _run(argv, capsys):
    rc = pseudo_label([str(a) for a in argv] + ["--progress-interval", "2"])
    out = capsys.readouterr().out
    summary = json.loads([ln for ln in out.splitlines() if ln.startswith('{"summary"')][-1])["summary"]
    return rc, summary


def _rows(run_dir):
    r = SoftTargetRun(str(run_dir))
    return r, {name: r.read_numpy(name) for name in r.shard_names}


def assert_stored(ids: np.ndarray, logprobs: np.ndarray, reference: torch.Tensor) -> None:
    """Stored top-k (ids (..., k), float16 log-probs) against a full reference log-softmax (..., C):
    equal at the stored ids within |lp| * 2^-11 + 2e-4, and no other class above the k-th."""
    ref = reference.double().numpy()
    ids = ids.astype(np.int64)
    at = np.take_along_axis(ref, ids, axis=-1)
    got = logprobs.astype(np.float64)
    assert (np.abs(at - got) <= np.abs(at) * 2.0 ** -11 + 2e-4).all(), np.abs(at - got).max()
    others = ref.copy()
    np.put_along_axis(others, ids, -np.inf, axis=-1)
    assert (others.max(-1) <= at[..., -1] + 2e-4).all()


def _hf_reference(path):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    model = getattr(transformers, cfg.architectures[0]).from_pretrained(path, local_files_only=True).eval()
    return model


def test_hf_audio_classifier_on_datasets_parquet_then_student(tmp_path, ray_local, capsys):
    """hf: utterance level over an HF-layout Parquet corpus (no key column), then a student
    trained from that cache, reading the same Parquet corpus."""
    import transformers

    from pipeline.student.job import run as train
    from pipeline.student.train import read_metrics

    teacher = em.save_wav2vec2_classifier(tmp_path / "w2v2")
    rng = np.random.default_rng(21)
    clips = {}
    (tmp_path / "corpus").mkdir()
    for s in range(2):
        name = f"train-{s:05d}-of-00002"
        flacs = [flac_bytes(tone(rng, rng.uniform(0.4, 1.1))) for _ in range(6)]
        hf_parquet(tmp_path / "corpus" / f"{name}.parquet", "audio", [(f"{name}-{i}.flac", b) for i, b in enumerate(flacs)])
        clips.update({f"{name}/{i:06d}": b for i, b in enumerate(flacs)})
    st = tmp_path / "st"
    rc, summary = _run(["--input", tmp_path / "corpus", "--output", st, "--teacher", f"hf:{teacher}",
                        "--data-column", "audio", "--top-k", "4", "--batch-size", "4"], capsys)
    assert rc == 0 and summary["samples"] == 12 and summary["errors"] == 0
    r, cols = _rows(st)
    m = r.manifest
    assert (m.modality, m.level, m.num_classes, m.k) == ("audio", "utterance", 6, 4)
    assert m.class_names == em.LABELS  # id2label
    assert m.preprocessing["features"] == "none" and m.preprocessing["sample_rate"] == 16000
    (ident,) = m.teacher["identities"]
    assert (ident["kind"], ident["architecture"]) == ("hf", "Wav2Vec2ForSequenceClassification")
    assert m.teacher["specs"] == [f"hf:{teacher}"]
    model = _hf_reference(teacher)
    fe = transformers.AutoFeatureExtractor.from_pretrained(teacher)
    keys = [k for c in cols.values() for k in c["key"]]
    assert sorted(keys) == sorted(clips)  # stable ids "SHARD/ROW", every row once
    with torch.no_grad():
        for c in cols.values():
            for i, key in enumerate(c["key"]):
                wave, sr = sf.read(io.BytesIO(clips[key]), dtype="float32")
                ref = torch.log_softmax(model(**fe(wave, sampling_rate=sr, return_tensors="pt")).logits[0], -1)
                assert_stored(c["ids"][i], c["logprobs"][i], ref)
                assert int(c["argmax"][i]) == int(ref.argmax())

    # A student from the hf: teacher's cache; it reads the same HF-layout Parquet inputs (the
    # same stable keys) and computes its own log-mel features (--features overrides the cache's).
    out = tmp_path / "student"
    argv = ["--soft-targets", str(st), "--student", "pipeline.models.zoo:audio_cnn?width=4&depth=2&num_classes=6",
            "--features", "logmel", "--output", str(out), "--epochs", "4", "--alpha", "0", "--workers", "1",
            "--cpus-per-worker", "0.5", "--batch-size", "4", "--lr", "0.02", "--shuffle-buffer", "0"]
    assert train(argv) == 0
    capsys.readouterr()
    history = read_metrics(str(out))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and all(h["samples"] == 12 for h in history)
    assert history[-1]["kd"] < history[0]["kd"]  # it learns the teacher's targets
    final = json.loads((out / "final" / "config.json").read_text())
    assert final["softtargets_fingerprint"] == m.fingerprint and final["class_names"] == em.LABELS
    assert final["preprocessing"]["features"] == "logmel" and final["preprocessing"]["sample_rate"] == 16000


def test_hf_ctc_frames_chunked_alone_and_with_a_kdpipe_checkpoint(tmp_path, ray_local, capsys):
    """hf: frame level (CTC, 20 ms) with --chunk-seconds, then ensembled with a kdpipe
    checkpoint of the same frame rate: chunk offsets in the keys, values per frame."""
    import transformers

    from pipeline.modalities import AudioPreprocessing
    from pipeline.models.spec import build_model, parse_spec, save_checkpoint
    from pipeline.models.zoo import wav2vec2_frames

    ctc = em.save_wav2vec2_ctc(tmp_path / "ctc")
    waves = audio_corpus(tmp_path / "in", shards=1, per_shard=3, seed=22, seconds=(2.3, 2.9), labels=False)
    torch.manual_seed(3)
    kd = wav2vec2_frames(num_classes=12, conv_dim=16, embed_dim=16, encoder_layers=1, heads=2, ffn=32,
                         pos_conv_kernel=8, pos_conv_groups=2, dropout=0.0)
    torch.nn.init.normal_(kd.model.aux.weight, std=0.5)
    ckpt = tmp_path / "kd_ckpt"
    kwargs = dict(num_classes=12, conv_dim=16, embed_dim=16, encoder_layers=1, heads=2, ffn=32, pos_conv_kernel=8,
                  pos_conv_groups=2, dropout=0.0)
    save_checkpoint(str(ckpt), kd, "pipeline.models.zoo:wav2vec2_frames", kwargs, {
        "modality": "audio", "level": "frame", "num_classes": 12, "frame_shift_ms": 20.0, "class_names": None,
        "preprocessing": AudioPreprocessing(features="none").to_dict()})
    model = _hf_reference(ctc)
    fe = transformers.AutoFeatureExtractor.from_pretrained(ctc)
    member = build_model(parse_spec(str(ckpt))).eval()

    def chunk_of(key):
        base, span = key.split("@")
        lo, hi = map(int, span.split("-"))
        return waves[base][lo:hi]

    for ensemble in (False, True):
        out = tmp_path / ("ens" if ensemble else "ctc_st")
        argv = ["--input", tmp_path / "in", "--output", out, "--teacher", f"hf:{ctc}", "--top-k", "3",
                "--chunk-seconds", "1.0", "--batch-size", "4"] + (["--teacher", ckpt] if ensemble else [])
        rc, summary = _run(argv, capsys)
        assert rc == 0
        r, cols = _rows(out)
        m = r.manifest
        assert (m.level, m.frame_shift_ms, m.num_classes) == ("frame", 20.0, 12)
        assert m.class_names[:2] == ["<pad>", "|"]
        assert [i["kind"] for i in m.teacher["identities"]] == (["hf", "module"] if ensemble else ["hf"])
        c = cols["shard-0000"]
        assert len(c["key"]) == 9 == summary["samples"]  # 2.3-2.9 s in 1 s windows: 3 chunks per clip
        with torch.no_grad():
            for i, key in enumerate(c["key"]):
                chunk = chunk_of(key)
                ref = torch.log_softmax(model(**fe(chunk, sampling_rate=16000, return_tensors="pt")).logits[0], -1)
                if ensemble:
                    other = torch.log_softmax(member(torch.from_numpy(chunk)[None], torch.tensor([len(chunk)]))[0], -1)
                    assert other.shape == ref.shape  # the same frames: 320 samples each
                    ref = torch.log((ref.double().exp() + other.double().exp()) / 2)
                    assert float(c["logsumexp"][c["offsets"][i]]) == 0.0
                assert int(c["num_frames"][i]) == ref.shape[0]
                sl = slice(c["offsets"][i], c["offsets"][i + 1])
                assert_stored(c["ids"][sl], c["logprobs"][sl], ref)


def test_image_teachers_hf_torchvision_timm_and_onnx(tmp_path, ray_local, capsys):
    """hf: ViT over HF-layout image Parquet (--key-column), torchvision: alone, and an ensemble
    of timm: with onnx: whose preprocessing comes from flags."""
    import timm
    import torchvision
    import transformers
    from PIL import Image

    rng = np.random.default_rng(23)
    pngs = {f"im{i}": image_bytes(em.smooth_image(rng, int(rng.integers(170, 260)), int(rng.integers(170, 260))), "PNG")
            for i in range(6)}
    jpgs = {k: image_bytes(np.asarray(Image.open(io.BytesIO(v)).convert("RGB")), "JPEG") for k, v in pngs.items()}

    def pil(data):
        return Image.open(io.BytesIO(data)).convert("RGB")

    # 1. hf: ViT, HF-layout Parquet with a key column
    vit = em.save_vit(tmp_path / "vit")
    (tmp_path / "pq").mkdir()
    hf_parquet(tmp_path / "pq" / "test-00000-of-00001.parquet", "image", [(f"{k}.jpg", v) for k, v in jpgs.items()],
               feature="Image", extra={"image_id": list(jpgs)})
    rc, _ = _run(["--input", tmp_path / "pq", "--output", tmp_path / "st_vit", "--teacher", f"hf:{vit}",
                  "--key-column", "image_id", "--data-column", "image", "--top-k", "3"], capsys)
    assert rc == 0
    r, cols = _rows(tmp_path / "st_vit")
    assert r.manifest.class_names == em.LABELS and r.manifest.preprocessing["backend"] == "torchvision-v2"
    model, ip = _hf_reference(vit), transformers.AutoImageProcessor.from_pretrained(vit)
    (c,) = cols.values()
    assert sorted(c["key"]) == sorted(jpgs)
    with torch.no_grad():
        for i, key in enumerate(c["key"]):
            ref = torch.log_softmax(model(**ip(images=pil(jpgs[key]), return_tensors="pt")).logits[0], -1)
            assert_stored(c["ids"][i], c["logprobs"][i], ref)

    # 2. torchvision: with a weights-only state_dict; its weights' transforms on decoded tensors
    tv = em.torchvision_model("mobilenet_v3_small")
    w_tv = em.save_state_dict(tv, tmp_path / "mnv3.pth", fmt="torch")
    (tmp_path / "tar").mkdir()
    write_tar(tmp_path / "tar" / "shard-0000.tar", [(k, {"png": v}) for k, v in pngs.items()])
    rc, _ = _run(["--input", tmp_path / "tar", "--output", tmp_path / "st_tv", "--teacher",
                  f"torchvision:mobilenet_v3_small?weights={w_tv}", "--top-k", "3"], capsys)
    assert rc == 0
    r, cols = _rows(tmp_path / "st_tv")
    assert (r.manifest.preprocessing["resize"], r.manifest.preprocessing["crop"]) == (256, 224)
    transform = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.transforms()
    c = cols["shard-0000"]
    with torch.no_grad():
        for i, key in enumerate(c["key"]):
            x = transform(torchvision.io.decode_image(torch.frombuffer(bytearray(pngs[key]), dtype=torch.uint8)))
            assert_stored(c["ids"][i], c["logprobs"][i], torch.log_softmax(tv(x[None])[0], -1))

    # 3. timm: + onnx: ensemble; the ONNX graph's preprocessing from flags (timm's, spelled out)
    tm = em.timm_model("test_vit")
    w_timm = em.save_state_dict(tm, tmp_path / "vit.safetensors")
    torch.manual_seed(4)
    small = em.TinyImageNet().eval()
    onnx_path = str(tmp_path / "small.onnx")
    torch.onnx.export(small, (torch.randn(2, 3, 160, 160),), onnx_path, input_names=["x"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    flags = ["--image-resize", "168", "--image-crop", "160", "--image-resize-mode", "shortest_edge", "--image-resample",
             "bicubic", "--image-crop-offset", "round", "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.5", "0.5",
             "0.5"]
    rc, _ = _run(["--input", tmp_path / "tar", "--output", tmp_path / "st_ens", "--teacher",
                  f"timm:test_vit?weights={w_timm}", "--teacher", f"onnx:{onnx_path}", "--top-k", "4"] + flags, capsys)
    assert rc == 0
    r, cols = _rows(tmp_path / "st_ens")
    assert [i["kind"] for i in r.manifest.teacher["identities"]] == ["timm", "onnx"]
    t_timm = timm.data.create_transform(**timm.data.resolve_model_data_config(tm), is_training=False)
    c = cols["shard-0000"]
    with torch.no_grad():
        for i, key in enumerate(c["key"]):
            x = t_timm(pil(pngs[key]))[None]
            mix = (torch.softmax(tm(x)[0].double(), -1) + torch.softmax(small(x)[0].double(), -1)) / 2
            assert_stored(c["ids"][i], c["logprobs"][i], torch.log(mix))
