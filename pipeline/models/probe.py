"""A forward pass on a blank input, to learn a model's output shape before Ray starts."""

from __future__ import annotations

import torch

from pipeline.modalities import AudioPreprocessing, preprocessing_from_dict
from pipeline.modalities.frontends import make_frontend


def probe_output(model, prep: dict, seconds: float = 1.0) -> torch.Tensor:
    """Logits for two blank inputs: (2, C) at utterance level, (2, T, C) at frame level."""
    p = preprocessing_from_dict(prep)
    frontend = make_frontend(p)
    if isinstance(p, AudioPreprocessing):
        n = int(p.sample_rate * (p.crop_seconds or seconds))
        x, lengths = frontend(torch.zeros(2, n), torch.tensor([n, n]))
    else:
        x, lengths = frontend(torch.zeros(2, p.crop, p.crop, 3, dtype=torch.uint8))
    from pipeline.models.runner import ModelRunner

    model.eval()
    with torch.inference_mode():
        return ModelRunner.call(model, x, lengths)
