"""A training epoch's running totals, kept on the worker's device.

Reading a loss with ``float(loss)`` every step waits for the step to finish on the GPU, so
the host cannot queue the next one meanwhile; the totals here are added up on the device and
read once, at the epoch's end, summed over the workers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


class StepStats(NamedTuple):
    """One batch's loss terms, 0-d tensors on the device: the summed per-position hard (CE)
    and soft (KD) losses and how many positions (samples, or frames) each had."""

    hard_sum: torch.Tensor
    hard_n: torch.Tensor
    soft_sum: torch.Tensor
    soft_n: torch.Tensor


class EpochStats:
    """Running totals of one worker's epoch: loss per batch, CE and KD per position (on the
    device), samples and seconds waited for input (on the host)."""

    def __init__(self, device: torch.device):
        self.device = device
        # loss sum, batches, hard_sum, hard_n, soft_sum, soft_n
        self._totals = torch.zeros(6, dtype=torch.float64, device=device)
        self._one = torch.ones((), dtype=torch.float64, device=device)
        self.samples = 0
        self.data_wait = 0.0  # seconds this worker waited for its next batch: high means input-bound

    def add(self, loss: torch.Tensor, stats: StepStats, samples: int) -> None:
        """One step: ``loss`` (0-d, the batch's mean), its StepStats, its number of samples.
        Queued on the device, never waited for."""
        self._totals += torch.stack([loss.detach().to(torch.float64), self._one,
                                     *(s.to(torch.float64) for s in stats)])
        self.samples += samples

    def reduce(self) -> dict:
        """The totals summed over all workers (one all-reduce, one read): loss (mean per batch),
        ce and kd (mean per position, None without any), samples, data_wait (seconds, summed)."""
        t = torch.cat([self._totals, torch.tensor([self.samples, self.data_wait], dtype=torch.float64,
                                                  device=self.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        loss, batches, hard_sum, hard_n, soft_sum, soft_n, samples, wait = t.tolist()
        return {"loss": loss / max(batches, 1), "ce": hard_sum / hard_n if hard_n else None,
                "kd": soft_sum / soft_n if soft_n else None, "samples": int(samples), "data_wait": wait}
