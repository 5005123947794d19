"""External teachers (hf:, timm:, torchvision:, onnx:) against their own libraries, no Ray.

Every model is tiny and random-initialised from its library's config class, saved the way a
user saves it (tests/external_models.py). The reference is always the library's own processor
/ transforms and model, one clip or image at a time; kdpipe's side is its decode + frontend +
adapter on a padded batch. Tolerance: 1e-4 on log-probabilities (float32 rounding; measured
differences are ~1e-6).
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from pipeline.models.spec import SpecError, absolute_spec, build_model, describe_model, identity, parse_spec  # noqa: E402
from pipeline.modalities import preprocessing_from_dict  # noqa: E402
from pipeline.modalities.frontends import make_frontend  # noqa: E402
from pipeline.modalities.image import ImagePreprocessing, prepare_image  # noqa: E402
from tests import external_models as em  # noqa: E402
from tests.helpers import image_bytes, tone  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    return {
        "w2v2": em.save_wav2vec2_classifier(root / "w2v2"),
        "w2v2-group": em.save_wav2vec2_classifier(root / "w2v2-group", norm="group"),
        "hubert": em.save_hubert_classifier(root / "hubert"),
        "ast": em.save_ast(root / "ast"),
        "whisper": em.save_whisper(root / "whisper"),
        "ctc": em.save_wav2vec2_ctc(root / "ctc"),
        "frames": em.save_wav2vec2_frame_classifier(root / "frames"),
        "vit": em.save_vit(root / "vit"),
        "convnext": em.save_convnext(root / "convnext"),
        "root": root,
    }


def _clips(seed=0, lengths=(9000, 16000, 12345)):
    rng = np.random.default_rng(seed)
    return [tone(rng, n / 16000) for n in lengths]


def _padded(waves):
    x = torch.zeros(len(waves), max(len(w) for w in waves))
    for i, w in enumerate(waves):
        x[i, : len(w)] = torch.from_numpy(w)
    return x, torch.tensor([len(w) for w in waves])


def _reference(path):
    """The library's own processor and model for an hf: directory."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    model = getattr(transformers, cfg.architectures[0]).from_pretrained(path, local_files_only=True).eval()
    return model


@pytest.mark.parametrize("name", ["w2v2", "w2v2-group", "hubert", "ast", "whisper"])
def test_hf_audio_classifiers_equal_processor_and_model(models, name):
    import transformers

    spec = parse_spec(f"hf:{models[name]}")
    teacher = build_model(spec).eval()
    info = describe_model(spec, teacher)
    assert (info["modality"], info["level"], info["num_classes"]) == ("audio", "utterance", 6)
    assert info["class_names"] == em.LABELS
    assert info["preprocessing"] == {"modality": "audio", "sample_rate": 16000, "features": "none", "n_mels": 40,
                                     "win_ms": 25.0, "hop_ms": 10.0, "chunk_seconds": None, "crop_seconds": None}
    # group-norm feature encoders see the padding: they must run on equal-length groups
    assert teacher.padded == (name not in ("w2v2-group", "hubert"))
    ref, fe = _reference(models[name]), transformers.AutoFeatureExtractor.from_pretrained(models[name])
    waves = _clips(lengths=(9000, 16000, 12345, 9000))
    x, lengths = _padded(waves)
    with torch.no_grad():
        got = torch.log_softmax(teacher(x, lengths), -1)
        for i, w in enumerate(waves):
            want = torch.log_softmax(ref(**fe(w, sampling_rate=16000, return_tensors="pt")).logits[0], -1)
            assert (got[i] - want).abs().max() < TOL, (name, i, (got[i] - want).abs().max())
            assert float(want.exp().max()) > 0.3  # classes well apart: the comparison means something


@pytest.mark.parametrize("name", ["ctc", "frames"])
def test_hf_frame_level_lengths_and_classes(models, name):
    """AutoModelForCTC and AutoModelForAudioFrameClassification: (B, T', C) at 20 ms frames."""
    import transformers

    spec = parse_spec(f"hf:{models[name]}")
    teacher = build_model(spec).eval()
    info = describe_model(spec, teacher)
    classes = 12 if name == "ctc" else 6
    assert (info["level"], info["frame_shift_ms"], info["num_classes"]) == ("frame", 20.0, classes)  # 320 samples
    if name == "ctc":
        assert info["class_names"][:3] == ["<pad>", "|", "a"]  # vocab.json: a CTC head's classes are its tokens
    else:
        assert info["class_names"] == em.LABELS
    ref, fe = _reference(models[name]), transformers.AutoFeatureExtractor.from_pretrained(models[name])
    waves = _clips(seed=1)
    x, lengths = _padded(waves)
    with torch.no_grad():
        got = torch.log_softmax(teacher(x, lengths), -1)  # (B, T'max, C)
        frames = teacher.output_lengths(lengths)
        for i, w in enumerate(waves):
            want = torch.log_softmax(ref(**fe(w, sampling_rate=16000, return_tensors="pt")).logits[0], -1)  # (T', C)
            assert int(frames[i]) == want.shape[0]
            assert (got[i, : want.shape[0]] - want).abs().max() < TOL


@pytest.mark.parametrize("name", ["vit", "convnext"])
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_hf_image_classifiers_equal_processor_and_model(models, name, backend):
    import transformers
    from PIL import Image

    text = f"hf:{models[name]}" + ("?image_backend=pil" if backend == "pil" else "")
    spec = parse_spec(text)
    teacher = build_model(spec).eval()
    info = describe_model(spec, teacher)
    prep = info["preprocessing"]
    expect = {"vit": {"resize": 32, "crop": 32, "resize_mode": "exact"},  # size {"height", "width"}, bilinear
              "convnext": {"resize": 36, "crop": 32, "resize_mode": "shortest_edge", "resample": "bicubic"}}[name]
    assert {k: prep[k] for k in expect} == expect  # convnext: int(32 / 0.875) = 36, then crop 32
    assert prep.get("backend", "pil") == ("torchvision-v2" if backend == "torchvision" else "pil")
    assert info["class_names"] == em.LABELS
    ip = transformers.AutoImageProcessor.from_pretrained(models[name], backend=backend)
    ref = _reference(models[name])
    p = preprocessing_from_dict(prep)
    frontend = make_frontend(p)
    rng = np.random.default_rng(2)
    for h, w in ((40, 48), (57, 31), (33, 33), (121, 75)):
        for fmt in ("PNG", "JPEG"):
            data = image_bytes(em.smooth_image(rng, h, w), fmt)
            x, _ = frontend(torch.from_numpy(prepare_image(data, p))[None])
            pv = ip(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"]
            assert x.shape == pv.shape and (x - pv).abs().max() < 1e-5  # the same uint8 crop, the same normalisation
            with torch.no_grad():
                got, want = torch.log_softmax(teacher(x), -1), torch.log_softmax(ref(pixel_values=pv).logits, -1)
            assert (got - want).abs().max() < TOL


def test_timm_and_torchvision_equal_their_transforms(tmp_path):
    import timm
    import torchvision
    from PIL import Image

    tm = em.timm_model("test_vit")
    tv = em.torchvision_model("mobilenet_v3_small")
    w_timm = em.save_state_dict(tm, tmp_path / "vit.safetensors")
    w_tv = em.save_state_dict(tv, tmp_path / "mnv3.pth", fmt="torch")  # weights-only torch.save
    t_timm = timm.data.create_transform(**timm.data.resolve_model_data_config(tm), is_training=False)
    t_tv = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.transforms()
    cases = [
        (f"timm:test_vit?weights={w_timm}", tm, lambda data: t_timm(Image.open(io.BytesIO(data)).convert("RGB")),
         {"resize": 168, "crop": 160, "resize_mode": "shortest_edge", "resample": "bicubic", "crop_offset": "round"}),
        (f"torchvision:mobilenet_v3_small?weights={w_tv}", tv,
         lambda data: t_tv(torchvision.io.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8))),
         {"resize": 256, "crop": 224, "resize_mode": "shortest_edge", "crop_offset": "round",
          "backend": "torchvision-v1"}),
    ]
    rng = np.random.default_rng(3)
    images = [image_bytes(em.smooth_image(rng, h, w), "PNG") for h, w in ((181, 200), (171, 240), (233, 181))]
    for text, ref, transform, expect in cases:
        spec = parse_spec(text)
        teacher = build_model(spec).eval()
        info = describe_model(spec, teacher)
        assert {k: info["preprocessing"][k] for k in expect} == expect and info["num_classes"] == 6
        p = preprocessing_from_dict(info["preprocessing"])
        frontend = make_frontend(p)
        for data in images:
            x, _ = frontend(torch.from_numpy(prepare_image(data, p))[None])
            want_x = transform(data)[None]
            assert x.shape == want_x.shape and (x - want_x).abs().max() < 1e-5
            with torch.no_grad():
                assert (torch.log_softmax(teacher(x), -1) - torch.log_softmax(ref(want_x), -1)).abs().max() < TOL
        ident = identity(spec)
        assert ident["kind"] == spec.kind and len(ident["weights_sha256"]) == 64
    # num_classes comes from the file's classifier; a wrong architecture is refused with the file named
    with pytest.raises(SpecError, match="weights do not fit"):
        build_model(parse_spec(f"timm:test_vit?weights={w_timm}&num_classes=3"))
    with pytest.raises(SpecError, match="cannot find the classifier"):
        build_model(parse_spec(f"timm:test_efficientnet?weights={w_timm}"))
    with pytest.raises(SpecError, match="needs a local weights file"):
        parse_spec("timm:test_vit")


def test_onnx_names_shapes_lengths_and_external_data(tmp_path):
    import onnx

    torch.manual_seed(0)
    img = em.TinyImageNet()
    batch = torch.export.Dim("batch")
    path = str(tmp_path / "img.onnx")  # the default (dynamo) exporter: weights go to img.onnx.data
    torch.onnx.export(img.eval(), (torch.randn(2, 3, 32, 32),), path, input_names=["pixels"], output_names=["logits"],
                      dynamic_shapes=({0: batch},))
    assert os.path.exists(path + ".data")
    spec = parse_spec(f"onnx:{path}")
    teacher = build_model(spec)
    info = describe_model(spec, teacher)
    assert (teacher.x_name, teacher.y_name) == ("pixels", "logits")
    assert (info["modality"], info["level"], info["num_classes"], info["preprocessing"]) == ("image", "utterance", 6, None)
    x = torch.randn(5, 3, 32, 32)
    assert (teacher(x) - img(x)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="fixed size 32"):
        teacher(torch.randn(1, 3, 28, 28))
    ident = identity(spec)
    (tmp_path / "img.onnx.data").write_bytes((tmp_path / "img.onnx.data").read_bytes()[::-1])
    assert identity(spec) != ident  # the external weights are part of the digest

    class WithFrames(torch.nn.Module):  # raw waveform + lengths in, logits + valid frames out
        def __init__(self):
            super().__init__()
            self.net = em.TinyFrameNet()

        def forward(self, wave, lengths):
            return self.net(wave, lengths), torch.div(lengths - 400, 160, rounding_mode="floor") + 1

    net = WithFrames().eval()
    apath = str(tmp_path / "frames.onnx")
    torch.onnx.export(net, (torch.randn(2, 16000), torch.tensor([16000, 9000])), apath, dynamo=False,
                      input_names=["wave", "lengths"], output_names=["logits", "frames"],
                      dynamic_axes={"wave": {0: "b", 1: "n"}, "lengths": {0: "b"}, "logits": {0: "b", 1: "t"},
                                    "frames": {0: "b"}})
    m = onnx.load(apath)
    for k, v in {"frame_shift_ms": "10.0", "class_names": json.dumps(list("abcdefg"))}.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, apath)
    spec = parse_spec(f"onnx:{apath}")
    teacher = build_model(spec)
    info = describe_model(spec, teacher)
    assert (info["modality"], info["level"], info["frame_shift_ms"], info["class_names"]) == \
        ("audio", "frame", 10.0, list("abcdefg"))
    wave, lengths = _padded(_clips(seed=4))
    got = teacher(wave, lengths)
    want, frames = net(wave, lengths)
    assert (got - want).abs().max() < 1e-5
    assert teacher.output_lengths(lengths).tolist() == frames.tolist()
    with pytest.raises(ValueError, match="--features none"):
        teacher(torch.randn(2, 50, 40), torch.tensor([50, 50]))


def test_identity_covers_weights_and_config_not_paths(models, tmp_path):
    a = parse_spec(f"hf:{models['vit']}")
    moved = shutil.copytree(models["vit"], tmp_path / "elsewhere")
    b = parse_spec(f"hf:{moved}")
    assert identity(a) == identity(b)  # the same model in another place: the same fingerprint
    ident = identity(a)
    assert (ident["kind"], ident["architecture"], ident["task"]) == ("hf", "ViTForImageClassification",
                                                                     "image-classification")
    with_backend = parse_spec(f"hf:{models['vit']}?image_backend=pil")
    assert identity(with_backend) != ident and "image_backend" in with_backend.describe()
    cfg = json.loads((moved / "config.json").read_text())
    cfg["id2label"]["0"] = "renamed"
    (moved / "config.json").write_text(json.dumps(cfg))
    assert identity(b)["config_sha256"] != ident["config_sha256"]
    from safetensors.torch import load_file, save_file

    state = load_file(str(moved / "model.safetensors"))
    state["classifier.bias"] = state["classifier.bias"] + 1
    save_file(state, str(moved / "model.safetensors"))
    assert identity(b)["weights_sha256"] != ident["weights_sha256"]
    # absolute_spec makes the path absolute (Ray Train workers run elsewhere) and keeps options
    rel = os.path.relpath(models["vit"])
    assert absolute_spec(f"hf:{rel}?image_backend=pil") == f"hf:{os.path.abspath(rel)}?image_backend=pil"


def test_hf_loading_rules(models, tmp_path):
    """safetensors; pytorch_model.bin only through weights_only; no remote code; errors name the fix."""
    import transformers

    src = models["w2v2"]
    binary = tmp_path / "bin"
    shutil.copytree(src, binary)
    model = transformers.Wav2Vec2ForSequenceClassification.from_pretrained(src)
    os.remove(binary / "model.safetensors")
    torch.save(model.state_dict(), binary / "pytorch_model.bin")  # tensors only: weights_only loads it
    x, lengths = _padded(_clips(seed=5))
    with torch.no_grad():
        assert torch.allclose(build_model(parse_spec(f"hf:{binary}"))(x, lengths),
                              build_model(parse_spec(f"hf:{src}"))(x, lengths), atol=1e-6)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Payload()}, binary / "pytorch_model.bin")  # a pickle that runs code
    with pytest.raises(SpecError, match="cannot load"):
        build_model(parse_spec(f"hf:{binary}"))
    os.remove(binary / "pytorch_model.bin")
    with pytest.raises(SpecError, match="no model.safetensors"):
        build_model(parse_spec(f"hf:{binary}"))
    remote = tmp_path / "remote"
    shutil.copytree(src, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForAudioClassification": "modeling_evil.Evil"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="never runs code"):
        build_model(parse_spec(f"hf:{remote}"))
    with pytest.raises(SpecError, match="does not exist"):
        parse_spec(f"hf:{tmp_path / 'nope'}")
    no_proc = tmp_path / "noproc"
    shutil.copytree(src, no_proc)
    os.remove(no_proc / "preprocessor_config.json")
    with pytest.raises(SpecError, match="preprocessor_config.json"):
        build_model(parse_spec(f"hf:{no_proc}"))


def test_missing_extra_is_one_line(monkeypatch, tmp_path):
    import sys

    w = em.save_state_dict(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if kdpipe[vision] were not installed
    with pytest.raises(SpecError) as e:
        build_model(parse_spec(f"timm:resnet18?weights={w}"))
    assert "\n" not in str(e.value) and "pip install 'kdpipe[vision]'" in str(e.value)


def test_hf_model_from_s3(models, s3_bucket):
    from pipeline import storage

    uri = f"s3://{s3_bucket}/models/vit"
    storage.put_dir(models["vit"], uri)
    remote, local = build_model(parse_spec(f"hf:{uri}")).eval(), build_model(parse_spec(f"hf:{models['vit']}")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(remote(x), local(x))
    assert identity(parse_spec(f"hf:{uri}")) == identity(parse_spec(f"hf:{models['vit']}"))


def test_image_preprocessing_defaults_keep_old_dicts():
    old = {"modality": "image", "resize": 32, "crop": 28, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    p = preprocessing_from_dict(old)
    assert (p.resize_mode, p.resample, p.crop_offset, p.backend) == ("shorter", "bilinear", "floor", "pil")
    assert p.to_dict() == old  # so existing runs and checkpoints keep their fingerprints
    new = ImagePreprocessing(resize=36, crop=32, resize_mode="shortest_edge", resample="bicubic", crop_offset="round",
                             backend="torchvision-v2")
    assert preprocessing_from_dict(new.to_dict()) == new
    with pytest.raises(ValueError, match="resize_mode"):
        ImagePreprocessing(resize_mode="stretch")
    with pytest.raises(ValueError, match="needs backend 'pil'"):
        ImagePreprocessing(resample="lanczos", backend="torchvision-v2")
    # The three resize rules on a 50 x 30 (w x h) image, resize 32 / crop 32
    data = image_bytes(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    from pipeline.modalities.image import resized_size

    assert resized_size(44, 30, ImagePreprocessing()) == (47, 32)  # round(44 * 32 / 30 = 46.9)
    assert resized_size(44, 30, ImagePreprocessing(resize_mode="shortest_edge")) == (46, 32)  # int(46.9)
    assert resized_size(30, 44, ImagePreprocessing(resize_mode="shortest_edge")) == (32, 46)
    assert resized_size(44, 30, ImagePreprocessing(resize_mode="exact")) == (32, 32)
    assert prepare_image(data, ImagePreprocessing()).shape == (32, 32, 3)
