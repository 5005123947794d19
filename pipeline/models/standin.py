"""A stand-in for a GPU speech teacher, for machines without a GPU.

A CUDA forward costs the host little: the Python thread launches kernels and then waits,
with the GIL released, while the device computes. ``GPUStandIn`` behaves the same way on a
CPU: a cheap real computation (one sample per frame through a fixed linear head: its output
depends on its input), a few hundred small ops that each take the GIL as a kernel launch
does, then a sleep, which releases the GIL, until the forward has taken as long as a
measured GPU forward would for the same input. What the host does around it (staging, copies, top-k, Arrow, part
files) therefore costs what it costs, and whether kdpipe overlaps it with the forward is
measurable on a 2-core laptop (``bench/teacher_throughput.py --preset standin``).

Default timing: wav2vec 2.0 large on one H200 in bf16, 93.8 ms per batch of 64 ten-second
clips at 16 kHz (measured 2026-12-04), i.e. 9.16 ns per input sample, scaled by the batch's
padded size.
"""

from __future__ import annotations

import time

import torch
from torch import nn

HOP = 320  # 20 ms output frames at 16 kHz, as wav2vec 2.0


class GPUStandIn(nn.Module):
    """x (B, N) waveform at 16 kHz, lengths (B,) samples -> logits (B, ceil(N / 320), C).

    The forward lasts ``seconds_per_sample * B * N`` seconds of wall time (at least its own
    compute time), most of it asleep with the GIL released."""

    level, modality, frame_shift_ms = "frame", "audio", 20.0
    kdpipe_preprocessing = {"modality": "audio", "sample_rate": 16000, "features": "none"}

    def __init__(self, seconds_per_sample: float, num_classes: int, launches: int = 0):
        super().__init__()
        self.seconds_per_sample = seconds_per_sample
        self.num_classes = num_classes
        self.launches = launches
        gen = torch.Generator().manual_seed(0)  # the same stand-in in every actor and rerun
        self.head = nn.Linear(2, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, 2, generator=gen))
            self.head.bias.copy_(torch.randn(num_classes, generator=gen))

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + HOP - 1) // HOP

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        b, n = x.shape
        first = x[:, ::HOP].unsqueeze(-1)  # (B, T', 1): each frame's first sample, a cheap real input
        feats = torch.cat([first, torch.log(first.abs() + 1e-4)], -1)  # (B, T', 2)
        logits = self.head(feats)  # (B, T', C)
        # The host's share of a GPU forward: one small op per kernel launch, each taking the GIL
        # back from whatever else the process runs (a thread that waits for it starves the device).
        h = feats.new_ones(8)
        for _ in range(self.launches):
            h = h * 1.0
        # The device's share: the rest of the measured forward time, asleep (GIL released).
        left = self.seconds_per_sample * b * n - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        return logits


def gpu_standin(ms_per_batch: float = 93.8, batch: int = 64, seconds: float = 10.0, num_classes: int = 32,
                sample_rate: int = 16000, launches: int = 700) -> GPUStandIn:
    """A GPU stand-in whose forward takes ``ms_per_batch`` for ``batch`` clips of ``seconds``
    at ``sample_rate`` (and proportionally for other padded batch sizes), of which the host
    spends ``launches`` small torch ops (an eager wav2vec 2.0 large under autocast runs several
    hundred ops, each taking the GIL to launch its kernels).

    x (B, N) waveform, lengths (B,) samples -> logits (B, ceil(N / 320), num_classes)."""
    return GPUStandIn(ms_per_batch / 1000.0 / (batch * seconds * sample_rate), num_classes, launches)
