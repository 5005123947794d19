"""The error a sample is quarantined with, and the limits that keep decoding bounded."""

from __future__ import annotations

from dataclasses import dataclass


class DecodeError(Exception):
    """A sample that cannot be used; ``reason`` is a short category for the errors table."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeLimits:
    """What one sample may make a decode task allocate; anything larger is quarantined.

    max_image_pixels: width x height declared by an image header (checked before the pixels
        are decoded; an RGB image costs 3 bytes a pixel), reason ``image_too_large``.
    max_audio_seconds: decoded duration at the file's own rate (checked while reading, so a
        header that lies cannot get past it), reason ``audio_too_long``.
    max_member_bytes: one tar member's size (never read when above), ``member_too_large``.
    They bound resources, not results, so they are not part of the cache fingerprint.
    """

    max_image_pixels: int = 1 << 26  # 64 Mpx: ~192 MB of RGB
    max_audio_seconds: float = 3600.0
    max_member_bytes: int = 1 << 30

    def __post_init__(self):
        if self.max_image_pixels < 1 or self.max_audio_seconds <= 0 or self.max_member_bytes < 1:
            raise ValueError(f"decode limits must be positive: {self}")


DEFAULT_LIMITS = DecodeLimits()
