"""Decoding and preprocessing per modality (audio, image).

Torch-free, so that decode workers import only what decoding needs; the torch side (the
frontends next to the model, pinned staging of batches) is in ``frontends`` and ``staging``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.modalities.audio import AUDIO_EXTENSIONS, AudioPreprocessing
from pipeline.modalities.errors import DEFAULT_LIMITS, DecodeError, DecodeLimits
from pipeline.modalities.image import IMAGE_EXTENSIONS, ImagePreprocessing

if TYPE_CHECKING:
    import numpy as np

Preprocessing = AudioPreprocessing | ImagePreprocessing


def preprocessing_from_dict(d: dict) -> Preprocessing:
    """{"modality": "audio"|"image", ...} -> the matching preprocessing dataclass."""
    modality = d.get("modality")
    if modality == "audio":
        return AudioPreprocessing.from_dict(d)
    if modality == "image":
        return ImagePreprocessing.from_dict(d)
    raise ValueError(f"preprocessing needs modality 'audio' or 'image', got {modality!r}")


def prepare(data: bytes, prep: Preprocessing, limits: DecodeLimits = DEFAULT_LIMITS
            ) -> list[tuple[tuple[int, int] | None, "np.ndarray"]]:
    """Encoded media -> [(chunk bounds or None, array)]: audio (N,) float32 at the model rate,
    image (crop, crop, 3) uint8, or with ``prep.decode == "gpu"`` a validated JPEG left
    encoded (image.EncodedImage, for the teacher actor to decode). Raises DecodeError
    (bounded by ``limits``)."""
    from pipeline.modalities.audio import prepare_waveform
    from pipeline.modalities.image import prepare_image, stage_image

    try:
        if isinstance(prep, AudioPreprocessing):
            return prepare_waveform(data, prep, limits)
        if prep.decode == "gpu":
            return [(None, stage_image(data, prep, limits))]
        return [(None, prepare_image(data, prep, limits))]
    except MemoryError:  # resampling or resizing a large (but allowed) input
        raise DecodeError("out_of_memory", "preparing the sample ran out of memory") from None


def chunk_key(key: str, bounds: tuple[int, int] | None) -> str:
    """Key of a chunk of a long recording: "KEY@START-END" in samples at the model's rate."""
    return key if bounds is None else f"{key}@{bounds[0]}-{bounds[1]}"


def media_extensions(modality: str) -> tuple[str, ...]:
    return AUDIO_EXTENSIONS if modality == "audio" else IMAGE_EXTENSIONS


__all__ = [
    "AUDIO_EXTENSIONS", "DEFAULT_LIMITS", "IMAGE_EXTENSIONS", "AudioPreprocessing", "DecodeError", "DecodeLimits",
    "ImagePreprocessing", "Preprocessing", "chunk_key", "prepare", "media_extensions", "preprocessing_from_dict",
]
