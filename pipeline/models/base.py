"""The model conventions kdpipe relies on (zoo models follow them; foreign models may not).

A kdpipe model is a ``torch.nn.Module`` whose ``forward(x, lengths)`` takes the output of the
modality's frontend and returns logits:

- audio: x (B, T, F) features (log-mel/fbank) or (B, N) raw waveform when features="none";
  lengths (B,) valid frames (or samples) per row, the rest is padding.
- image: x (B, 3, H, W) normalised float; lengths is None.
- utterance/image level: logits (B, C).  Frame level: logits (B, T', C), where T' frames
  cover the input at ``frame_shift_ms`` milliseconds each.

Optional attributes (read with ``model_info``): ``num_classes``, ``level``, ``modality``,
``frame_shift_ms`` (frame level: output frame shift in ms of input time), a method
``output_lengths(lengths) -> (B,)`` mapping input lengths to output frames, and
``kdpipe_preprocessing`` (the preprocessing dict it expects, e.g. ``{"modality": "audio",
"sample_rate": 16000, "features": "none"}``; flags still override it).
Models without them still work: the caller supplies what it needs (flags or checkpoint config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelInfo:
    num_classes: int | None
    level: str | None
    modality: str | None
    frame_shift_ms: float | None


def model_info(model: nn.Module) -> ModelInfo:
    """What a model says about itself (None where it says nothing)."""
    return ModelInfo(
        num_classes=getattr(model, "num_classes", None),
        level=getattr(model, "level", None),
        modality=getattr(model, "modality", None),
        frame_shift_ms=getattr(model, "frame_shift_ms", None),
    )


def output_lengths(model: nn.Module, lengths: torch.Tensor, in_frames: int, out_frames: int) -> torch.Tensor:
    """Output frames per row for a frame-level model.

    Uses ``model.output_lengths`` when the model has it; otherwise scales proportionally:
    ceil(lengths * out_frames / in_frames), clipped to out_frames.
    """
    fn = getattr(model, "output_lengths", None)
    if callable(fn):
        return fn(lengths).clamp(max=out_frames).long()
    return torch.clamp(torch.ceil(lengths.double() * out_frames / max(in_frames, 1)).long(), max=out_frames)
