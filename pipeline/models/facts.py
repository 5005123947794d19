"""What a model is, resolved once, before Ray starts: the one sequence every planner runs
(teacher planning, student planning, evaluation).

    declare   parse the spec, build the model, read what it says about itself (its checkpoint's
              config.json, else its attributes and its adapter's preprocessing)
    probe     a forward pass on a blank input of the preprocessing it will get: the output's
              level (utterance or frame) and number of classes, whatever the model declared
    resolve   both, for one model whose preprocessing comes from it (or from the flags)

Errors are ConfigErrors naming the flag and the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipeline.config import ConfigError
from pipeline.models.probe import probe_output
from pipeline.models.spec import build_model, describe_model, parse_spec
from pipeline.models.spec_types import ModelSpec, SpecError


@dataclass(frozen=True)
class Declared:
    """A built model and what it says about itself (None where it says nothing)."""

    text: str  # the spec as the user gave it
    spec: ModelSpec
    model: nn.Module = field(repr=False, compare=False)
    modality: str | None
    level: str | None
    num_classes: int | None
    frame_shift_ms: float | None
    preprocessing: dict | None
    class_names: tuple[str, ...] | None

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@dataclass(frozen=True)
class ModelFacts:
    """A model with the preprocessing it gets and what a forward pass showed."""

    declared: Declared
    modality: str
    level: str  # "utterance" ((B, C) out) or "frame" ((B, T, C) out)
    num_classes: int
    frame_shift_ms: float | None  # frame level: as declared (None: the model does not say)
    preprocessing: dict  # the resolved preprocessing (cli.resolve_preprocessing's form)


def declare(text: str, trust: tuple, flag: str) -> Declared:
    """Parse and build ``text`` (a spec, trusted modules ``trust``) and read what it declares."""
    try:
        spec = parse_spec(text, trust)
        model = build_model(spec)
    except (SpecError, FileNotFoundError) as e:
        raise ConfigError(f"{flag} {text}: {e}") from None
    d = describe_model(spec, model)
    names = d["class_names"]
    return Declared(text, spec, model, d["modality"], d["level"], d["num_classes"], d["frame_shift_ms"],
                    d["preprocessing"], tuple(names) if names else None)


def probe(d: Declared, prep: dict, flag: str) -> tuple[str, int]:
    """(level, num_classes) of ``d``'s output on a blank input of ``prep``."""
    try:
        out = probe_output(d.model, prep)
    except Exception as e:
        raise ConfigError(f"{flag} {d.text}: forward pass on a blank {prep.get('modality')} input failed "
                          f"({type(e).__name__}: {e}); check the preprocessing flags") from None
    if out.dim() not in (2, 3):
        raise ConfigError(f"{flag} {d.text}: outputs {tuple(out.shape)} on a blank input; a model outputs (B, C) "
                          "logits (utterance level) or (B, T, C) (frame level)")
    return ("frame" if out.dim() == 3 else "utterance"), int(out.shape[-1])


def resolve(d: Declared, modality: str, prep: dict, flag: str, need_frame_shift: bool = True) -> ModelFacts:
    """``d`` probed with ``prep`` (already resolved: cli.resolve_preprocessing); a frame-level
    model must declare its frame shift unless ``need_frame_shift`` is False."""
    level, num_classes = probe(d, prep, flag)
    if level == "frame" and need_frame_shift and not d.frame_shift_ms:
        raise ConfigError(f"{flag} {d.text}: a frame-level model must declare frame_shift_ms")
    return ModelFacts(d, modality, level, num_classes, d.frame_shift_ms if level == "frame" else None, prep)


def frame_stride(teacher_ms: float, student_ms: float, where: str) -> int:
    """Student frames per teacher frame: the teacher's frame shift must be a whole multiple of
    the student's (every k-th student frame is then distilled)."""
    ratio = teacher_ms / student_ms
    if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
        raise ConfigError(f"{where}: the teacher's frames are {teacher_ms} ms apart but the model's are {student_ms} "
                          "ms; its frame rate must match the teacher's or be a whole multiple of it (every k-th of "
                          "its frames is then distilled)")
    return int(round(ratio))
