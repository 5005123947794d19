"""Reference zoo: shapes, masking, output lengths, sizes, TorchScript, and that models can learn.

    .venv/bin/python -m pytest tests/models/test_zoo.py -q
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.crepe import NUM_BINS
from pipeline.models.base import model_info
from pipeline.models.zoo import (
    FACTORIES,
    audio_cnn,
    audio_conformer,
    count_parameters,
    image_cnn,
    image_resnet,
    resnet50,
    vit,
    wav2vec2_frames,
    wav2vec2_large_frames,
)

# TorchScript still works in torch 2.11 but warns on every script/save/load; the teacher spec accepts it.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: one intra-op thread is as fast on an idle box, and on a shared,
    # busy 2-core box two spinning OpenMP threads made the training tests 5-30x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL_VIT = dict(num_classes=10, image_size=32, patch=8, dim=32, depth=2, heads=4, mlp=64)


def _feats(B=3, T=57, F_=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, F_, generator=g)  # (B, T, F)
    lengths = torch.tensor([T, 31, 12][:B])
    return x, lengths


def _eval(model):
    torch.manual_seed(0)
    return model.eval()


# -- factories ---------------------------------------------------------------------------------


PITCH_MODULES = ("pipeline.models.crepe", "pipeline.models.pitch_zoo")


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_defaults_are_json_and_documented(name):
    fn = FACTORIES[name]
    sig = inspect.signature(fn)
    if fn.__module__ in PITCH_MODULES:  # the output is the 360 CREPE pitch bins, not a choice
        assert "num_classes" not in sig.parameters and f"{NUM_BINS})" in fn.__doc__, name
    else:
        assert "num_classes" in sig.parameters
    for p in sig.parameters.values():
        assert p.default is not inspect.Parameter.empty, f"{name}({p.name}) has no default"
        json.dumps(p.default)  # kwargs must survive a config file
    assert fn.__doc__ and "(B" in fn.__doc__, f"{name} needs a docstring with shapes"
    assert fn.__module__.startswith("pipeline.models.")


def test_bad_kwargs_fail_clearly():
    with pytest.raises(ValueError, match="level"):
        audio_cnn(level="clip")
    with pytest.raises(ValueError, match="time_stride"):
        audio_cnn(time_stride=3)
    with pytest.raises(ValueError, match="subsample"):
        audio_conformer(subsample=8)
    with pytest.raises(ValueError, match="heads"):
        audio_conformer(d_model=30, heads=4)
    with pytest.raises(ValueError, match="patch"):
        vit(image_size=30, patch=8)


# -- speech over log-mel -------------------------------------------------------------------------


AUDIO_CASES = [
    ("audio_cnn", level, s) for level in ("utterance", "frame") for s in (1, 2, 4)
] + [
    ("audio_conformer", level, s) for level in ("utterance", "frame") for s in (1, 2, 4)
]


def _audio_model(name, level, stride, **kw):
    if name == "audio_cnn":
        return audio_cnn(num_classes=7, width=8, level=level, time_stride=stride, **kw)
    return audio_conformer(num_classes=7, d_model=32, layers=2, heads=4, ffn=64, kernel=7,
                           level=level, subsample=stride, **kw)


@pytest.mark.parametrize("name,level,stride", AUDIO_CASES)
def test_audio_shapes_info_and_output_lengths(name, level, stride):
    model = _eval(_audio_model(name, level, stride))
    info = model_info(model)
    assert (info.num_classes, info.level, info.modality) == (7, level, "audio")
    assert info.frame_shift_ms == (10.0 * stride if level == "frame" else None)
    x, lengths = _feats()
    with torch.no_grad():
        y = model(x, lengths)
        if level == "utterance":
            assert y.shape == (3, 7)
        else:
            # ceil(T / stride) frames for the full-length row, and the same formula per row
            assert y.shape == (3, -(-57 // stride), 7)
            assert model.output_lengths(torch.tensor([57]))[0] == y.shape[1]
            for L in (1, 2, 3, 5, 12, 31, 57):
                alone = model(x[:1, :L], torch.tensor([L]))
                assert alone.shape[1] == int(model.output_lengths(torch.tensor([L]))[0]) == -(-L // stride)
        assert torch.equal(model(x), model(x, torch.full((3,), 57)))  # lengths=None means all valid


@pytest.mark.parametrize("name,level,stride", AUDIO_CASES)
def test_audio_padding_does_not_change_logits(name, level, stride):
    """Each row batched with padding (holding garbage) == the same row alone, unpadded."""
    model = _eval(_audio_model(name, level, stride))
    x, lengths = _feats()
    x = x.clone()
    for i, L in enumerate(lengths.tolist()):
        x[i, L:] = 1e3  # what is past a row's length must not matter
    with torch.no_grad():
        batched = model(x, lengths)
        n_out = model.output_lengths(lengths)
        for i, L in enumerate(lengths.tolist()):
            alone = model(x[i:i + 1, :L], lengths[i:i + 1])[0]
            if level == "utterance":
                torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)
            else:
                n = int(n_out[i])
                assert alone.shape[0] == n
                torch.testing.assert_close(batched[i, :n], alone, atol=1e-5, rtol=1e-5)
        # extra padding appended to the whole batch changes nothing either
        wider = torch.cat([x, torch.full((3, 23, 40), -7.0)], dim=1)
        more = model(wider, lengths)
        if level == "utterance":
            torch.testing.assert_close(more, batched, atol=1e-5, rtol=1e-5)
        else:
            for i in range(3):
                n = int(n_out[i])
                torch.testing.assert_close(more[i, :n], batched[i, :n], atol=1e-5, rtol=1e-5)


def test_audio_models_run_in_bf16():
    x, lengths = _feats()
    for model in (audio_cnn(), audio_conformer(level="frame")):
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(x, lengths).float()).all()


# -- raw waveform --------------------------------------------------------------------------------


def test_wav2vec2_frames_shapes_lengths_and_padding():
    model = _eval(wav2vec2_frames(num_classes=5))
    info = model_info(model)
    assert (info.num_classes, info.level, info.modality, info.frame_shift_ms) == (5, "frame", "audio", 20.0)
    g = torch.Generator().manual_seed(0)
    wave = torch.randn(3, 16000, generator=g) * 0.1  # (B, N) 1 s at 16 kHz
    lengths = torch.tensor([16000, 9000, 4000])
    with torch.no_grad():
        y = model(wave, lengths)
        assert y.shape == (3, 49, 5)  # floor((16000 - 400) / 320) + 1 = 49 frames of 20 ms
        n = model.output_lengths(lengths)
        assert n.tolist() == [49, 27, 12]
        for i, L in enumerate(lengths.tolist()):
            alone = model(wave[i:i + 1, :L], lengths[i:i + 1])[0]
            assert alone.shape[0] == n[i]
            torch.testing.assert_close(y[i, :n[i]], alone, atol=1e-4, rtol=1e-4)


# -- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory,kwargs", [
    (image_cnn, {}), (image_cnn, {"width": 8, "depth": 3}),
    (image_resnet, {}), (image_resnet, {"width": 8, "blocks": [2, 1]}),
    (vit, SMALL_VIT), (resnet50, {"num_classes": 10, "width": 8}),
])
@pytest.mark.parametrize("hw", [(32, 32), (48, 64)])
def test_image_shapes_and_info(factory, kwargs, hw):
    model = _eval(factory(**kwargs))
    info = model_info(model)
    assert (info.num_classes, info.level, info.modality, info.frame_shift_ms) == (10, "utterance", "image", None)
    with torch.no_grad():
        y = model(torch.randn(2, 3, *hw), None)
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_small_cnns_take_tiny_images():
    with torch.no_grad():
        for model in (image_cnn(depth=3), image_resnet()):
            assert model.eval()(torch.randn(1, 3, 5, 7)).shape == (1, 10)


# -- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory,kwargs,lo,hi", [
    (audio_cnn, {"width": 8}, 3_000, 8_000),  # tiny student
    (audio_cnn, {}, 50_000, 120_000),
    (audio_cnn, {"width": 64}, 250_000, 400_000),  # teacher
    (audio_conformer, {}, 300_000, 700_000),
    (audio_conformer, {"d_model": 144, "ffn": 576, "layers": 4}, 1_500_000, 3_500_000),
    (wav2vec2_frames, {}, 100_000, 400_000),
    (image_cnn, {"width": 8}, 2_000, 8_000),
    (image_cnn, {}, 10_000, 30_000),
    (image_cnn, {"width": 32, "depth": 3}, 200_000, 400_000),
    (image_resnet, {}, 50_000, 120_000),
    (image_resnet, {"blocks": [3, 3, 3]}, 200_000, 400_000),
])
def test_parameter_counts(factory, kwargs, lo, hi):
    n = count_parameters(factory(**kwargs))
    assert lo <= n <= hi, f"{factory.__name__}({kwargs}) has {n} params"


def test_benchmark_models_sizes_and_shapes_on_meta():
    """Full-size ViT-B/16, ResNet-50 and wav2vec2-large built and run on the meta device: exact
    parameter counts and output shapes without allocating or computing anything."""
    samples = torch.tensor([160000, 80000])
    with torch.device("meta"):
        v, r, w = vit(), resnet50(), wav2vec2_large_frames(num_classes=32)
        assert count_parameters(v) == 86_567_656  # ViT-B/16 (timm: 86.6M)
        assert count_parameters(r) == 25_557_032  # torchvision resnet50
        assert 315_000_000 < count_parameters(w) < 316_000_000  # wav2vec 2.0 large + 1024x32 head
        assert v.eval()(torch.empty(2, 3, 224, 224)).shape == (2, 1000)
        assert r.eval()(torch.empty(2, 3, 224, 224)).shape == (2, 1000)
        assert w.eval()(torch.empty(2, 160000), samples.to("meta")).shape == (2, 499, 32)
    assert w.output_lengths(samples).tolist() == [499, 249]  # 20 ms frames: 10 s -> 499
    assert (w.level, w.frame_shift_ms, w.num_classes) == ("frame", 20.0, 32)


def test_resnet50_real_forward_batch1():
    model = resnet50().eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


# -- TorchScript ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make,inputs", [
    (lambda: audio_cnn(), "feats"),
    (lambda: audio_cnn(width=8, level="frame", time_stride=2), "feats"),
    (lambda: audio_conformer(level="frame", d_model=32, ffn=64, heads=4), "feats"),
    (lambda: image_cnn(), "image"),
    (lambda: image_resnet(), "image"),
    (lambda: vit(**SMALL_VIT), "image"),
    (lambda: wav2vec2_frames(), "wave"),
])
def test_torchscript_round_trip(make, inputs, tmp_path):
    model = _eval(make())
    if inputs == "feats":
        x, lengths = _feats()
    elif inputs == "wave":
        x, lengths = torch.randn(2, 8000), torch.tensor([8000, 5000])
    else:
        x, lengths = torch.randn(2, 3, 32, 32), None
    with torch.no_grad():
        expected = model(x, lengths)
    keys = list(model.state_dict())
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    assert list(model.state_dict()) == keys  # scripting leaves the eager model (and its checkpoints) alone
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, lengths), expected, atol=1e-6, rtol=1e-6)
    assert model_info(loaded) == model_info(model)  # the attributes travel with the file
    if lengths is not None:
        assert torch.equal(loaded.output_lengths(lengths), model.output_lengths(lengths))


# -- learning ------------------------------------------------------------------------------------


def _overfit(model, x, lengths, y, steps=100, lr=3e-3):
    """Adam on one fixed batch; returns (first loss, last loss, model in eval mode)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(x, lengths)
        if out.dim() == 3:  # frame level: loss over valid frames only
            n = model.output_lengths(lengths)
            valid = torch.arange(out.shape[1])[None, :] < n[:, None]  # (B, T')
            loss = F.cross_entropy(out[valid], y[:, :out.shape[1]][valid])
        else:
            loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1], model.eval()


def test_audio_cnn_overfits_8_examples():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 32, 40, generator=g)  # (B, T, F)
    lengths = torch.randint(16, 33, (8,), generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    torch.manual_seed(0)
    first, last, model = _overfit(audio_cnn(), x, lengths, y)
    assert last < 0.1 * first, (first, last)
    with torch.no_grad():
        assert (model(x, lengths).argmax(-1) == y).all()


def test_audio_cnn_frame_level_overfits_8_examples():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 40, 40, generator=g)
    lengths = torch.randint(20, 41, (8,), generator=g)
    y = torch.randint(0, 10, (8, 20), generator=g)  # labels at the 20 ms output rate
    torch.manual_seed(0)
    first, last, _ = _overfit(audio_cnn(width=16, level="frame", time_stride=2), x, lengths, y)
    assert last < 0.15 * first, (first, last)


def test_image_cnn_overfits_8_examples():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    torch.manual_seed(0)
    first, last, model = _overfit(image_cnn(), x, None, y)
    assert last < 0.1 * first, (first, last)
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).all()


@pytest.mark.parametrize("make,shape", [
    (lambda: audio_cnn(width=8, level="frame", time_stride=4), (2, 40, 40)),
    (lambda: audio_conformer(d_model=32, ffn=64, heads=4), (2, 40, 40)),
    (lambda: wav2vec2_frames(), (2, 4000)),
    (lambda: image_cnn(), (2, 3, 16, 16)),
    (lambda: image_resnet(), (2, 3, 16, 16)),
    (lambda: vit(**SMALL_VIT), (2, 3, 32, 32)),
])
def test_every_parameter_gets_a_gradient(make, shape):
    """DDP (without find_unused_parameters) needs every parameter used in every step."""
    model = make().train()
    x = torch.randn(*shape)
    lengths = torch.tensor([shape[1], shape[1] // 2]) if len(shape) < 4 else None
    model(x, lengths).float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


# -- the GPU stand-in --------------------------------------------------------------------------


def test_gpu_standin_waits_like_a_gpu_with_the_gil_released():
    import threading
    import time

    from pipeline.models.zoo import gpu_standin

    # 200 ms for (4, 16000); no launches here: each one waits for the spinning thread's GIL
    model = gpu_standin(ms_per_batch=200.0, batch=4, seconds=1.0, launches=0)
    x = torch.randn(4, 16000) * 0.1
    lengths = torch.tensor([16000, 12000, 641, 1])
    spins = []
    stop = threading.Event()

    def spin():  # pure Python: makes progress only while the forward does not hold the GIL
        n = 0
        while not stop.is_set():
            n += 1
        spins.append(n)

    t = threading.Thread(target=spin)
    t.start()
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = model(x, lengths)
    took = time.perf_counter() - t0
    stop.set()
    t.join()
    assert 0.2 <= took < 1.0
    assert spins[0] > 100_000  # the other thread ran during the forward's wait
    assert y.shape == (4, 50, 32) and torch.isfinite(y).all()
    assert model.output_lengths(lengths).tolist() == [50, 38, 3, 1]
    half = model(x[:2, :8000], lengths[:2].clamp(max=8000))  # a quarter of the input: a quarter of the time
    assert half.shape == (2, 25, 32)
    t0 = time.perf_counter()
    gpu_standin(ms_per_batch=200.0, batch=4, seconds=1.0, launches=700)(x, lengths)  # launches inside the 200 ms
    assert 0.2 <= time.perf_counter() - t0 < 1.0
    assert torch.equal(gpu_standin()(x, lengths), gpu_standin()(x, lengths))  # the same model everywhere
