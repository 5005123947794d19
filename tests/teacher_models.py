"""Teacher factories for tests, loaded through the public 'package.module:factory' spec like
any user's model: one that emits NaN for loud inputs, one that is slow."""

from __future__ import annotations

import time

import torch
from torch import nn

from pipeline.models.zoo import audio_cnn


class NaNOnLoud(nn.Module):
    """audio_cnn, except rows whose mean log-mel energy is above ``threshold`` get NaN logits."""

    def __init__(self, threshold: float, **kwargs):
        super().__init__()
        self.inner = audio_cnn(**kwargs)
        self.threshold = threshold
        self.num_classes, self.level, self.modality = self.inner.num_classes, self.inner.level, "audio"
        self.frame_shift_ms = self.inner.frame_shift_ms

    def forward(self, x, lengths):
        logits = self.inner(x, lengths)
        frames = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        energy = (x.mean(-1) * frames).sum(1) / lengths.clamp_min(1)
        loud = (energy > self.threshold).view(-1, *([1] * (logits.dim() - 1)))
        return torch.where(loud, torch.full_like(logits, float("nan")), logits)


def nan_on_loud(threshold: float = 0.0, **kwargs) -> NaNOnLoud:
    return NaNOnLoud(threshold, **kwargs)


class Slow(nn.Module):
    def __init__(self, delay: float, **kwargs):
        super().__init__()
        self.inner = audio_cnn(**kwargs)
        self.delay = delay
        self.num_classes, self.level, self.modality = self.inner.num_classes, self.inner.level, "audio"
        self.frame_shift_ms = self.inner.frame_shift_ms

    def forward(self, x, lengths):
        time.sleep(self.delay)
        return self.inner(x, lengths)


def slow_audio_cnn(delay: float = 0.5, **kwargs) -> Slow:
    return Slow(delay, **kwargs)
