"""What a model spec resolves to, and its error: the types pipeline.models.spec and the
external loaders (pipeline.models.external) share, apart from both, so neither imports the
other to name them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.fingerprint import canonical_json

EXTERNAL_KINDS = ("hf", "timm", "torchvision", "onnx")  # models from the ecosystem (pipeline.models.external)


class SpecError(ValueError):
    """A model spec that cannot be resolved; the message names the spec and the problem."""


@dataclass
class ModelSpec:
    """A resolved spec. ``kind`` is "checkpoint", "factory", "torchscript" or one of ``EXTERNAL_KINDS``."""

    kind: str
    source: str  # checkpoint dir, "module:factory", or TorchScript file
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    config: dict[str, Any] | None = None  # checkpoint config.json
    trust: tuple[str, ...] = ()  # modules the user trusts (--trust-module), checked again at build

    @property
    def factory(self) -> str | None:
        """The "module:function" this spec builds with (None for TorchScript)."""
        if self.kind == "checkpoint":
            return self.config["model"]["factory"]
        return self.source if self.kind == "factory" else None

    def describe(self) -> str:
        if self.kind == "factory" or (self.kind in EXTERNAL_KINDS and self.kwargs):
            return f"{self.source}({canonical_json(self.kwargs)})"
        return self.source
