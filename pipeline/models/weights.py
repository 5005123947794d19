"""Model weights from files, never code: safetensors, or a torch.save'd state_dict read with
``weights_only=True`` (docs/recipes.md, Security)."""

from __future__ import annotations

import io

import torch

from pipeline import storage
from pipeline.models.spec_types import SpecError


def load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file or a torch.save'd state_dict (weights_only=True)."""
    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors") or data[8:9] == b"{":  # u64 header length, then a JSON header
        from safetensors.torch import load as st_load

        try:
            return st_load(data)
        except Exception as e:
            if uri.endswith(".safetensors"):
                raise SpecError(f"{uri}: unreadable safetensors file ({e})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise SpecError(f"{uri}: not a safetensors file or a weights-only state_dict ({type(e).__name__}: {e})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SpecError(f"{uri}: expected a state_dict of tensors")
    return obj
