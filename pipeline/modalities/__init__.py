"""Decoding and preprocessing per modality (audio, image)."""

from __future__ import annotations

from pipeline.modalities.audio import AUDIO_EXTENSIONS, AudioFrontend, AudioPreprocessing
from pipeline.modalities.errors import DecodeError
from pipeline.modalities.image import IMAGE_EXTENSIONS, ImageFrontend, ImagePreprocessing

Preprocessing = AudioPreprocessing | ImagePreprocessing


def preprocessing_from_dict(d: dict) -> Preprocessing:
    """{"modality": "audio"|"image", ...} -> the matching preprocessing dataclass."""
    modality = d.get("modality")
    if modality == "audio":
        return AudioPreprocessing.from_dict(d)
    if modality == "image":
        return ImagePreprocessing.from_dict(d)
    raise ValueError(f"preprocessing needs modality 'audio' or 'image', got {modality!r}")


def make_frontend(prep: Preprocessing):
    """The torch module that turns decoded batches into model input (runs on the model's device)."""
    return AudioFrontend(prep) if isinstance(prep, AudioPreprocessing) else ImageFrontend(prep)


def media_extensions(modality: str) -> tuple[str, ...]:
    return AUDIO_EXTENSIONS if modality == "audio" else IMAGE_EXTENSIONS


__all__ = [
    "AUDIO_EXTENSIONS", "IMAGE_EXTENSIONS", "AudioFrontend", "AudioPreprocessing", "DecodeError", "ImageFrontend",
    "ImagePreprocessing", "Preprocessing", "make_frontend", "media_extensions", "preprocessing_from_dict",
]
