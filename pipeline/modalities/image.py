"""Images: decode (PIL), resize + centre-crop on CPU; normalisation next to the model.

CPU tasks ship uint8 (H, W, 3) crops, 4x fewer bytes than float32; ``ImageFrontend``
converts a batch to normalised float (B, 3, H, W) on the model's device.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from pipeline.modalities.errors import DEFAULT_LIMITS, DecodeError, DecodeLimits

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ImagePreprocessing:
    """resize: shorter side is resized to this; crop: centre crop of crop x crop pixels."""

    resize: int = 32
    crop: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.resize <= 0 or self.crop <= 0 or self.crop > self.resize:
            raise ValueError(f"image preprocessing needs 0 < crop <= resize, got resize={self.resize} crop={self.crop}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return {"modality": "image", **d}

    @classmethod
    def from_dict(cls, d: dict) -> "ImagePreprocessing":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"modality"}
        if unknown:
            raise ValueError(f"unknown image preprocessing field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


def decode_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Image.Image:
    """Encoded image bytes -> RGB PIL image.

    Raises DecodeError: "empty_image", "corrupt_image", "image_too_large" (the header declares
    more than ``limits.max_image_pixels``, checked before any pixel is decoded; Pillow's own
    decompression-bomb check lands here too) or "out_of_memory".
    """
    if not data:
        raise DecodeError("empty_image", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise DecodeError("image_too_large", f"{w}x{h} = {w * h:,} pixels, above the limit of "
                                                 f"{limits.max_image_pixels:,} (--max-image-pixels)")
        img.load()  # decode now, so truncated files fail here and not later
        return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise DecodeError("image_too_large", str(e)) from None
    except MemoryError:
        raise DecodeError("out_of_memory", "decoding the image ran out of memory") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError("corrupt_image", f"{type(e).__name__}: {e}") from None


def prepare_image(data: bytes, prep: ImagePreprocessing, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """bytes -> (crop, crop, 3) uint8: decode, resize shorter side to prep.resize, centre crop."""
    img = decode_image(data, limits)
    w, h = img.size
    scale = prep.resize / min(w, h)
    nw, nh = max(prep.crop, round(w * scale)), max(prep.crop, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - prep.crop) // 2, (nh - prep.crop) // 2
    img = img.crop((left, top, left + prep.crop, top + prep.crop))
    return np.asarray(img, dtype=np.uint8)


class ImageFrontend(nn.Module):
    """forward(x (B, H, W, 3) uint8) -> (B, 3, H, W) float, (x / 255 - mean) / std."""

    def __init__(self, prep: ImagePreprocessing):
        super().__init__()
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None):
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std, None
