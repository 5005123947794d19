"""A batch's host side on its way to the device: payload column -> (reused, pinned) tensor.

A copy to a CUDA device can only be asynchronous from page-locked memory, and allocating
page-locked memory is slow (a system call and page pinning per allocation), so callers that
copy batch after batch keep a ``StagingBuffer`` each and write every batch into it.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.modalities.payload import fill_payload, payload_shape


class StagingBuffer:
    """A grow-only host buffer that batches are written into and copied to the device from.

    pin: page-locked (for asynchronous copies to CUDA). The buffer is reused for every batch
    and reallocated only when a batch needs more bytes than any before (then with 25 % to
    spare, so a slowly growing padded length does not reallocate every time). Not
    thread-safe: one buffer per thread or per call in flight.
    """

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._buf: torch.Tensor | None = None  # (capacity,) uint8
        self.allocations = 0  # how many times memory was (re)allocated

    def view(self, shape: tuple[int, ...], dtype: np.dtype | torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` / ``dtype`` (numpy's or torch's) over the buffer (contents undefined)."""
        tdtype = dtype if isinstance(dtype, torch.dtype) else torch.from_numpy(np.zeros(0, dtype)).dtype
        nbytes = int(np.prod(shape)) * tdtype.itemsize
        if self._buf is None or self._buf.numel() < nbytes:
            cap = max(nbytes, int(1.25 * (self._buf.numel() if self._buf is not None else 0)), 64)
            self._buf = torch.empty(cap, dtype=torch.uint8, pin_memory=self.pin)
            self.allocations += 1
        return self._buf[:nbytes].view(tdtype).view(shape)


def payload_batch(col, prep, pin: bool = False, multiple: int = 1, staging: StagingBuffer | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of the payload column -> model input on the host.

    audio: (B, N) float32 zero-padded and lengths (B,) int64, N = the longest clip rounded up to
    a multiple of ``multiple`` samples; image: (B, H, W, 3) uint8 and None. Written into
    ``staging`` when given (the tensor is a view of it: valid until the next batch is written
    there), else into a fresh tensor (page-locked if ``pin``).
    """
    shape, dtype = payload_shape(col, prep, multiple)
    if staging is not None:
        x = staging.view(shape, dtype)
    else:
        x = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, pin_memory=pin)
    lengths = fill_payload(col, prep, x.numpy())
    return x, (torch.from_numpy(lengths) if lengths is not None else None)
