"""``timm:NAME?weights=FILE`` and ``torchvision:NAME?weights=FILE``: image classifiers from a
local weights file (safetensors, or a state_dict read with ``torch.load(weights_only=True)``).

The architecture is built without pretrained weights (nothing is downloaded), then the file is
loaded strictly. ``num_classes`` is read from the classifier's weights in the file unless the
spec gives it; any other spec option goes to the constructor (``timm.create_model(NAME,
**options)`` / ``torchvision.models.get_model(NAME, **options)``).

Preprocessing, unless flags override it, is what each library records for the model:

- timm: ``timm.data.resolve_model_data_config(model)`` (the pretrained config: input size,
  interpolation, crop_pct, crop_mode, mean/std) as ``create_transform`` applies it at eval on a
  PIL image: ``Resize(floor(size / crop_pct))`` (shortest edge; "squash": both sides),
  ``CenterCrop(size)`` (torchvision's rounding), ``ToTensor``, ``Normalize``. ``crop_mode="border"``
  and non-square inputs are refused.
- torchvision: the weights enum's ``transforms()`` (``?transforms=IMAGENET1K_V1``; default
  ``DEFAULT``): ``ImageClassification(resize_size, crop_size, interpolation, mean, std)``,
  applied as torchvision's docs do, to the decoded uint8 tensor (backend "torchvision-v1";
  ``--image-backend pil`` for PIL images). Class names are the enum's categories when the
  model has as many classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.external import require
from pipeline.models.spec_types import SpecError
from pipeline.models.weights import load_state_dict


class ImageClassifier(nn.Module):
    """forward(x (B, 3, H, W) normalised, lengths None) -> logits (B, C)."""

    modality = "image"
    level = "utterance"
    frame_shift_ms = None

    def __init__(self, model: nn.Module, num_classes: int, preprocessing: dict, class_names: list[str] | None):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.kdpipe_preprocessing = preprocessing
        self.kdpipe_class_names = class_names

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x).float()


def _name(spec) -> str:
    return spec.source.split(":", 1)[1]


def _square(h: int, w: int, what: str) -> int:
    if h != w:
        raise SpecError(f"{what}: input {h}x{w} is not square; kdpipe's image inputs are square crops")
    return int(h)


def _load_strict(model: nn.Module, state: dict, spec, fallback=None) -> None:
    try:
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError as e:
        err = e
    if fallback is not None:  # timm's remapping of original (non-timm) checkpoints
        try:
            model.load_state_dict(fallback(state, model), strict=True)
            return
        except Exception:
            pass
    msg = str(err).splitlines()
    raise SpecError(f"{spec.weights}: weights do not fit {spec.source}: {' '.join(msg[:3])[:400]}") from None


# --------------------------------------------------------------------------------------------
# timm


def timm_preprocessing(cfg: dict, what: str) -> dict:
    """timm's resolved data config -> kdpipe's image preprocessing dict (eval transform)."""
    import math

    from pipeline.modalities.image import ImagePreprocessing

    size = _square(cfg["input_size"][1], cfg["input_size"][2], what)
    crop_pct = cfg.get("crop_pct") or 0.875
    mode = cfg.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise SpecError(f"{what}: timm crop_mode {mode!r} is not supported (center and squash are)")
    interp = cfg.get("interpolation") or "bilinear"
    if interp not in ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"):
        raise SpecError(f"{what}: timm interpolation {interp!r} is not supported")
    return ImagePreprocessing(resize=math.floor(size / crop_pct), crop=size, mean=tuple(cfg["mean"]),
                              std=tuple(cfg["std"]), resize_mode="shortest_edge" if mode == "center" else "exact",
                              resample=interp, crop_offset="round", backend="pil").to_dict()


def build_timm(spec) -> nn.Module:
    timm = require("timm", "timm")
    name = _name(spec)
    kwargs = dict(spec.kwargs)
    try:
        pcfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        pcfg = None
    if pcfg is None and not timm.is_model(name):
        raise SpecError(f"{spec.source}: timm has no model {name!r}")
    state = load_state_dict(spec.weights)
    if "num_classes" not in kwargs:
        head = pcfg.classifier if pcfg is not None else None
        head = head[0] if isinstance(head, (tuple, list)) else head
        w = state.get(f"{head}.weight") if head else None
        if w is None:
            raise SpecError(f"{spec.source}: cannot find the classifier ({head}.weight) in {spec.weights}; "
                            "give ?num_classes=N")
        kwargs["num_classes"] = int(w.shape[0])
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, RuntimeError, ValueError) as e:
        raise SpecError(f"{spec.source}: {type(e).__name__}: {e}") from None
    fallback = getattr(__import__(type(model).__module__, fromlist=["_"]), "checkpoint_filter_fn", None)
    _load_strict(model, state, spec, fallback)
    model.eval()
    prep = timm_preprocessing(timm.data.resolve_model_data_config(model), spec.source)
    names = None
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        if info.num_classes() == kwargs["num_classes"]:
            names = list(info.label_descriptions())
    return ImageClassifier(model, kwargs["num_classes"], prep, names)


# --------------------------------------------------------------------------------------------
# torchvision


def torchvision_preprocessing(transforms, what: str) -> dict:
    """torchvision's ``ImageClassification`` preset -> kdpipe's image preprocessing dict."""
    from torchvision.transforms import InterpolationMode

    from pipeline.modalities.image import ImagePreprocessing

    if type(transforms).__name__ != "ImageClassification":
        raise SpecError(f"{what}: the weights' transforms are {type(transforms).__name__}, not an image "
                        "classification preset")
    modes = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic",
             InterpolationMode.NEAREST: "nearest", InterpolationMode.NEAREST_EXACT: "nearest-exact"}
    if transforms.interpolation not in modes:
        raise SpecError(f"{what}: interpolation {transforms.interpolation} is not supported")
    return ImagePreprocessing(resize=int(transforms.resize_size[0]), crop=int(transforms.crop_size[0]),
                              mean=tuple(transforms.mean), std=tuple(transforms.std), resize_mode="shortest_edge",
                              resample=modes[transforms.interpolation], crop_offset="round",
                              backend="torchvision-v1").to_dict()


def build_torchvision(spec) -> nn.Module:
    tv = require("torchvision", "torchvision")
    name = _name(spec)
    kwargs = dict(spec.kwargs)
    enum_name = str(kwargs.pop("transforms", "DEFAULT"))
    try:
        weights_enum = tv.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise SpecError(f"{spec.source}: torchvision has no model {name!r}") from None
    try:
        weights = weights_enum[enum_name] if enum_name != "DEFAULT" else weights_enum.DEFAULT
    except KeyError:
        raise SpecError(f"{spec.source}: transforms={enum_name!r} is not one of "
                        f"{[w.name for w in weights_enum]} (or DEFAULT)") from None
    state = load_state_dict(spec.weights)
    if "num_classes" not in kwargs:
        with torch.device("meta"):
            probe = tv.models.get_model(name, weights=None, **kwargs)
        keys = [k for k, v in probe.state_dict().items() if k.endswith(".weight") and v.dim() >= 2]
        if not keys or keys[-1] not in state:
            raise SpecError(f"{spec.source}: cannot find the classifier in {spec.weights}; give ?num_classes=N")
        kwargs["num_classes"] = int(state[keys[-1]].shape[0])
    try:
        model = tv.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{spec.source}: {type(e).__name__}: {e}") from None
    _load_strict(model, state, spec)
    model.eval()
    prep = torchvision_preprocessing(weights.transforms(), spec.source)
    categories = weights.meta.get("categories")
    names = list(categories) if categories and len(categories) == kwargs["num_classes"] else None
    return ImageClassifier(model, kwargs["num_classes"], prep, names)


# --------------------------------------------------------------------------------------------
# spec entry points


def build(spec) -> nn.Module:
    return build_timm(spec) if spec.kind == "timm" else build_torchvision(spec)


def identity(spec) -> dict[str, Any]:
    from pipeline.fingerprint import file_digest

    return {"kind": spec.kind, "model": _name(spec), "kwargs": dict(spec.kwargs),
            "weights_sha256": file_digest(spec.weights)}
