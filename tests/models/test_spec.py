"""Model specs: factory + weights (safetensors, weights-only state_dict), TorchScript, checkpoint dirs."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.spec import SpecError, build_model, describe_model, identity, parse_spec, save_checkpoint
from pipeline.models.zoo import audio_cnn

CNN = "pipeline.models.zoo:audio_cnn"


def _same(a, b):
    x, lengths = torch.randn(2, 50, 40), torch.tensor([50, 31])
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x, lengths), b(x, lengths))


def test_factory_with_kwargs_and_seeded_init():
    spec = parse_spec(CNN + "?width=8&level=frame&time_stride=2&dropout=0.0")
    assert spec.kind == "factory" and spec.kwargs == {"width": 8, "level": "frame", "time_stride": 2, "dropout": 0.0}
    a, b = build_model(spec), build_model(spec)
    assert _same(a, b)  # no weights: the same seeded random teacher every time
    assert describe_model(spec, a)["frame_shift_ms"] == 20.0
    same = parse_spec({"factory": CNN, "kwargs": {"width": 8, "level": "frame", "time_stride": 2, "dropout": 0.0}})
    assert identity(same) == identity(spec)


@pytest.mark.parametrize("kind", ["safetensors", "state_dict", "wrapped"])
def test_factory_with_weights(tmp_path, kind):
    model = audio_cnn(width=8)
    torch.nn.init.normal_(model.head.weight)
    state = model.state_dict()
    if kind == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        path = tmp_path / "w.pt"
        torch.save(state if kind == "state_dict" else {"state_dict": state, "epoch": 3}, path)
    spec = parse_spec(f"{CNN}?width=8&weights={path}")
    assert _same(build_model(spec), model)
    assert identity(spec)["weights_sha256"] and identity(spec) != identity(parse_spec(f"{CNN}?width=8"))


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(SpecError, match="weights-only"):
        build_model(parse_spec(f"{CNN}?width=8&weights={path}"))


def test_torchscript_and_checkpoint_dir(tmp_path):
    model = audio_cnn(width=8).eval()
    ts = tmp_path / "teacher.pt"
    torch.jit.save(torch.jit.script(model), str(ts))
    spec = parse_spec(str(ts))
    assert spec.kind == "torchscript" and _same(build_model(spec), model)
    assert identity(spec)["kind"] == "torchscript"

    ck = tmp_path / "ckpt"
    save_checkpoint(str(ck), model, CNN, {"width": 8}, {
        "modality": "audio", "level": "utterance", "num_classes": 10, "frame_shift_ms": None,
        "preprocessing": {"modality": "audio", "sample_rate": 16000}, "class_names": None})
    spec = parse_spec(str(ck))
    assert spec.kind == "checkpoint" and _same(build_model(spec), model)
    assert describe_model(spec, model)["preprocessing"] == {"modality": "audio", "sample_rate": 16000}


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(SpecError, match="cannot import"):
        build_model(parse_spec("no_such_pkg.mod:f"))
    with pytest.raises(SpecError, match="has no attribute"):
        build_model(parse_spec("pipeline.models.zoo:nope"))
    with pytest.raises(SpecError, match="does not exist"):
        parse_spec(f"{CNN}?weights={tmp_path / 'missing.safetensors'}")
    with pytest.raises(SpecError, match="unexpected keyword"):
        build_model(parse_spec(f"{CNN}?widht=8"))
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(SpecError, match="do not fit"):
        build_model(parse_spec(f"{CNN}?weights={other}"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SpecError, match="not a TorchScript"):
        parse_spec(str(tmp_path / "notes.txt"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(SpecError, match="not a kdpipe checkpoint"):
        parse_spec(str(tmp_path / "bad"))


def test_absolute_spec_pins_local_paths_to_this_directory(tmp_path, monkeypatch):
    """Ray Train workers run in their own working directory: a SPEC handed to them must not
    depend on the driver's."""
    from pipeline.models.spec import absolute_spec

    monkeypatch.chdir(tmp_path)
    model = audio_cnn(width=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "w b.safetensors")
    save_checkpoint(str(tmp_path / "ck"), model, CNN, {"width": 8},
                    {"num_classes": 10, "modality": "audio", "level": "utterance", "preprocessing": {}})
    rel = f"{CNN}?width=8&weights=w%20b.safetensors&level=utterance"
    got = absolute_spec(rel)
    assert got == f"{CNN}?width=8&weights={tmp_path}/w%20b.safetensors&level=utterance"
    assert absolute_spec("ck") == str(tmp_path / "ck")
    assert absolute_spec({"factory": CNN, "weights": "w b.safetensors"})["weights"] == str(tmp_path / "w b.safetensors")
    assert absolute_spec(f"{CNN}?width=8") == f"{CNN}?width=8"  # nothing local: unchanged
    assert absolute_spec(None) is None
    monkeypatch.chdir("/")
    assert _same(build_model(parse_spec(got)), model)  # resolves from anywhere
    assert parse_spec(absolute_spec(str(tmp_path / "ck"))).kind == "checkpoint"
