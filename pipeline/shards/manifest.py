"""The run manifest (``manifest.json``): what a soft-target run directory holds.

Run-level facts (format version, teacher and fingerprint, modality, level, preprocessing, k,
classes, frame shift, encoding, software versions) plus one record per input shard.
Per-shard completion is also written as a small ``_status/<name>.json`` sidecar right after the
shard's files, so a run killed between two manifest rewrites loses no finished shard.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import storage
from pipeline.shards.schema import FORMAT_NAME, FORMAT_VERSION, LEVELS
from pipeline.softtargets import id_dtype

MANIFEST_FILE = "manifest.json"
STATUS_DIR = "_status"
SHARDS_DIR = "shards"
ERRORS_DIR = "errors"
ENCODINGS = {"parquet": ".parquet", "webdataset": ".tar"}
MODALITIES = ("audio", "image")

REQUIRED_FIELDS = (
    "format", "format_version", "fingerprint", "teacher", "modality", "level", "preprocessing",
    "k", "num_classes", "frame_shift_ms", "encoding", "id_dtype", "shards", "software", "created",
)
SHARD_FIELDS = ("input", "output", "errors", "rows", "error_rows", "sha256", "bytes", "status", "frames")


class FormatError(ValueError):
    """A soft-target run, manifest or shard that is corrupt, foreign or inconsistent.

    The message always names the file at fault and the problem.
    """


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    """Versions of the packages that shape the soft targets."""
    import numpy
    import pyarrow
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "pyarrow": pyarrow.__version__, "numpy": numpy.__version__}
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:  # readers do not need Ray
        pass
    try:
        from importlib.metadata import version

        versions["kdpipe"] = version("kdpipe")
    except Exception:
        versions["kdpipe"] = "unknown"
    return versions


@dataclass
class ShardRecord:
    """One input shard's entry in the manifest."""

    input: str
    output: str  # relative to the run directory, e.g. "shards/shard-0001.parquet"
    errors: str  # relative, e.g. "errors/shard-0001.parquet"
    rows: int
    error_rows: int
    sha256: str  # of the output file's bytes
    bytes: int
    status: str = "complete"
    frames: int = 0  # total frames at frame level (0 otherwise)


@dataclass
class Manifest:
    """Everything about a run except the soft targets themselves."""

    fingerprint: str
    teacher: dict[str, Any]
    modality: str
    level: str
    preprocessing: dict[str, Any]
    k: int
    num_classes: int
    encoding: str
    id_dtype: str
    frame_shift_ms: float | None = None
    class_names: list[str] | None = None
    shards: dict[str, ShardRecord] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=software_versions)
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    runs: list[dict[str, Any]] = field(default_factory=list)  # one summary per pseudo-label run
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["shards"] = {name: asdict(rec) for name, rec in sorted(self.shards.items())}
        return json.dumps(d, indent=1, sort_keys=True)

    def key_facts(self) -> dict[str, Any]:
        """The facts copied into each Parquet shard's schema metadata."""
        return {
            "format": self.format, "format_version": self.format_version, "fingerprint": self.fingerprint,
            "modality": self.modality, "level": self.level, "k": self.k, "num_classes": self.num_classes,
            "id_dtype": self.id_dtype, "frame_shift_ms": self.frame_shift_ms,
        }

    @property
    def total_rows(self) -> int:
        return sum(r.rows for r in self.shards.values() if r.status == "complete")


def _require(d: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in d]
    if missing:
        raise FormatError(f"{where}: missing field(s) {', '.join(missing)}")


def parse_manifest(text: str, uri: str) -> Manifest:
    """Parse and validate manifest JSON; ``uri`` names the file in every error."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{uri}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{uri}: expected a JSON object, got {type(d).__name__}")
    if d.get("format") != FORMAT_NAME:
        raise FormatError(f"{uri}: not a kdpipe soft-target manifest (format={d.get('format')!r}, expected {FORMAT_NAME!r})")
    _require(d, REQUIRED_FIELDS, uri)
    if d["format_version"] != FORMAT_VERSION:
        raise FormatError(
            f"{uri}: unsupported format_version {d['format_version']!r}; this kdpipe reads version {FORMAT_VERSION}"
        )
    if d["level"] not in LEVELS:
        raise FormatError(f"{uri}: level {d['level']!r} is not one of {LEVELS}")
    if d["modality"] not in MODALITIES:
        raise FormatError(f"{uri}: modality {d['modality']!r} is not one of {MODALITIES}")
    if d["encoding"] not in ENCODINGS:
        raise FormatError(f"{uri}: encoding {d['encoding']!r} is not one of {tuple(ENCODINGS)}")
    for name in ("k", "num_classes"):
        if not isinstance(d[name], int) or d[name] < 1:
            raise FormatError(f"{uri}: {name} must be a positive integer, got {d[name]!r}")
    if d["k"] > d["num_classes"]:
        raise FormatError(f"{uri}: k={d['k']} exceeds num_classes={d['num_classes']}")
    if d["id_dtype"] != id_dtype(d["num_classes"]).name:
        raise FormatError(f"{uri}: id_dtype {d['id_dtype']!r} does not fit num_classes={d['num_classes']} "
                          f"(expected {id_dtype(d['num_classes']).name!r})")
    if not isinstance(d["shards"], dict):
        raise FormatError(f"{uri}: shards must be an object keyed by shard name, got {type(d['shards']).__name__}")
    if d["level"] == "frame" and not d["frame_shift_ms"]:
        raise FormatError(f"{uri}: frame-level run without frame_shift_ms")
    shards = {}
    for name, rec in d["shards"].items():
        if not isinstance(rec, dict):
            raise FormatError(f"{uri}: shard {name!r} must be an object, got {type(rec).__name__}")
        _require(rec, SHARD_FIELDS, f"{uri}: shard {name!r}")
        shards[name] = ShardRecord(**{k: rec[k] for k in ShardRecord.__dataclass_fields__ if k in rec})
    d["shards"] = shards
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in d.items() if k in known})


def load_manifest(run_uri: str) -> Manifest | None:
    """The manifest of a run directory merged with its status sidecars; None if absent."""
    uri = storage.join(run_uri, MANIFEST_FILE)
    if not storage.exists(uri):
        return None
    manifest = parse_manifest(storage.read_bytes(uri).decode("utf-8"), uri)
    for status_uri in storage.listdir(storage.join(run_uri, STATUS_DIR)):
        if not status_uri.endswith(".json"):
            continue
        try:
            rec = json.loads(storage.read_bytes(status_uri))
            name = rec.pop("name")
            _require(rec, SHARD_FIELDS, status_uri)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{status_uri}: unreadable shard status ({e!r})") from None
        if rec.get("fingerprint", manifest.fingerprint) != manifest.fingerprint:
            continue  # a status left by another fingerprint never counts
        fields = ShardRecord.__dataclass_fields__
        manifest.shards.setdefault(name, ShardRecord(**{k: v for k, v in rec.items() if k in fields}))
    return manifest


def save_manifest(run_uri: str, manifest: Manifest) -> None:
    manifest.updated = now_iso()
    storage.atomic_write_bytes(storage.join(run_uri, MANIFEST_FILE), manifest.to_json().encode("utf-8"))


def write_status(run_uri: str, name: str, record: ShardRecord, fingerprint: str) -> None:
    body = {"name": name, "fingerprint": fingerprint, **asdict(record)}
    storage.atomic_write_bytes(storage.join(run_uri, STATUS_DIR, f"{name}.json"), json.dumps(body).encode())
