# python -c "from pipeline.models.pitch_zoo import pitch_hcnn; from pipeline.models.zoo import count_parameters; print(count_parameters(pitch_hcnn()))"
"""Small frame-level pitch students, framed exactly like CREPE (pipeline/models/crepe.py).

Both are frame-independent: each 10 ms (or ``hop_ms``) frame is classified from its own
1,024-sample window (64 ms), normalised per frame like CREPE, into 360 CREPE pitch bins
(softmax logits). Because the frames are independent, ``hop_ms`` only chooses which frames
are computed: a student trained on sparse teacher frames (hop 40 ms) can run at 10 ms.

    pitch_hcnn   harmonic-stacked log-frequency spectrum + a 1-D CNN over the pitch axis:
                 translation-equivariant in log-frequency (a pitch shift shifts the output),
                 ~37k params at channels=48. Fixed (non-trained) front end: Hann window,
                 |rFFT| zero-padded to 2,048, log(1 + |X|), a triangular map onto 20-cent
                 bins aligned with CREPE's, and the spectrum read at h * f for h in
                 ``harmonics`` (channels).
    pitch_cnn    a narrow CREPE: the same six raw-waveform conv layers with fewer channels
                 and a dense 360-way head, ~0.12M params at the defaults.

Conventions (pipeline/models/base.py): modality "audio", ``features: "none"`` at 16 kHz,
x (B, N) waveform, lengths (B,) samples -> logits (B, 1 + N // hop, 360), level "frame",
frame_shift_ms = hop_ms, output_lengths(lengths) = 1 + lengths // hop.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.models.crepe import NUM_BINS, SAMPLE_RATE, WINDOW, FramewiseModel
from pipeline.pitch import bin_to_hz

DEFAULT_HARMONICS = (0.5, 1, 2, 3, 4, 5, 6, 7, 8)


def logfreq_matrix(n_fft: int, lo_bin: int, hi_bin: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(n_fft // 2 + 1, hi_bin - lo_bin) triangular weights from rFFT bins onto CREPE pitch
    bins lo_bin..hi_bin-1 (20 cents each; may extend below 0 and above 359).

    Log bin j (frequency f_j, at FFT position p_j = f_j n_fft / sr) takes a triangle of
    half-width max(1, local log-bin spacing in FFT bins) around p_j: linear interpolation at
    low frequencies, an average over the covered FFT bins at high ones. Columns above Nyquist
    are zero; each other column sums to 1.
    """
    bins = np.arange(lo_bin, hi_bin, dtype=np.float64)
    f = bin_to_hz(bins)  # (J,)
    p = f * n_fft / sample_rate
    spacing = p * (2 ** (20 / 1200) - 1)  # FFT bins between neighbouring log bins
    width = np.maximum(1.0, spacing)
    k = np.arange(n_fft // 2 + 1, dtype=np.float64)[:, None]  # (K, 1)
    w = np.maximum(0.0, 1.0 - np.abs(k - p[None, :]) / width[None, :])  # (K, J)
    w[:, p >= n_fft // 2] = 0.0
    s = w.sum(0, keepdims=True)
    w = np.where(s > 0, w / np.where(s > 0, s, 1.0), 0.0)
    return torch.from_numpy(w.astype(np.float32))


class HarmonicFrontend(nn.Module):
    """Normalised frames (M, 1024) -> harmonic stack (M, H [+ 1], 360), no trainable parameters.

    log(1 + |rFFT(hann * frame, n_fft)|) mapped onto pitch bins, then channel h is that
    log-frequency spectrum shifted by round(1200 log2(h) / 20) bins: channel h at output bin b
    is the spectrum at h times bin b's frequency.

    acf=True appends one channel: the windowed frame's autocorrelation (from the same rFFT),
    divided by r(0) and by the window's own autocorrelation, read at lag sr / f_b for bin b.
    A 1,024-sample frame resolves frequency to ~16 Hz, i.e. 300 cents at 90 Hz, but it holds
    several periods of a low voice, and their lag is exact: on the pitch demo's validation
    split this channel took the student from 86.9 to 95.2 RPA (docs/recipes.md).
    """

    def __init__(self, harmonics: Sequence[float] = DEFAULT_HARMONICS, n_fft: int = 2048, acf: bool = False):
        super().__init__()
        self.n_fft = int(n_fft)
        self.acf = bool(acf)
        self.offsets: List[int] = [int(round(1200 * math.log2(h) / 20)) for h in harmonics]
        self.lo = min(0, min(self.offsets))
        self.hi = NUM_BINS + max(0, max(self.offsets))
        self.register_buffer("window", torch.hann_window(WINDOW, periodic=False), persistent=False)
        self.register_buffer("fbank", logfreq_matrix(self.n_fft, self.lo, self.hi), persistent=False)
        if self.acf:
            if self.n_fft < 2 * WINDOW - 1:  # shorter, and the autocorrelation would wrap around
                raise ValueError(f"acf needs n_fft >= {2 * WINDOW - 1}, got {self.n_fft}")
            # pitch bin b <-> lag sr / f_b samples, read by linear interpolation between lags lo
            # and lo + 1; each is divided by the window's own autocorrelation there, which
            # divides out its taper (long lags, low f0, keep their height). Only these 2 x 360
            # lags are ever read, so the weights fold both into two (360,) coefficient rows.
            lag = SAMPLE_RATE / bin_to_hz(np.arange(NUM_BINS, dtype=np.float64))
            lo = np.floor(lag).astype(np.int64)
            frac = lag - lo
            w = torch.fft.irfft(torch.fft.rfft(self.window.double(), n=self.n_fft).abs() ** 2, n=self.n_fft).numpy()
            w = w / w[0]
            self.register_buffer("lag_lo", torch.from_numpy(lo), persistent=False)
            self.register_buffer("lag_coef", torch.from_numpy(np.stack([(1 - frac) / w[lo], frac / w[lo + 1]])
                                                               .astype(np.float32)), persistent=False)  # (2, 360)

    def forward(self, frames: Tensor) -> Tensor:
        X = torch.fft.rfft(frames * self.window, n=self.n_fft)  # (M, K)
        logspec = torch.log1p(X.abs() @ self.fbank)  # (M, J) over bins lo..hi-1
        chans = [logspec[:, o - self.lo: o - self.lo + NUM_BINS] for o in self.offsets]
        if self.acf:
            r = torch.fft.irfft(X.real ** 2 + X.imag ** 2, n=self.n_fft)  # (M, n_fft) linear autocorrelation
            a = r[:, self.lag_lo] * self.lag_coef[0] + r[:, self.lag_lo + 1] * self.lag_coef[1]  # (M, 360)
            chans.append(a / r[:, :1].clamp_min(1e-8))  # over r(0): 1 at a perfect period
        return torch.stack(chans, dim=1)  # (M, H [+ 1], 360)


class PitchHCNN(FramewiseModel):
    """Harmonic stack -> ``layers`` x (Conv1d k over the 360 pitch bins, BatchNorm, ReLU) -> 1x1 conv.

    frame_logits: normalised frames (M, 1024) -> logits (M, 360).
    """

    def __init__(self, channels: int = 48, layers: int = 4, kernel: int = 5, harmonics: Sequence[float] = DEFAULT_HARMONICS,
                 hop_ms: float = 10.0, chunk: int = 1024, dropout: float = 0.0, acf: bool = False):
        super().__init__(hop_ms, chunk)
        if kernel % 2 != 1 or layers < 1 or channels < 1:
            raise ValueError("kernel must be odd, layers and channels >= 1")
        self.frontend = HarmonicFrontend(harmonics, acf=acf)
        c_in = len(self.frontend.offsets) + self.frontend.acf
        blocks: List[nn.Module] = []
        for i in range(layers):
            blocks += [nn.Conv1d(c_in, channels, kernel, padding=kernel // 2, bias=False), nn.BatchNorm1d(channels),
                       nn.ReLU()]
            c_in = channels
        self.body = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Conv1d(channels, 1, 1)

    def frame_logits(self, frames: Tensor) -> Tensor:
        h = self.frontend(frames)  # (M, H, 360)
        h = self.body(h)  # (M, C, 360)
        return self.head(self.dropout(h))[:, 0]  # (M, 360)


class PitchCNN(FramewiseModel):
    """A narrow CREPE: six (Conv1d, ReLU, BatchNorm, MaxPool 2) layers on the raw frame, a dense head.

    Layer 1: kernel ``kernel1`` stride 4; layers 2-6: kernel ``kernel``; ``widths`` channels.
    frame_logits: normalised frames (M, 1024) -> logits (M, 360).
    """

    def __init__(self, widths: Sequence[int] = (64, 16, 16, 16, 32, 32), kernel1: int = 256, kernel: int = 32,
                 hop_ms: float = 10.0, chunk: int = 1024, dropout: float = 0.25):
        super().__init__(hop_ms, chunk)
        if len(widths) != 6:
            raise ValueError("widths must list 6 channel counts")
        layers: List[nn.Module] = []
        c_in, length = 1, WINDOW
        for i, c in enumerate(widths):
            k, s = (kernel1, 4) if i == 0 else (kernel, 1)
            pad = (k - s) // 2 if i == 0 else k // 2
            layers += [nn.ConstantPad1d((pad, k - s - pad) if i == 0 else (pad - 1, k - pad), 0.0),
                       nn.Conv1d(c_in, c, k, stride=s), nn.ReLU(), nn.BatchNorm1d(c), nn.MaxPool1d(2)]
            length = (length // s) // 2 if i == 0 else length // 2
            c_in = c
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in * length, NUM_BINS)

    def frame_logits(self, frames: Tensor) -> Tensor:
        h = self.body(frames[:, None, :])  # (M, C, L)
        return self.head(self.dropout(h.flatten(1)))  # (M, 360)


def pitch_hcnn(channels: int = 48, layers: int = 4, kernel: int = 5, harmonics: Sequence[float] = DEFAULT_HARMONICS,
               hop_ms: float = 10.0, chunk: int = 1024, dropout: float = 0.0, acf: bool = False) -> PitchHCNN:
    """Harmonic-stack CNN pitch student: x (B, N) at 16 kHz -> logits (B, 1 + N // hop, 360).

    Params ~ H*C*k + (layers-1)*C*C*k + C + 1 (+ BatchNorm): channels 32 ~17k, 48 ~37k, 64 ~64k.
    acf: one more input channel, the frame's autocorrelation read at each bin's period (see
    HarmonicFrontend): what resolves f0 below ~200 Hz, where a 64 ms frame's spectrum
    barely separates the harmonics.
    """
    if not isinstance(acf, (bool, int)) or acf not in (0, 1):  # a spec's "acf=false" arrives as JSON false
        raise ValueError(f"acf must be true or false, got {acf!r}")
    return PitchHCNN(channels, layers, kernel, tuple(float(h) for h in harmonics), hop_ms, chunk, dropout, bool(acf))


def pitch_cnn(widths: Sequence[int] = (64, 16, 16, 16, 32, 32), kernel1: int = 256, kernel: int = 32,
              hop_ms: float = 10.0, chunk: int = 1024, dropout: float = 0.25) -> PitchCNN:
    """Narrow-CREPE pitch student (raw waveform): x (B, N) at 16 kHz -> logits (B, 1 + N // hop, 360)."""
    return PitchCNN(tuple(int(w) for w in widths), kernel1, kernel, hop_ms, chunk, dropout)
