"""JPEGs decoded, resized and centre-cropped on the teacher's device (image decode="gpu").

The decode tasks validate every file and ship the whole, GPU-decodable JPEGs undecoded
(pipeline.modalities.image.stage_image); the teacher actor turns a batch of them into model
input here, on its device:

    1. decode   ``torchvision.io.decode_jpeg(list, device=...)``: on a CUDA device nvJPEG,
                batched, through the hardware JPEG engines where the GPU has them (A100, H100,
                H200) for baseline files, nvJPEG's CUDA path for progressive ones
    2. resize   ``image.resize_tensor`` (torchvision, antialias; the backend's API, as the CPU
                path's torchvision backends use it) on the uint8 tensors, images of one size as
                one batch; then the centre crop (the CPU path's sizes and offsets)
    3. rows     a (B, crop, crop, 3) uint8 tensor on the device, as the CPU path's rows would
                be after their copy (frontends.ImageFrontend normalises both)

The batch goes through 1-2 in chunks of at most ``CHUNK_PIXELS`` decoded pixels, so a batch of
large photos needs no more device memory than a batch of thumbnails (torchvision resizes in
float32: ~16 bytes per decoded pixel at its peak).

A file nvJPEG refuses is decoded on the host with the CPU path (``prepare_image``: the same
pixels as a CPU-decoded cache), and so is a chunk the device has no memory for; one that
fails there too becomes an error row for its key with the CPU path's reason. None costs the
batch. The same code runs on a CPU device (torchvision decodes there with libjpeg-turbo),
which is how it is tested without a GPU.

On CUDA, torchvision decodes on a private stream of its own and orders only the caller's
stream after it, not it after the caller's stream; nvJPEG's hardware path does not even wait
for that private stream (pytorch/vision#9606, meta-pytorch/torchcodec#1634). The output
tensors come from the caching allocator on the caller's stream, so memory that kernels still
queued there will read could be written over. So the caller's stream is drained on the host
before each decode call. Callers run this on a side stream of their own
(pipeline.teacher.predictor), so the drain waits for that stream only, never for another
call's forward; memory freed on other streams is reused only once their recorded events have
passed (the allocator's record_stream rule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.modalities.errors import DEFAULT_LIMITS, DecodeError
from pipeline.modalities.image import (JPEG, JPEG_PROGRESSIVE, PIXELS, ImagePreprocessing, _crop_offset, prepare_image,
                                       resize_tensor, resized_size)
from pipeline.modalities.jpeg import read_jpeg_header
from pipeline.modalities.payload import _combined

CPU_FALLBACK = 3  # a path code beside image.PIXELS / JPEG / JPEG_PROGRESSIVE: decoded on the actor's host
# Its decode task checked the file's size against the run's own limits already
_VALIDATED = dataclasses.replace(DEFAULT_LIMITS, max_image_pixels=1 << 62)
CHUNK_PIXELS = 64 << 20  # decoded pixels per decode + resize step (~1 GB of device memory at its peak)


@dataclass
class DeviceBatch:
    """x: (B_ok, crop, crop, 3) uint8 on the device, the rows of ``ok`` in order;
    ok: (B,) bool; errors: {row: DecodeError} for the rows not in x;
    paths: (B,) int8 how each row was decoded (image.PIXELS: by its decode task on the CPU,
    JPEG / JPEG_PROGRESSIVE: on the device, CPU_FALLBACK: on the actor's host)."""

    x: torch.Tensor
    ok: np.ndarray
    errors: dict[int, DecodeError]
    paths: np.ndarray


def _drain(device: torch.device) -> None:
    if device.type == "cuda":  # see the module docstring: nvJPEG's hardware path ignores stream order
        torch.cuda.current_stream(device).synchronize()


def _decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """JPEG files (1-D uint8 host tensors) -> (3, H, W) uint8 tensors on ``device``, or the
    exception for each file the decoder refused (the batch call first; one by one only when it fails)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        return []
    _drain(device)
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # torch.OutOfMemoryError included: the caller decodes these on the host
        _settle(device)
    out: list[torch.Tensor | Exception] = []
    for e in encoded:
        _drain(device)
        try:
            out.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as err:
            _settle(device)
            out.append(err)
    return out


def _settle(device: torch.device) -> None:
    """After a failed decode call: whatever it queued on its own stream is finished before its
    memory can be handed out again."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resize_crop(images: list[torch.Tensor], prep: ImagePreprocessing) -> torch.Tensor:
    """(3, H_i, W_i) uint8 images on one device -> (N, 3, crop, crop) uint8 in their order:
    the resize of ``prep`` (sizes and offsets as on the CPU path; image.resize_tensor), the
    images of one size resized as one batch."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault((img.shape[1], img.shape[2]), []).append(i)
    order, parts = [], []
    for (h, w), idx in by_size.items():
        batch = torch.stack([images[i] for i in idx]) if len(idx) > 1 else images[idx[0]].unsqueeze(0)
        nw, nh = resized_size(w, h, prep)
        if (nw, nh) != (w, h):
            batch = resize_tensor(batch, nh, nw, prep)
        top, left = _crop_offset(nh, prep.crop, prep.crop_offset), _crop_offset(nw, prep.crop, prep.crop_offset)
        parts.append(batch[:, :, top:top + prep.crop, left:left + prep.crop])
        order += idx
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    if order != sorted(order):  # back to the input order: one gather
        out = out.index_select(0, torch.from_numpy(np.argsort(order)).to(out.device))
    return out


def _chunks(rows: list[int], pixels: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of ``rows`` of at most ``budget`` decoded pixels (at least one row each)."""
    out, cur, total = [], [], 0
    for i, px in zip(rows, pixels):
        if cur and total + px > budget:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += px
    return out + ([cur] if cur else [])


def _on_host(data: bytes, prep: ImagePreprocessing) -> np.ndarray:
    """The CPU path for one file the device did not decode: (crop, crop, 3) uint8, or its DecodeError."""
    try:
        return prepare_image(data, prep, _VALIDATED)
    except MemoryError:
        raise DecodeError("out_of_memory", "preparing the sample ran out of memory") from None


def decode_batch(col, prep: ImagePreprocessing, device: torch.device | str,
                 chunk_pixels: int = CHUNK_PIXELS) -> DeviceBatch:
    """A payload column of image decode="gpu" rows (payload.ENCODED_TYPE: B samples) -> model
    input rows on ``device`` (DeviceBatch). Run it on the stream the result is made on (on
    CUDA, a side stream: the caller orders its compute stream after it)."""
    device = torch.device(device)
    arr = _combined(col)
    n = len(arr)
    paths = arr.field("path").to_numpy(zero_copy_only=False).astype(np.int8)
    unknown = ~np.isin(paths, (PIXELS, JPEG, JPEG_PROGRESSIVE))
    if unknown.any():  # the decode tasks write nothing else: a payload from elsewhere
        raise ValueError(f"image payload: unknown decode path code(s) {sorted(set(paths[unknown].tolist()))}")
    data = arr.field("data")
    offsets = np.frombuffer(data.buffers()[1], dtype=np.int64)[data.offset:data.offset + n + 1] if n else None
    values = np.frombuffer(data.buffers()[2], dtype=np.uint8) if n else np.zeros(0, np.uint8)
    base = int(offsets[0]) if n else 0
    # One copy of the batch's bytes into torch memory, the rows views of it (decode_jpeg wants
    # writable, contiguous uint8 tensors; Arrow's buffers are read-only).
    host = torch.from_numpy(values[base:int(offsets[-1]) if n else 0].copy())

    def row(i: int) -> torch.Tensor:
        return host[offsets[i] - base:offsets[i + 1] - base]

    crop = prep.crop
    cpu_rows: dict[int, np.ndarray] = {i: row(i).numpy().reshape(crop, crop, 3) for i in range(n) if paths[i] == PIXELS}
    errors: dict[int, DecodeError] = {}
    jpeg = [i for i in range(n) if paths[i] != PIXELS]
    sizes = []  # decoded pixels of each, from its frame header (usually within the first 64 KB)
    for i in jpeg:
        h = (read_jpeg_header(row(i)[:65536].numpy().tobytes(), frame_only=True)
             or read_jpeg_header(row(i).numpy().tobytes(), frame_only=True))
        sizes.append(h.width * h.height if h else 0)
    dev_idx, dev_parts = [], []
    for chunk in _chunks(jpeg, sizes, chunk_pixels):
        decoded = _decode([row(i) for i in chunk], device)
        ok = [(i, img) for i, img in zip(chunk, decoded) if isinstance(img, torch.Tensor)]
        refused = [i for i, img in zip(chunk, decoded) if not isinstance(img, torch.Tensor)]
        del decoded
        if ok:
            try:
                dev_parts.append(resize_crop([img for _, img in ok], prep))
                dev_idx += [i for i, _ in ok]
            except torch.OutOfMemoryError:  # this chunk on the host instead, as the CPU path would
                _settle(device)
                refused += [i for i, _ in ok]
        del ok
        for i in refused:  # the CPU path, the same pixels as a CPU-decoded cache
            try:
                cpu_rows[i] = _on_host(row(i).numpy().tobytes(), prep)
                paths[i] = CPU_FALLBACK
            except DecodeError as e:
                errors[i] = e
    ok = np.array([i not in errors for i in range(n)], dtype=bool)
    dev = None
    if dev_parts:
        dev = (torch.cat(dev_parts) if len(dev_parts) > 1 else dev_parts[0]).permute(0, 2, 3, 1)
    if not cpu_rows and dev is not None and len(dev_idx) == n:  # the usual batch: every row from the device
        return DeviceBatch(dev.contiguous(), ok, errors, paths)
    x = torch.empty((int(ok.sum()), crop, crop, 3), dtype=torch.uint8, device=device)
    position = np.cumsum(ok) - 1  # row i's place in x
    if dev is not None:
        x[torch.from_numpy(position[dev_idx]).to(device)] = dev
    if cpu_rows:
        cpu_idx = sorted(cpu_rows)
        x[torch.from_numpy(position[cpu_idx]).to(device)] = torch.from_numpy(
            np.stack([cpu_rows[i] for i in cpu_idx])).to(device)
    return DeviceBatch(x, ok, errors, paths)
