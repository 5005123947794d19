"""Teachers from the ecosystem, used as they are: Hugging Face, timm, torchvision, ONNX.

    hf:PATH[?task=...&image_backend=...]          transformers model dir (save_pretrained + processor config)
    timm:NAME?weights=FILE[&num_classes=N&...]     timm architecture + a local weights file
    torchvision:NAME?weights=FILE[&transforms=E]   torchvision architecture + a local weights file
    onnx:FILE                                      an ONNX graph, run by ONNX Runtime

PATH / FILE are local or ``s3://``; nothing is fetched from a model hub, and no code shipped
with a model is run. Each adapter returns an ``nn.Module`` that follows kdpipe's model
conventions (``pipeline/models/base.py``: ``forward(x, lengths)``, ``num_classes``, ``level``,
``modality``, ``frame_shift_ms``, ``output_lengths``) and also carries

- ``kdpipe_preprocessing``: the preprocessing dict that feeds it what its own library's
  processor would (None for ONNX: flags give it), and
- ``kdpipe_class_names``: class names where the model records them (else None).

``pipeline.models.spec`` dispatches to ``parse`` / ``build`` / ``identity`` / ``describe`` here
for the kinds in ``KINDS``. The libraries are optional extras; a missing one is a one-line
``SpecError`` naming the extra to install.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import parse_qsl

from pipeline.models.spec_types import EXTERNAL_KINDS, ModelSpec, SpecError

PREFIXES = ("hf:", "timm:", "torchvision:", "onnx:")
KINDS = EXTERNAL_KINDS
EXTRAS = {"transformers": "hf", "timm": "vision", "torchvision": "vision", "onnxruntime": "onnx"}


def is_external(spec: str) -> bool:
    return spec.startswith(PREFIXES)


def require(module: str, kind: str):
    """Import an optional dependency, or raise a one-line SpecError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0], kind)
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise SpecError(f"{kind}: teachers need {module.split('.')[0]} ({why}); "
                        f"install the extra: pip install 'kdpipe[{extra}]'") from None


def _value(v: str) -> Any:
    import json

    try:
        return json.loads(v)
    except ValueError:
        return v


def parse(text: str):
    """'hf:PATH?k=v' etc. -> ModelSpec(kind, source='KIND:TARGET', kwargs, weights)."""
    from pipeline import storage

    kind, _, rest = text.partition(":")
    target, _, query = rest.partition("?")
    kwargs = {k: _value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    if not target:
        raise SpecError(f"model spec {text!r}: nothing after '{kind}:'")
    if kind in ("hf", "onnx"):
        path = target
        if not storage.exists(path):
            raise SpecError(f"model spec {text!r}: {path!r} does not exist")
        if kind == "onnx" and kwargs:
            raise SpecError(f"model spec {text!r}: onnx: takes no options (preprocessing comes from flags)")
        return ModelSpec(kind=kind, source=f"{kind}:{path}", kwargs=kwargs, weights=path)
    weights = kwargs.pop("weights", None)
    if weights is None:
        raise SpecError(f"model spec {text!r}: {kind}: needs a local weights file, '{kind}:NAME?weights=FILE' "
                        "(safetensors or a weights-only state_dict; kdpipe downloads nothing)")
    weights = str(weights)
    if not storage.exists(weights):
        raise SpecError(f"model spec {text!r}: weights file {weights!r} does not exist")
    return ModelSpec(kind=kind, source=f"{kind}:{target}", kwargs=kwargs, weights=weights)


def absolute(text: str) -> str:
    """The spec with its local path (model dir, ONNX file, weights=) made absolute."""
    from urllib.parse import quote, unquote_plus

    from pipeline import storage

    kind, _, rest = text.partition(":")
    target, sep, query = rest.partition("?")
    if kind in ("hf", "onnx") and target:
        target = storage.absolute(target)
    parts = []
    for part in query.split("&") if sep else []:
        name, eq, value = part.partition("=")
        if name == "weights" and eq:
            value = quote(storage.absolute(unquote_plus(value)), safe="/:")
        parts.append(f"{name}{eq}{value}")
    return f"{kind}:{target}" + (f"?{'&'.join(parts)}" if sep else "")


def _module(kind: str):
    name = {"hf": "hf", "timm": "timm_tv", "torchvision": "timm_tv", "onnx": "onnx"}[kind]
    return importlib.import_module(f"pipeline.models.external.{name}")


def build(spec):
    """The adapter module (CPU, eval mode) for an external spec."""
    return _module(spec.kind).build(spec)


def identity(spec) -> dict[str, Any]:
    """What the fingerprint covers: kind, architecture/config, options, weights digest (not paths)."""
    return _module(spec.kind).identity(spec)


def describe(spec, model) -> dict[str, Any]:
    """The describe_model fields an adapter knows: preprocessing and class names on top of model_info."""
    out = {}
    prep = getattr(model, "kdpipe_preprocessing", None)
    if prep is not None:
        out["preprocessing"] = dict(prep)
    names = getattr(model, "kdpipe_class_names", None)
    if names is not None:
        out["class_names"] = list(names)
    return out


def digest_files(uris: list[str]) -> str:
    """sha256 over several files' digests (a sharded checkpoint is one weights digest)."""
    import hashlib

    from pipeline.fingerprint import file_digest

    if len(uris) == 1:
        return file_digest(uris[0])
    h = hashlib.sha256()
    for u in uris:
        h.update(f"{u.rsplit('/', 1)[-1]}:{file_digest(u)}\n".encode())
    return h.hexdigest()


def local_copy(uri: str, names: list[str] | None = None) -> str:
    """A local directory holding the files directly under ``uri`` (all, or only ``names``):
    ``uri`` itself when it is local, else an ``s3://`` copy cached under the temp dir, keyed by
    the listing (names, sizes, ETags), so actors on one node download it once and a changed
    model is downloaded again."""
    import hashlib
    import json
    import os
    import shutil
    import tempfile

    from pipeline import storage

    if not storage.is_remote(uri):
        return os.path.abspath(uri)
    fs, path = storage.filesystem(uri)
    entries = sorted((i["name"].rsplit("/", 1)[-1], i.get("size"), str(i.get("ETag") or i.get("mtime") or ""))
                     for i in fs.ls(path, detail=True) if i.get("type") == "file")
    if names is not None:
        entries = [e for e in entries if e[0] in names]
    if not entries:
        raise FileNotFoundError(f"{uri}: no files there")
    key = hashlib.sha256(json.dumps([uri, entries]).encode()).hexdigest()[:20]
    root = os.path.join(tempfile.gettempdir(), "kdpipe-models", key)
    if os.path.isdir(root):
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(root), prefix=".tmp-")
    for name, _, _ in entries:
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(storage.read_bytes(storage.join(uri, name)))
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
