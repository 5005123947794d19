"""Images: decode (PIL), resize + centre-crop on CPU; normalisation next to the model.

CPU tasks ship uint8 (H, W, 3) crops, 4x fewer bytes than float32;
``pipeline.modalities.frontends.ImageFrontend`` converts a batch to normalised float
(B, 3, H, W) on the model's device. Nothing here imports torch unless a torchvision resize
backend is chosen: decode workers import only what decoding needs.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.modalities.errors import DEFAULT_LIMITS, DecodeError, DecodeLimits

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


RESIZE_MODES = ("shorter", "shortest_edge", "exact")
RESAMPLE_FILTERS = ("nearest", "nearest-exact", "bilinear", "bicubic", "lanczos", "box", "hamming")
CROP_OFFSETS = ("floor", "round")
RESIZE_BACKENDS = ("pil", "torchvision-v2", "torchvision-v1")
DECODE_PLACES = ("cpu", "gpu")
GPU_RESAMPLE = ("nearest", "nearest-exact", "bilinear", "bicubic")  # what a tensor resize offers
# Fields added after format 1 shipped: left out of to_dict() at their defaults, so the
# preprocessing dict (and so the fingerprint) of every existing run stays what it was.
_LATER_DEFAULTS = {"resize_mode": "shorter", "resample": "bilinear", "crop_offset": "floor", "backend": "pil",
                   "decode": "cpu"}
# How a sample's pixels travel from a decode task when decode="gpu" (the payload's "path")
PIXELS, JPEG, JPEG_PROGRESSIVE = 0, 1, 2


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image becomes model input: resize, centre crop (on CPU tasks), normalise (frontend).

    resize, resize_mode: "shorter" (kdpipe's default): the shorter side becomes ``resize``, the
      other ``round(side * scale)``; "shortest_edge": the same, but the longer side is
      ``int(resize * long / short)`` (torchvision's ``Resize(int)``, Hugging Face's
      ``{"shortest_edge": n}``); "exact": both sides become ``resize`` (aspect ratio not kept,
      Hugging Face's ``{"height": n, "width": n}``, timm's "squash").
    resample: the filter ("bilinear", "bicubic", "nearest", "nearest-exact", "lanczos", "box", "hamming").
    crop: centre crop of crop x crop pixels; crop_offset: how the top-left corner is rounded when
      the margin is odd: "floor" ((H - crop) // 2: kdpipe, Hugging Face) or "round"
      (``int(round((H - crop) / 2))``: torchvision's ``CenterCrop``, so timm and torchvision presets).
    backend: which implementation resizes: "pil" (PIL ``Image.resize``: kdpipe, timm, HF's
      ``*ImageProcessorPil``), "torchvision-v2" (``transforms.v2.functional.resize`` on the uint8
      tensor with antialias: Hugging Face's default image processors), "torchvision-v1"
      (``transforms.functional.resize`` on the uint8 tensor: torchvision's ``weights.transforms()``
      applied to a decoded tensor). They differ by a few grey levels, so a teacher is fed
      exactly what its own library would give it only with the matching backend.
    mean, std: applied by ``frontends.ImageFrontend`` to x / 255.
    decode: where JPEGs are decoded, resized and cropped: "cpu" (the decode tasks, as above) or
      "gpu" (the teacher actor, with nvJPEG and a torchvision tensor resize with antialias:
      pipeline.modalities.device_decode). Their pixels differ by a few grey levels, so the
      place is part of the identity; the decode tasks still validate every file, and decode
      on the CPU what the GPU decoder does not take (PNG, WebP, CMYK, broken JPEGs).
    """

    resize: int = 32
    crop: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize_mode: str = "shorter"
    resample: str = "bilinear"
    crop_offset: str = "floor"
    backend: str = "pil"
    decode: str = "cpu"

    def __post_init__(self):
        if self.resize <= 0 or self.crop <= 0 or self.crop > self.resize:
            raise ValueError(f"image preprocessing needs 0 < crop <= resize, got resize={self.resize} crop={self.crop}")
        for name, allowed in (("resize_mode", RESIZE_MODES), ("resample", RESAMPLE_FILTERS),
                              ("crop_offset", CROP_OFFSETS), ("backend", RESIZE_BACKENDS),
                              ("decode", DECODE_PLACES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"image {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.backend != "pil" and self.resample in ("box", "hamming", "lanczos"):
            raise ValueError(f"image resample {self.resample!r} needs backend 'pil' (torchvision resizes tensors "
                             "with nearest, bilinear or bicubic)")
        if self.decode == "gpu" and self.resample not in GPU_RESAMPLE:
            raise ValueError(f"image resample {self.resample!r} has no GPU implementation; decode on the CPU "
                             f"(--image-decode cpu) or resample with one of {GPU_RESAMPLE}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        for name, default in _LATER_DEFAULTS.items():
            if d[name] == default:
                del d[name]
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
        return img if img.mode == "RGB" else img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise DecodeError("image_too_large", str(e)) from None
    except MemoryError:
        raise DecodeError("out_of_memory", "decoding the image ran out of memory") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError("corrupt_image", f"{type(e).__name__}: {e}") from None


_PIL_FILTERS = {"nearest": Image.NEAREST, "nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR,
                "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def resized_size(w: int, h: int, prep: ImagePreprocessing) -> tuple[int, int]:
    """(width, height) after the resize step of ``prep`` for a w x h image."""
    if prep.resize_mode == "exact":
        return prep.resize, prep.resize
    if prep.resize_mode == "shortest_edge":
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(prep.resize * long / short)
        return (prep.resize, new_long) if w <= h else (new_long, prep.resize)
    scale = prep.resize / min(w, h)
    return max(prep.crop, round(w * scale)), max(prep.crop, round(h * scale))


def _crop_offset(size: int, crop: int, rule: str) -> int:
    return int(round((size - crop) / 2.0)) if rule == "round" else (size - crop) // 2


def resize_tensor(t, nh: int, nw: int, prep: ImagePreprocessing):
    """torchvision's resize of ``prep`` on uint8 tensors (..., 3, H, W) -> (..., 3, nh, nw), with
    antialias, on their device: the backend's own functional API (v1 or v2). For the "pil"
    backend (the GPU decode path's stand-in for PIL): v2, with PIL's NEAREST sampling pixel
    centres, which is torchvision's "nearest-exact"."""
    try:
        from torchvision.transforms import InterpolationMode
        if prep.backend == "torchvision-v1":
            from torchvision.transforms import functional as tvf
        else:
            from torchvision.transforms.v2 import functional as tvf
    except ImportError:
        raise ImportError(f"image backend {prep.backend!r} (or --image-decode gpu) needs torchvision: "
                          "pip install 'kdpipe[vision]'") from None
    modes = {"nearest": InterpolationMode.NEAREST, "nearest-exact": InterpolationMode.NEAREST_EXACT,
             "bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
    if prep.backend == "pil":
        modes["nearest"] = InterpolationMode.NEAREST_EXACT
    return tvf.resize(t, [nh, nw], interpolation=modes[prep.resample], antialias=True)


def _tensor_resize(img: Image.Image, nw: int, nh: int, prep: ImagePreprocessing) -> np.ndarray:
    """Resize with torchvision on the (3, H, W) uint8 tensor -> (nh, nw, 3) uint8."""
    import torch

    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)
    return resize_tensor(t, nh, nw, prep).permute(1, 2, 0).numpy()


def prepare_image(data: bytes, prep: ImagePreprocessing, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """bytes -> (crop, crop, 3) uint8: decode, resize (``prep.resize_mode`` / ``resample`` /
    ``backend``), centre crop (``prep.crop_offset``)."""
    img = decode_image(data, limits)
    w, h = img.size
    nw, nh = resized_size(w, h, prep)
    if prep.backend == "pil":
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), _PIL_FILTERS[prep.resample])
        arr = np.asarray(img, dtype=np.uint8)
    elif (nw, nh) != (w, h):
        arr = _tensor_resize(img, nw, nh, prep)
    else:
        arr = np.asarray(img, dtype=np.uint8)
    if (nw, nh) == (prep.crop, prep.crop):  # nothing to crop: the decoded array itself
        return arr if arr.flags.writeable else arr.copy()
    top, left = _crop_offset(nh, prep.crop, prep.crop_offset), _crop_offset(nw, prep.crop, prep.crop_offset)
    return arr[top: top + prep.crop, left: left + prep.crop].copy()  # (crop, crop, 3), contiguous, writable


@dataclass(frozen=True)
class EncodedImage:
    """A validated JPEG a decode task ships undecoded, for the teacher actor's GPU to decode."""

    data: bytes
    progressive: bool


def stage_image(data: bytes, prep: ImagePreprocessing, limits: DecodeLimits = DEFAULT_LIMITS
                ) -> np.ndarray | EncodedImage:
    """What a decode task ships for one image when ``prep.decode == "gpu"``: a whole,
    GPU-decodable JPEG within the pixel limit as its bytes (EncodedImage); anything else
    (PNG, WebP, CMYK or arithmetic-coded JPEGs, truncated or unreadable files) through
    ``prepare_image`` exactly as on the CPU path: a (crop, crop, 3) uint8 array, or the same
    DecodeError with the same reason."""
    from pipeline.modalities.jpeg import read_jpeg_header

    header = read_jpeg_header(data) if data else None
    if header is None or not header.gpu_decodable:
        return prepare_image(data, prep, limits)
    w, h = header.width, header.height
    if w * h > limits.max_image_pixels:  # the same check and words as decode_image's
        raise DecodeError("image_too_large", f"{w}x{h} = {w * h:,} pixels, above the limit of "
                                             f"{limits.max_image_pixels:,} (--max-image-pixels)")
    bomb = Image.MAX_IMAGE_PIXELS
    if w == 0 or h == 0 or (bomb and w * h > 2 * bomb):  # what PIL refuses even under a raised limit
        return prepare_image(data, prep, limits)
    return EncodedImage(bytes(data), header.progressive)
