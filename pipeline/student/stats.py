"""A training epoch's running totals, kept on the worker's device.

Reading a loss with ``float(loss)`` every step waits for the step to finish on the GPU, so
the host cannot queue the next one meanwhile; the totals here are added up on the device and
read once, at the epoch's end, summed over the workers.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, NamedTuple

import torch
import torch.distributed as dist


class StepStats(NamedTuple):
    """One batch's loss terms, 0-d tensors on the device: the summed per-position hard (CE)
    and soft (KD) losses and how many positions (samples, or frames) each had."""

    hard_sum: torch.Tensor
    hard_n: torch.Tensor
    soft_sum: torch.Tensor
    soft_n: torch.Tensor


# Where a worker's epoch goes, in seconds (host clocks). The input thread: waiting for Ray
# Data's next block, drawing shuffled batches from the buffered blocks, collating them. The
# step loop: waiting for the input thread's next batch, copying it to the device (queued, not
# waited for), the step (the host's share: launching its work; the device's share shows as the
# rest of the epoch, as the loop blocks once the device's queue is full).
PHASES = ("block_wait", "shuffle", "collate", "input_wait", "h2d", "step")


class EpochStats:
    """Running totals of one worker's epoch: loss per batch, CE and KD per position (on the
    device), samples and the seconds of each of PHASES (on the host)."""

    def __init__(self, device: torch.device):
        self.device = device
        # loss sum, batches, hard_sum, hard_n, soft_sum, soft_n
        self._totals = torch.zeros(6, dtype=torch.float64, device=device)
        self._one = torch.ones((), dtype=torch.float64, device=device)
        self.samples = 0
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @property
    def data_wait(self) -> float:
        """Seconds this worker waited for its next batch: high means input-bound."""
        return self.seconds["input_wait"]

    @data_wait.setter
    def data_wait(self, value: float) -> None:
        self.seconds["input_wait"] = value

    def timed(self, items: Iterable, phase: str) -> Iterator:
        """``items``, the time spent in each of their next() added to ``phase``."""
        it = iter(items)
        while True:
            t = time.monotonic()
            try:
                x = next(it)
            except StopIteration:
                self.seconds[phase] += time.monotonic() - t
                return
            self.seconds[phase] += time.monotonic() - t
            yield x

    def call(self, fn, phase: str):
        """``fn``, its time added to ``phase``."""
        def timed_fn(*args, **kwargs):
            t = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.monotonic() - t
        return timed_fn

    def add(self, loss: torch.Tensor, stats: StepStats, samples: int) -> None:
        """One step: ``loss`` (0-d, the batch's mean), its StepStats, its number of samples.
        Queued on the device, never waited for."""
        self._totals += torch.stack([loss.detach().to(torch.float64), self._one,
                                     *(s.to(torch.float64) for s in stats)])
        self.samples += samples

    def reduce(self) -> dict:
        """The totals summed over all workers (one all-reduce, one read): loss (mean per batch),
        ce and kd (mean per position, None without any), samples, data_wait and each of PHASES
        (seconds, summed over the workers)."""
        # the input thread's shuffle time includes the block waits it made
        seconds = {**self.seconds, "shuffle": self.seconds["shuffle"] - self.seconds["block_wait"]}
        host = [self.samples] + [seconds[p] for p in PHASES]
        t = torch.cat([self._totals, torch.tensor(host, dtype=torch.float64, device=self.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        loss, batches, hard_sum, hard_n, soft_sum, soft_n, samples, *phases = t.tolist()
        return {"loss": loss / max(batches, 1), "ce": hard_sum / hard_n if hard_n else None,
                "kd": soft_sum / soft_n if soft_n else None, "samples": int(samples),
                "data_wait": phases[PHASES.index("input_wait")], "phases": dict(zip(PHASES, phases))}
