# python -m pytest tests/test_pitch.py -q
"""pipeline.pitch on constructed values: units, CREPE decoding, RPA / RCA / voicing."""

import math

import numpy as np
import pytest
import torch

from pipeline import pitch


def test_units_match_crepe_constants():
    assert pitch.bin_to_cents(0) == pytest.approx(1997.3794084376191)
    assert pitch.bin_to_cents(359) == pytest.approx(1997.3794084376191 + 7180)
    assert pitch.bin_to_hz(0) == pytest.approx(31.70, abs=1e-6)
    assert pitch.bin_to_hz(359) == pytest.approx(2005.4972, abs=1e-3)
    assert pitch.hz_to_cents(10.0) == 0.0 and pitch.hz_to_cents(20.0) == pytest.approx(1200.0)
    assert pitch.cents_to_hz(2400.0) == pytest.approx(40.0)
    for b in (0, 17, 200, 359):
        assert pitch.cents_to_bin(pitch.bin_to_cents(b)) == pytest.approx(b)
        assert pitch.hz_to_bin(pitch.bin_to_hz(b)) == b  # nearest bin of a bin centre is that bin
    t = torch.tensor([0.0, 100.0])
    assert torch.allclose(pitch.cents_to_hz(pitch.bin_to_cents(t)), torch.tensor([31.70, 10 * 2 ** ((2000 + 1997.3794084376191) / 1200)]))


def test_hz_to_bin_rounds_to_nearest_and_marks_unvoiced():
    c100 = pitch.bin_to_cents(100)
    hz = pitch.cents_to_hz(np.array([c100 + 9.9, c100 + 10.1, c100 - 9.9, c100 - 10.1]))
    assert pitch.hz_to_bin(hz).tolist() == [100, 101, 100, 99]
    out = pitch.hz_to_bin(np.array([0.0, -1.0, 5.0, 1e5, 440.0]))
    assert out.dtype == np.int16
    assert out.tolist() == [-1, -1, 0, 359, int(round((1200 * math.log2(44.0) - 1997.3794084376191) / 20))]


def test_decode_is_crepes_local_weighted_average():
    # CREPE-style logits = log(activation): activations 0.2, 1.0, 0.6 around bin 100
    act = torch.full((360,), 1e-6)
    act[99], act[100], act[101] = 0.2, 1.0, 0.6
    act[300] = 0.9  # far away: outside the +-4 window, ignored
    cents = pitch.decode(torch.log(act))
    w = torch.tensor([0.2, 1.0, 0.6])
    expected = (w * pitch.bin_to_cents(torch.tensor([99.0, 100.0, 101.0]))).sum() / w.sum()
    # the other 6 bins of the window hold 1e-6 each, pulling by well under 0.01 cent
    assert cents.item() == pytest.approx(expected.item(), abs=0.01)
    # a softmax model: the same weights as probabilities give the same cents (normalisation cancels)
    probs = act / act.sum()
    assert pitch.decode(torch.log(probs)).item() == pytest.approx(cents.item(), abs=1e-3)
    # a single peak decodes to its bin; shapes (..., 360) -> (...)
    z = torch.full((2, 3, 360), -50.0)
    z[..., 7] = 0.0
    assert pitch.decode(z).shape == (2, 3)
    assert torch.allclose(pitch.decode(z), torch.full((2, 3), float(pitch.bin_to_cents(7))), atol=1e-3)


def test_decode_clips_the_window_at_the_edges():
    z = torch.full((360,), -30.0)
    z[0], z[1] = 0.0, math.log(0.5)  # window would reach bins -4..4: only 0..4 exist
    w0, w1 = 1.0, 0.5
    rest = 3 * math.exp(-30.0)
    exp = (w0 * pitch.bin_to_cents(0) + w1 * pitch.bin_to_cents(1)) / (w0 + w1 + rest)
    assert pitch.decode(z).item() == pytest.approx(exp, abs=1e-3)
    z = torch.full((360,), -30.0)
    z[359] = 0.0
    assert pitch.decode(z).item() == pytest.approx(pitch.bin_to_cents(359), abs=1e-3)


def test_confidence_kinds():
    z = torch.log(torch.tensor([[0.1, 0.8, 0.3]]))
    assert pitch.confidence(z, "sigmoid").item() == pytest.approx(0.8)
    assert pitch.confidence(z, "softmax").item() == pytest.approx(0.8 / 1.2)
    with pytest.raises(ValueError):
        pitch.confidence(z, "other")


def test_metrics_exact_counts():
    ref = np.array([100.0, 100.0, 100.0, 100.0, 200.0, 0.0, 0.0, 0.0])
    rc = pitch.hz_to_cents(np.array([100.0, 200.0]))
    est = np.array([
        rc[0] + 49.0,   # within 50 cents: pitch and chroma correct
        rc[0] - 51.0,   # off by 51: both wrong
        rc[0] + 1200.0 + 30.0,  # an octave (+30 cents) up: chroma only
        rc[0] - 2400.0 - 20.0,  # two octaves down (-20): chroma only
        rc[1] + 50.0,   # exactly 50: correct (<=)
        0.0, 0.0, 0.0,  # unvoiced frames: their pitch is not scored
    ])
    conf = np.array([0.9, 0.4, 0.6, 0.5, 0.1, 0.7, 0.2, 0.5])
    m = pitch.pitch_metrics(est, ref, conf, threshold=0.5)
    assert m["voiced_frames"] == 5 and m["unvoiced_frames"] == 3
    assert m["rpa"] == pytest.approx(2 / 5)
    assert m["rca"] == pytest.approx(4 / 5)
    assert m["voicing_recall"] == pytest.approx(3 / 5)  # 0.9, 0.6, 0.5 >= 0.5
    assert m["voicing_false_alarm"] == pytest.approx(2 / 3)  # 0.7 and 0.5
    assert m["mean_abs_cents"] == pytest.approx((49 + 51 + 1230 + 2420 + 50) / 5)


def test_counts_add_up_and_empty_cases():
    a = pitch.pitch_counts(np.array([pitch.hz_to_cents(100.0)]), np.array([100.0]))
    b = pitch.pitch_counts(np.array([0.0]), np.array([0.0]))
    m = (a + b).metrics()
    assert m["rpa"] == 1.0 and m["voiced_frames"] == 1 and m["unvoiced_frames"] == 1
    assert m["voicing_recall"] == 0.0  # no confidence given: nothing estimated voiced
    assert math.isnan(pitch.pitch_metrics(np.zeros(2), np.zeros(2))["rpa"])
    with pytest.raises(ValueError):
        pitch.pitch_counts(np.zeros(3), np.zeros(2))


def test_align_reference():
    ref = np.arange(11, dtype=np.float64)  # 10 ms frames at 0, 10, ..., 100 ms
    assert pitch.align_reference(ref, 10.0, 11).tolist() == ref.tolist()
    assert pitch.align_reference(ref, 40.0, 3).tolist() == [0.0, 4.0, 8.0]  # frames at 0, 40, 80 ms
    assert pitch.align_reference(ref, 40.0, 4).tolist() == [0.0, 4.0, 8.0, 0.0]  # past the end: unvoiced
    with pytest.raises(ValueError):
        pitch.align_reference(ref, 15.0, 3)
