"""Model specs: how a teacher or student is named, built, loaded and identified.

Four forms, accepted wherever a SPEC is (``--teacher``, ``--student``):

1. A checkpoint directory written by jobs/train_student.py (``config.json`` +
   ``model.safetensors``), local or ``s3://``: any trained model can teach (self-training).
2. ``package.module:factory`` with keyword arguments and optional weights, in URL-query form:
   ``pipeline.models.zoo:audio_cnn?width=64&level=frame&weights=teacher.safetensors``
   (values are parsed as JSON where they parse, else kept as strings), or in YAML/JSON as
   ``{factory: ..., kwargs: {...}, weights: ...}``. Weights are a safetensors file or a
   state_dict loaded with ``torch.load(weights_only=True)``: never an arbitrary pickle.
3. A TorchScript archive (``torch.jit.save``).
4. Teachers from the ecosystem, as they are: ``hf:PATH``, ``timm:NAME?weights=FILE``,
   ``torchvision:NAME?weights=FILE``, ``onnx:FILE`` (``pipeline/models/external/``).

Trust (docs/recipes.md, "Security"): a spec string the user typed names its factory, and
that is the user's decision. A checkpoint is data: the factory its ``config.json`` names is
only imported when it is one of kdpipe's registered model factories (``pipeline.models``,
``zoo.FACTORIES``) or lies in a module the user trusts explicitly (``--trust-module``).
Anything else is refused before any import.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import zipfile
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_plus

import torch
from torch import nn

from pipeline import storage
from pipeline.models import external
from pipeline.models.base import model_info
from pipeline.models.spec_types import ModelSpec, SpecError
from pipeline.models.weights import load_state_dict

CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_FORMAT = "kdpipe.checkpoint/1"
OWN_MODELS = "pipeline.models"  # the package whose registered factories a checkpoint may name
# "package.module:factory" (+ "?query"): recognised before anything is looked up as a path,
# so a factory spec whose weights live on s3:// is never mistaken for a URL.
FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\?.*)?$", re.S)
MODULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# Seed of a model built without weights when no other seed is asked for: every teacher actor
# (and every rerun under the same fingerprint) builds the same random teacher.
TEACHER_INIT_SEED = 0


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v


def _is_torchscript(uri: str) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(storage.read_bytes(uri))) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def check_trust_modules(modules) -> tuple[str, ...]:
    """--trust-module values -> a tuple of dotted module names; SpecError on a malformed one."""
    out = []
    for m in modules or ():
        m = str(m).strip()
        if not MODULE_RE.match(m):
            raise SpecError(f"--trust-module {m!r}: expected a dotted module name such as mypkg.models")
        out.append(m)
    return tuple(out)


def _in_modules(module: str, modules) -> bool:
    return any(module == m or module.startswith(m + ".") for m in modules)


def check_checkpoint_factory(target: str, trust: tuple[str, ...], where: str) -> None:
    """Refuse (SpecError) a factory named by a checkpoint unless it is one of kdpipe's registered
    model factories or lies in a module the user trusts. Nothing outside ``pipeline.models``
    is imported to decide."""
    module, sep, attr = str(target).partition(":")
    if not sep or not MODULE_RE.match(module) or not re.fullmatch(r"[A-Za-z]\w*", attr):
        raise SpecError(f"{where}: names factory {target!r}, which is not 'package.module:factory'")
    if _in_modules(module, trust):
        return
    if _in_modules(module, (OWN_MODELS,)):
        from pipeline.models.zoo import FACTORIES

        try:
            fn = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            fn = None
        if fn is not None and FACTORIES.get(attr) is fn:
            return
    raise SpecError(
        f"{where}: names factory {target!r}, which is not one of kdpipe's model factories "
        f"({OWN_MODELS}.zoo); a checkpoint cannot choose code to run. If you trust module {module!r}, "
        f"pass --trust-module {module}")


def parse_spec(spec: str | dict, trust=()) -> ModelSpec:
    """Resolve a SPEC string (or dict) into a ModelSpec; raises SpecError naming the spec.

    trust: modules (``--trust-module``) whose factories a checkpoint's config.json may name,
    besides kdpipe's own registered ones. A factory spec typed by the user is trusted as typed.
    """
    trust = check_trust_modules(trust)
    if isinstance(spec, dict):
        if "factory" not in spec:
            raise SpecError(f"model spec {spec!r}: a mapping needs a 'factory' key (package.module:factory)")
        unknown = set(spec) - {"factory", "kwargs", "weights"}
        if unknown:
            raise SpecError(f"model spec {spec!r}: unknown key(s) {', '.join(sorted(unknown))}")
        return _factory_spec(spec["factory"], dict(spec.get("kwargs") or {}), spec.get("weights"), trust)
    spec = str(spec).strip()
    if not spec:
        raise SpecError("empty model spec")
    if external.is_external(spec):  # hf: timm: torchvision: onnx: (typed by the user: trusted as typed)
        return external.parse(spec)
    if FACTORY_RE.match(spec):
        target, _, query = spec.partition("?")
        kwargs = {k: _parse_value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
        weights = kwargs.pop("weights", None)
        return _factory_spec(target, kwargs, weights, trust)
    try:
        if storage.exists(storage.join(spec, CHECKPOINT_CONFIG)):
            return _checkpoint_spec(spec, trust)
        fs, path = storage.filesystem(spec)
        is_file = fs.isfile(path)
    except (SpecError, FileNotFoundError):
        raise
    except Exception as e:  # an unreachable endpoint, a protocol fsspec does not know, ...
        raise SpecError(f"model spec {spec!r}: cannot be read ({storage.describe_error(e)})") from None
    if is_file:
        if _is_torchscript(spec):
            return ModelSpec(kind="torchscript", source=spec, trust=trust)
        raise SpecError(f"model spec {spec!r}: a file that is not a TorchScript archive; "
                        "pass weights as 'module:factory?weights=FILE'")
    raise SpecError(
        f"model spec {spec!r}: not a checkpoint directory (no {CHECKPOINT_CONFIG}), not a TorchScript file, "
        "and not 'package.module:factory'"
    )


def absolute_spec(spec: str | dict | None) -> str | dict | None:
    """The same SPEC with its local paths (checkpoint directory, TorchScript file, ``weights=``)
    made absolute, so that it resolves to the same files in a process with another working
    directory (Ray Train workers). Anything else is returned unchanged."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        if spec.get("weights"):
            return {**spec, "weights": storage.absolute(str(spec["weights"]))}
        return spec
    text = str(spec).strip()
    if external.is_external(text):
        return external.absolute(text)
    if not FACTORY_RE.match(text):
        return storage.absolute(text) if not storage.is_remote(text) and os.path.exists(text) else spec
    target, sep, query = text.partition("?")
    if not sep:
        return spec
    parts = []
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if name == "weights" and eq:
            value = quote(storage.absolute(unquote_plus(value)), safe="/:")
        parts.append(f"{name}{eq}{value}")
    return f"{target}?{'&'.join(parts)}"


def _factory_spec(target: str, kwargs: dict, weights: str | None, trust: tuple[str, ...] = ()) -> ModelSpec:
    if not FACTORY_RE.match(str(target)) or "?" in str(target):
        raise SpecError(f"model spec {target!r}: expected 'package.module:factory'")
    if weights is not None:
        try:
            found = storage.exists(str(weights))
        except Exception as e:
            raise SpecError(f"model spec {target!r}: weights {weights!r} cannot be read "
                            f"({storage.describe_error(e)})") from None
        if not found:
            raise SpecError(f"model spec {target!r}: weights file {weights!r} does not exist")
    return ModelSpec(kind="factory", source=target, kwargs=kwargs, weights=str(weights) if weights else None,
                     trust=trust)


def _checkpoint_spec(uri: str, trust: tuple[str, ...] = ()) -> ModelSpec:
    cfg_uri = storage.join(uri, CHECKPOINT_CONFIG)
    try:
        cfg = json.loads(storage.read_bytes(cfg_uri))
    except ValueError as e:
        raise SpecError(f"{cfg_uri}: not valid JSON ({e})") from None
    if cfg.get("format") != CHECKPOINT_FORMAT:
        raise SpecError(f"{cfg_uri}: not a kdpipe checkpoint (format={cfg.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    for key in ("model", "num_classes", "modality", "level", "preprocessing"):
        if key not in cfg:
            raise SpecError(f"{cfg_uri}: missing field {key!r}")
    model = cfg["model"]
    if not isinstance(model, dict) or not isinstance(model.get("factory"), str) or \
            not isinstance(model.get("kwargs") or {}, dict):
        raise SpecError(f"{cfg_uri}: field 'model' must be {{'factory': 'package.module:factory', 'kwargs': {{...}}}}")
    check_checkpoint_factory(model["factory"], trust, cfg_uri)  # before anything is imported
    weights = storage.join(uri, CHECKPOINT_WEIGHTS)
    if not storage.exists(weights):
        raise SpecError(f"{uri}: checkpoint has no {CHECKPOINT_WEIGHTS}")
    return ModelSpec(kind="checkpoint", source=uri, kwargs=dict(model.get("kwargs") or {}),
                     weights=weights, config=cfg, trust=trust)


def resolve_factory(target: str):
    """The callable behind "module:function" (imports the module: only for trusted targets)."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"model spec {target!r}: cannot import {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SpecError(f"model spec {target!r}: {module_name!r} has no attribute {attr!r}") from None


def build_model(spec: ModelSpec, load_weights: bool = True, seed: int = TEACHER_INIT_SEED) -> nn.Module:
    """Instantiate the model of a spec on CPU (eval mode not set).

    The initial weights are drawn under ``seed`` (without touching the caller's RNG state):
    teachers keep the default, so every actor builds the same random teacher; a student passes
    its --seed, so two seeds give two initialisations and one seed always the same.
    """
    if spec.kind in external.KINDS:
        return external.build(spec)
    if spec.kind == "torchscript":
        return torch.jit.load(io.BytesIO(storage.read_bytes(spec.source)), map_location="cpu")
    target = spec.factory
    if spec.kind == "checkpoint":  # again where the model is built (a worker gets the spec string)
        check_checkpoint_factory(target, spec.trust, storage.join(spec.source, CHECKPOINT_CONFIG))
    factory = resolve_factory(target)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = factory(**spec.kwargs)
    except TypeError as e:
        raise SpecError(f"model spec {spec.describe()}: {e}") from None
    if load_weights and spec.weights:
        state = load_state_dict(spec.weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SpecError(
                f"{spec.weights}: weights do not fit {target}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
    return model


def identity(spec: ModelSpec) -> dict[str, Any]:
    """What the fingerprint covers for one model: kind, factory, kwargs, weights digest."""
    from pipeline.fingerprint import file_digest

    if spec.kind == "torchscript":
        return {"kind": "torchscript", "sha256": file_digest(spec.source)}
    if spec.kind in external.KINDS:
        return external.identity(spec)
    target = spec.factory
    return {
        "kind": "module",
        "factory": target,
        "kwargs": spec.kwargs,
        "weights_sha256": file_digest(spec.weights) if spec.weights else None,
    }


def describe_model(spec: ModelSpec, model: nn.Module) -> dict[str, Any]:
    """modality / level / num_classes / frame_shift_ms / preprocessing / class_names, from the
    checkpoint config where there is one, else from the model's attributes (None if unknown)."""
    info = model_info(model)
    out = {"modality": info.modality, "level": info.level, "num_classes": info.num_classes,
           "frame_shift_ms": info.frame_shift_ms, "preprocessing": None, "class_names": None}
    out.update(external.describe(spec, model))  # a model that declares its input (kdpipe_preprocessing)
    if spec.config:
        for key in out:
            if spec.config.get(key) is not None:
                out[key] = spec.config[key]
    return out


def save_checkpoint(directory: str, model: nn.Module, factory: str, kwargs: dict, config: dict) -> None:
    """Write a kdpipe checkpoint directory (local path): model.safetensors + config.json.

    config: modality, level, num_classes, frame_shift_ms, preprocessing, class_names, and any
    training facts (step, epoch, fingerprint of the soft-target cache).
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, os.path.join(directory, CHECKPOINT_WEIGHTS))
    body = {"format": CHECKPOINT_FORMAT, "model": {"factory": factory, "kwargs": kwargs}, **config}
    with open(os.path.join(directory, CHECKPOINT_CONFIG), "w") as f:
        json.dump(body, f, indent=1, sort_keys=True, default=str)
