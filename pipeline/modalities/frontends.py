"""The torch modules that turn a decoded batch into model input, on the model's device.

Decode tasks ship raw waveforms (float32) or uint8 crops (pipeline.modalities.payload); the
features are computed batched next to the model, on the GPU when there is one. Kept apart
from the decoders so that decode workers never import torch.
"""

from __future__ import annotations

import math

import torch
import torchaudio
from torch import nn

from pipeline.modalities.audio import AudioPreprocessing
from pipeline.modalities.image import ImagePreprocessing


def make_frontend(prep: AudioPreprocessing | ImagePreprocessing) -> nn.Module:
    """The torch module that turns decoded batches into model input (runs on the model's device)."""
    return AudioFrontend(prep) if isinstance(prep, AudioPreprocessing) else ImageFrontend(prep)


class AudioFrontend(nn.Module):
    """Batched feature extraction next to the model (GPU when available).

    forward(wave (B, N) float32 zero-padded, lengths (B,) samples)
      -> (features (B, T, F), feature lengths (B,)) for logmel/fbank,
         (wave (B, N), lengths) for features="none".
    Log-mel frames: T = N // hop + 1 (centred STFT, zero-padded at the edges); a row's valid
    frames are lengths // hop + 1. Edge padding is zeros, like batch padding, so a row's
    features are the same alone or in a padded batch.
    """

    def __init__(self, prep: AudioPreprocessing):
        super().__init__()
        self.prep = prep
        self.hop = prep.hop_samples
        win = int(round(prep.sample_rate * prep.win_ms / 1000))
        self.mel = None
        if prep.features == "logmel":
            n_fft = 1 << max(0, math.ceil(math.log2(win)))
            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=prep.sample_rate, n_fft=n_fft, win_length=win, hop_length=self.hop,
                n_mels=prep.n_mels, power=2.0, center=True, pad_mode="constant",
            )

    def feature_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        if self.prep.features == "none":
            return lengths
        if self.prep.features == "fbank":
            win = int(round(self.prep.sample_rate * self.prep.win_ms / 1000))
            return torch.clamp((lengths - win) // self.hop + 1, min=1)
        return lengths // self.hop + 1

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prep.features == "none":
            return wave, lengths
        feat_len = self.feature_lengths(lengths)
        if self.prep.features == "logmel":
            feats = self.mel(wave.float())  # (B, F, T)
            feats = torch.log(feats + 1e-6).transpose(1, 2)  # (B, T, F)
        else:
            rows = []
            for b in range(wave.shape[0]):
                n = int(lengths[b])
                rows.append(torchaudio.compliance.kaldi.fbank(
                    wave[b, :n].float().unsqueeze(0) * 32768.0, num_mel_bins=self.prep.n_mels,
                    frame_length=self.prep.win_ms, frame_shift=self.prep.hop_ms,
                    sample_frequency=self.prep.sample_rate, dither=0.0,
                ))
            feats = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T, F)
        # Zero the padded frames so that no statistic sees them.
        t = torch.arange(feats.shape[1], device=feats.device)
        mask = (t.unsqueeze(0) < feat_len.to(feats.device).unsqueeze(1)).unsqueeze(-1)
        return feats * mask, feat_len


class ImageFrontend(nn.Module):
    """forward(x (B, H, W, 3) uint8) -> (B, 3, H, W) float, (x / 255 - mean) / std."""

    def __init__(self, prep: ImagePreprocessing):
        super().__init__()
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None):
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std, None
