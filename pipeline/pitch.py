# python -m pytest tests/test_pitch.py -q
"""The pitch task: CREPE's 360 pitch bins <-> cents <-> Hz, decoding any model's (T, 360)
frame output to a pitch contour the way CREPE does, and the melody-extraction metrics.

Bins follow CREPE (Kim et al. 2018) and torchcrepe: 360 bins of 20 cents,

    cents(bin) = 20 * bin + 1997.3794084376191     (cents above 10 Hz; bin 0 = 31.70 Hz)
    hz(cents)  = 10 * 2 ** (cents / 1200)          (bin 359 = 2005.50 Hz)

A frequency's label is its *nearest* bin (``hz_to_bin``, rounding), which is the argmax of
CREPE's Gaussian-blurred training target. torchcrepe's ``bins_to_cents`` adds triangular dither
noise; nothing here does (results are deterministic).

Decoding (``decode``) is CREPE's ``to_local_average_cents``: take the argmax bin b, then the
average of cents(b-4 .. b+4) weighted by the model's scores in that window. The scores are
exp(logits) restricted to the window, so the same function serves

- a CREPE teacher (``pipeline.models.crepe``), whose "logits" are log(sigmoid activation):
  the weights are exactly CREPE's activations, as in CREPE's own decoder;
- a softmax student: the weights are its softmax probabilities (the normalisation cancels in a
  weighted average, so one window softmax is enough).

Metrics (``pitch_metrics``) follow mir_eval's melody definitions on frames:

- raw pitch accuracy (RPA): the share of reference-voiced frames whose estimate is within 50
  cents of the reference. Like mir_eval, the estimate's voicing decision is not used: a model
  always reports a pitch, voiced or not.
- raw chroma accuracy (RCA): the same with octave errors forgiven (distance modulo 1200 cents).
- voicing recall: the share of reference-voiced frames the model calls voiced
  (confidence >= threshold); voicing false alarm: the share of reference-unvoiced frames it
  calls voiced.

Frame times: a frame-level pitch model with frame shift H ms has its frame t centred at
t * H ms (CREPE's convention: 1 + N // hop frames for N samples, the first centred on sample
0). Reference contours are stored per 10 ms frame with the same convention, so frame t of a
model at H ms is reference frame t * H / 10 (``align_reference``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

PITCH_BINS = 360
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 (above 10 Hz); CREPE's constant
REF_HZ = 10.0
UNVOICED = -1  # frame label of an unvoiced frame
WINDOW = 4  # decode: bins on each side of the argmax
TOLERANCE_CENTS = 50.0


# ---------------------------------------------------------------------------------------------
# units


def bin_to_cents(bins):
    """Pitch bin(s) (any float/int array or tensor) -> cents above 10 Hz: 20 * bin + 1997.38."""
    return CENTS_PER_BIN * bins + CENTS_OFFSET


def cents_to_bin(cents):
    """Cents above 10 Hz -> fractional bin (inverse of bin_to_cents, not rounded)."""
    return (cents - CENTS_OFFSET) / CENTS_PER_BIN


def cents_to_hz(cents):
    """Cents above 10 Hz -> Hz: 10 * 2 ** (cents / 1200)."""
    if torch.is_tensor(cents):
        return REF_HZ * torch.pow(2.0, cents / 1200.0)
    return REF_HZ * np.power(2.0, np.asarray(cents, dtype=np.float64) / 1200.0)


def hz_to_cents(hz):
    """Hz (> 0) -> cents above 10 Hz: 1200 * log2(hz / 10)."""
    if torch.is_tensor(hz):
        return 1200.0 * torch.log2(hz / REF_HZ)
    return 1200.0 * np.log2(np.asarray(hz, dtype=np.float64) / REF_HZ)


def bin_to_hz(bins):
    """Pitch bin(s) -> Hz (bin 0 = 31.70 Hz, bin 359 = 2005.50 Hz)."""
    return cents_to_hz(bin_to_cents(bins))


def hz_to_bin(hz, unvoiced: int = UNVOICED) -> np.ndarray:
    """f0 in Hz (N,) -> nearest pitch bin (N,) int16, clipped to 0..359; ``unvoiced`` where hz <= 0."""
    hz = np.asarray(hz, dtype=np.float64)
    voiced = hz > 0
    b = np.rint(cents_to_bin(hz_to_cents(np.where(voiced, hz, REF_HZ))))
    b = np.clip(b, 0, PITCH_BINS - 1)
    return np.where(voiced, b, unvoiced).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# decoding


def decode(logits: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """CREPE's local weighted average: logits (..., 360) -> pitch in cents (...,) float32.

    b = argmax; cents = sum_j w_j * cents(j) / sum_j w_j over j in [b - window, b + window]
    (clipped to 0..359), w_j = exp(logit_j - logit_b). For CREPE logits = log(activation) the
    weights are its activations; for a softmax model, its probabilities (see module doc).
    """
    z = logits.float()
    centre = z.argmax(dim=-1, keepdim=True)  # (..., 1)
    offsets = torch.arange(-window, window + 1, device=z.device)  # (W,)
    idx = centre + offsets  # (..., W)
    inside = (idx >= 0) & (idx < z.shape[-1])
    idx_c = idx.clamp(0, z.shape[-1] - 1)
    zw = z.gather(-1, idx_c)  # (..., W)
    w = torch.exp(zw - z.gather(-1, centre)) * inside  # the argmax has weight 1, so the sum is >= 1
    cents = bin_to_cents(idx_c.to(torch.float32))
    return (w * cents).sum(-1) / w.sum(-1)


def confidence(logits: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """Voicing score per frame from logits (..., C) -> (...,).

    kind "sigmoid": CREPE's confidence, the largest activation, exp(max logit) for logits =
    log(activation). kind "softmax": the largest softmax probability (a softmax student).
    """
    z = logits.float()
    if kind == "sigmoid":
        return z.max(dim=-1).values.exp()
    if kind == "softmax":
        return torch.softmax(z, dim=-1).max(dim=-1).values
    raise ValueError(f"confidence kind must be 'sigmoid' or 'softmax', got {kind!r}")


def align_reference(ref_hz: np.ndarray, frame_shift_ms: float, num_frames: int,
                    ref_shift_ms: float = 10.0) -> np.ndarray:
    """Reference f0 per ``ref_shift_ms`` frame (R,) -> the model's frames (num_frames,).

    Frame t of the model is centred at t * frame_shift_ms, i.e. reference frame
    t * frame_shift_ms / ref_shift_ms, which must be a whole number (shifts that are multiples
    of the reference's). Frames past the reference's end are unvoiced (0 Hz).
    """
    step = frame_shift_ms / ref_shift_ms
    if abs(step - round(step)) > 1e-6 or round(step) < 1:
        raise ValueError(f"frame shift {frame_shift_ms} ms is not a multiple of the reference's {ref_shift_ms} ms")
    idx = np.arange(num_frames) * int(round(step))
    ref = np.asarray(ref_hz, dtype=np.float64)
    out = np.zeros(num_frames, dtype=np.float64)
    ok = idx < len(ref)
    out[ok] = ref[idx[ok]]
    return out


# ---------------------------------------------------------------------------------------------
# metrics


@dataclass
class PitchCounts:
    """Summable frame counts; ``metrics()`` turns them into rates."""

    voiced: int = 0  # reference-voiced frames
    unvoiced: int = 0  # reference-unvoiced frames
    pitch_ok: int = 0  # voiced, |est - ref| <= tolerance
    chroma_ok: int = 0  # voiced, octave-folded distance <= tolerance
    voiced_hit: int = 0  # voiced and estimated voiced
    false_alarm: int = 0  # unvoiced and estimated voiced
    abs_cents_sum: float = 0.0  # voiced: sum of |est - ref| in cents

    def __add__(self, other: "PitchCounts") -> "PitchCounts":
        return PitchCounts(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def metrics(self) -> dict[str, float]:
        """rpa, rca, voicing_recall, voicing_false_alarm (0..1; NaN without frames of that kind),
        mean_abs_cents over voiced frames, and the frame counts."""
        v, u = self.voiced, self.unvoiced
        nan = float("nan")
        return {
            "rpa": self.pitch_ok / v if v else nan,
            "rca": self.chroma_ok / v if v else nan,
            "voicing_recall": self.voiced_hit / v if v else nan,
            "voicing_false_alarm": self.false_alarm / u if u else nan,
            "mean_abs_cents": self.abs_cents_sum / v if v else nan,
            "voiced_frames": v,
            "unvoiced_frames": u,
        }


def pitch_counts(est_cents, ref_hz, est_confidence=None, threshold: float = 0.5,
                 tolerance: float = TOLERANCE_CENTS) -> PitchCounts:
    """Frame counts of one contour (or several concatenated): est_cents (N,) from ``decode``,
    ref_hz (N,) reference f0 (<= 0 = unvoiced), est_confidence (N,) voicing scores or None
    (then voicing counts are 0). A frame is estimated voiced when its confidence >= threshold.
    """
    est = np.asarray(est_cents, dtype=np.float64).reshape(-1)
    ref = np.asarray(ref_hz, dtype=np.float64).reshape(-1)
    if est.shape != ref.shape:
        raise ValueError(f"estimate has {est.shape[0]} frames, reference {ref.shape[0]}")
    voiced = ref > 0
    ref_c = hz_to_cents(np.where(voiced, ref, REF_HZ))
    diff = np.abs(est - ref_c)
    chroma = np.abs(diff - 1200.0 * np.round(diff / 1200.0))  # distance to the nearest octave multiple
    c = PitchCounts(voiced=int(voiced.sum()), unvoiced=int((~voiced).sum()),
                    pitch_ok=int((voiced & (diff <= tolerance)).sum()),
                    chroma_ok=int((voiced & (chroma <= tolerance)).sum()),
                    abs_cents_sum=float(diff[voiced].sum()))
    if est_confidence is not None:
        says_voiced = np.asarray(est_confidence, dtype=np.float64).reshape(-1) >= threshold
        c.voiced_hit = int((voiced & says_voiced).sum())
        c.false_alarm = int((~voiced & says_voiced).sum())
    return c


def pitch_metrics(est_cents, ref_hz, est_confidence=None, threshold: float = 0.5,
                  tolerance: float = TOLERANCE_CENTS) -> dict[str, float]:
    """RPA, RCA, voicing recall / false alarm of one set of frames (see ``pitch_counts``)."""
    return pitch_counts(est_cents, ref_hz, est_confidence, threshold, tolerance).metrics()
