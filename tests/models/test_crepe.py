# python -m pytest tests/models/test_crepe.py -q
"""CREPE teachers against torchcrepe's own pipeline, their cache semantics, and the pitch students."""

import numpy as np
import pytest
import torch

torchcrepe = pytest.importorskip("torchcrepe")

from pipeline import pitch  # noqa: E402
from recipes.corpus import pitch as pc  # noqa: E402
from pipeline.models import zoo  # noqa: E402
from pipeline.models.crepe import PARAMS, crepe_full, crepe_tiny  # noqa: E402
from pipeline.models.spec import build_model, parse_spec  # noqa: E402
from pipeline.softtargets import topk_from_logits  # noqa: E402


@pytest.fixture(scope="module")
def clips():
    """Two synthesised voiced clips (0.5 s and 0.33 s) from the pitch corpus generator."""
    settings = pc.resolve_settings(pc.PitchCorpusConfig(clip_seconds=(0.33, 0.5), seed=1))
    return [pc.make_clip(settings, "test", i) for i in (0, 3)]


@pytest.fixture(scope="module")
def tiny():
    return crepe_tiny().eval()


def _torchcrepe_activations(audio: np.ndarray, capacity: str) -> torch.Tensor:
    """torchcrepe's own framing, normalisation and model: (1 + N // 160, 360) sigmoids."""
    x = torch.from_numpy(audio)[None]
    with torch.inference_mode():
        torchcrepe.load.model("cpu", capacity)
        return torch.cat([torchcrepe.infer(f, capacity) for f in torchcrepe.preprocess(x, 16000, 160, 2048)])


def test_tiny_equals_torchcrepe(clips, tiny):
    for clip in clips:
        ref = _torchcrepe_activations(clip.audio, "tiny")
        with torch.inference_mode():
            act = tiny(torch.from_numpy(clip.audio)[None])[0].exp()
        assert act.shape == ref.shape == (1 + len(clip.audio) // 160, 360)
        assert (act - ref).abs().max().item() < 1e-5  # measured 7e-7 (conv1d vs conv2d summation order)


def test_full_equals_torchcrepe(clips):
    audio = clips[1].audio[:4800]  # 0.3 s: 31 frames keep this test near a second
    ref = _torchcrepe_activations(audio, "full")
    model = crepe_full().eval()
    with torch.inference_mode():
        act = model(torch.from_numpy(audio)[None])[0].exp()
    assert (act - ref).abs().max().item() < 1e-5


def test_conventions_and_parameter_counts(tiny):
    assert (tiny.num_classes, tiny.level, tiny.modality, tiny.frame_shift_ms) == (360, "frame", "audio", 10.0)
    assert zoo.count_parameters(tiny) == PARAMS["tiny"] == 486_552
    assert tiny.output_lengths(torch.tensor([0, 159, 160, 16000])).tolist() == [1, 1, 2, 101]
    for name in ("crepe", "crepe_full", "crepe_tiny", "pitch_hcnn", "pitch_cnn"):
        assert name in zoo.FACTORIES
    model = build_model(parse_spec("pipeline.models.zoo:crepe_tiny?hop_ms=40"))
    assert model.frame_shift_ms == 40.0 and model.hop == 640
    with pytest.raises(ValueError):
        crepe_tiny(hop_ms=10.03)  # not a whole number of samples


def test_padding_lengths_and_hop(clips, tiny):
    a, b = (torch.from_numpy(c.audio) for c in clips)
    x = torch.zeros(2, max(len(a), len(b)) + 1000)
    x[0, : len(a)], x[1, : len(b)] = a, b
    lengths = torch.tensor([len(a), len(b)])
    with torch.inference_mode():
        batch = tiny(x, lengths)
        alone = [tiny(v[None])[0] for v in (a, b)]
        sparse = crepe_tiny(hop_ms=40).eval()(x, lengths)
    n = tiny.output_lengths(lengths).tolist()
    assert batch.shape == (2, 1 + x.shape[1] // 160, 360)
    for i in range(2):
        assert torch.equal(batch[i, : n[i]], alone[i])  # a row's frames do not depend on its batch
        assert (batch[i, n[i]:] == 0).all()  # frames past the row are not computed
    # hop 40 ms computes every 4th frame of hop 10 ms, the same windows
    m = crepe_tiny(hop_ms=40).output_lengths(lengths).tolist()
    for i in range(2):
        assert torch.allclose(sparse[i, : m[i]], alone[i][::4][: m[i]], atol=1e-5)


def test_cache_semantics_recover_crepe_confidence(clips, tiny):
    with torch.inference_mode():
        logits = tiny(torch.from_numpy(clips[0].audio)[None])[0]  # (T, 360) log activations
    act = logits.exp()
    tk = topk_from_logits(logits, 10)
    # stored distribution = normalised activations; logsumexp = log(sum of activations)
    assert torch.allclose(tk.logprobs.exp(), torch.topk(act / act.sum(-1, keepdim=True), 10, -1).values, atol=1e-6)
    assert torch.allclose(tk.logsumexp, act.sum(-1).log(), atol=1e-5)
    # CREPE's confidence (max activation) = exp(top-1 logprob + logsumexp)
    assert torch.allclose((tk.logprobs[:, 0] + tk.logsumexp).exp(), act.max(-1).values, atol=1e-5)
    assert torch.allclose(pitch.confidence(logits, tiny.confidence_kind), act.max(-1).values)
    # decoding the log activations is CREPE's local weighted average of the activations
    b = act.argmax(-1)
    idx = (b[:, None] + torch.arange(-4, 5)).clamp(0, 359)
    w = act.gather(1, idx) * ((b[:, None] + torch.arange(-4, 5) >= 0) & (b[:, None] + torch.arange(-4, 5) <= 359))
    expected = (w * pitch.bin_to_cents(idx.float())).sum(1) / w.sum(1)
    assert torch.allclose(pitch.decode(logits), expected, atol=1e-2)


def test_tiny_tracks_the_synthesised_f0(tiny):
    """Sanity of labels and teacher together: CREPE tiny is within 50 cents of the stored f0
    on most voiced frames of clean (40 dB SNR) synthesised clips."""
    settings = pc.resolve_settings(pc.PitchCorpusConfig(snr_db_choices=(40.0,), seed=2))
    counts = pitch.PitchCounts()
    for i in range(6):
        clip = pc.make_clip(settings, "test", i)
        with torch.inference_mode():
            cents = pitch.decode(tiny(torch.from_numpy(clip.audio)[None])[0]).numpy()
        counts += pitch.pitch_counts(cents, clip.f0)
    assert counts.metrics()["rpa"] > 0.9


@pytest.mark.parametrize("factory", ["pitch_hcnn", "pitch_hcnn?acf", "pitch_cnn"])
def test_students_follow_the_conventions(factory):
    factory, _, flag = factory.partition("?")
    extra = {flag: True} if flag else {}
    model = zoo.FACTORIES[factory](hop_ms=40, **extra)
    n = zoo.count_parameters(model)
    assert n < PARAMS["tiny"] / 2
    assert (model.num_classes, model.level, model.modality, model.frame_shift_ms) == (360, "frame", "audio", 40.0)
    x = torch.randn(3, 8000)
    lengths = torch.tensor([8000, 3000, 0])
    model.train()
    out = model(x, lengths)
    assert out.shape == (3, 1 + 8000 // 640, 360)
    assert model.output_lengths(lengths).tolist() == [13, 5, 1]
    out[0, :3].logsumexp(-1).sum().backward()  # gradients reach the weights through the scatter
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.inference_mode():
        a = model(x, lengths)
        b = zoo.FACTORIES[factory](hop_ms=10, **extra)
        b.load_state_dict(model.state_dict())
        dense = b.eval()(x, lengths)
    assert torch.allclose(a[0], dense[0, ::4][:13], atol=1e-4)  # frame-independent: hop only picks frames


@pytest.mark.parametrize("f0", [55.0, 82.4, 130.8, 311.1])
def test_autocorrelation_channel_peaks_at_the_period(f0):
    """The acf channel at pitch bin b is the frame's autocorrelation at lag sr / f_b (window
    taper divided out): a harmonic tone has a peak of ~1 within one bin (20 cents) of its f0,
    and nothing as high between f0 and its octave above, where the spectrum channels alone
    resolve low f0 worst."""
    from pipeline.models.crepe import normalize_frames
    from pipeline.models.pitch_zoo import HarmonicFrontend

    t = np.arange(1024) / 16000
    x = sum(np.sin(2 * np.pi * h * f0 * t + h) / h for h in range(1, 9)).astype(np.float32)
    fe = HarmonicFrontend(acf=True)
    chans = fe(normalize_frames(torch.from_numpy(x)[None]))[0]
    assert chans.shape == (len(fe.offsets) + 1, 360)
    assert torch.equal(chans[:-1], HarmonicFrontend()(normalize_frames(torch.from_numpy(x)[None]))[0])
    acf = chans[-1].numpy()
    # the same from its definition, in float64: the windowed frame's autocorrelation over the
    # window's, at lag sr / f_b, linearly interpolated
    frame = normalize_frames(torch.from_numpy(x)[None])[0].double().numpy()
    w = torch.hann_window(1024, periodic=False, dtype=torch.float64).numpy()
    r = np.correlate(frame * w, frame * w, "full")[1023:]
    rw = np.correlate(w, w, "full")[1023:]
    lags = 16000 / pitch.bin_to_hz(np.arange(360, dtype=np.float64))
    ref = np.interp(lags, np.arange(600), (r[:600] / r[0]) / (rw[:600] / rw[0]))
    np.testing.assert_allclose(acf, ref, atol=2e-3)
    b = int(round(float(pitch.hz_to_bin(np.array([f0]))[0])))
    near = acf[max(0, b - 1): b + 2]
    assert near.max() > 0.9
    assert max(0, b - 1) + int(np.argmax(near)) == int(np.argmax(acf[b - 20: b + 55])) + b - 20  # the peak of the octave
    between = acf[b + 5: b + 55]  # 100 cents above f0 up to just below its octave (60 bins)
    assert between.max() < near.max() - 0.2


def test_acf_student_spec_adds_one_input_channel():
    with pytest.raises(ValueError, match="acf must be true or false"):
        build_model(parse_spec("pipeline.models.zoo:pitch_hcnn?acf=2"))
    plain = build_model(parse_spec("pipeline.models.zoo:pitch_hcnn?channels=32&layers=3&hop_ms=40"))
    acf = build_model(parse_spec("pipeline.models.zoo:pitch_hcnn?channels=32&layers=3&acf=true&hop_ms=40"))
    assert acf.body[0].in_channels == plain.body[0].in_channels + 1
    assert zoo.count_parameters(acf) - zoo.count_parameters(plain) == 32 * 5  # one channel x C x kernel
    x = torch.randn(2, 4000)
    with torch.inference_mode():
        assert acf.eval()(x, torch.tensor([4000, 2500])).shape == (2, 1 + 4000 // 640, 360)
