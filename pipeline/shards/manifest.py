"""The run manifest (``manifest.json``): what a soft-target run directory holds.

Run-level facts (format version, teacher and fingerprint, modality, level, preprocessing, k,
classes, frame shift, encoding, software versions), the summaries of the jobs that wrote it,
and a pointer to the commit log (``pipeline.shards.commitlog``) that lists the committed
shards. Rewriting it is the commit point: a shard counts once a log segment that the
manifest lists records it.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline import storage
from pipeline.shards.schema import FORMAT_NAME, FORMAT_VERSION, LEVELS
from pipeline.shards.schema import id_dtype

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
ERRORS_DIR = "errors"
COMMITS_DIR = "_commits"
PARTS_DIR = "_parts"
ENCODINGS = {"parquet": ".parquet", "webdataset": ".tar"}
MODALITIES = ("audio", "image")

REQUIRED_FIELDS = (
    "format", "format_version", "fingerprint", "teacher", "modality", "level", "preprocessing",
    "k", "num_classes", "frame_shift_ms", "encoding", "id_dtype", "commits", "software", "created",
)
RECORD_FIELDS = ("name", "input", "output", "errors", "rows", "error_rows", "frames", "sha256", "bytes",
                 "errors_sha256", "errors_bytes")
# A shard name is a file stem (with parent folders joined by "__" where stems collide): never
# a path, so a record can only point inside its run directory.
_NAME_RE = re.compile(r"^[^/\\\x00]+$")


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


@dataclass(frozen=True)
class ShardRecord:
    """One committed input shard: where its files are and what they hold (a commit-log line)."""

    name: str
    input: str  # canonical URI of the input shard (storage.canonical_uri)
    output: str  # relative to the run directory, e.g. "shards/shard-0001.parquet"
    errors: str  # relative, e.g. "errors/shard-0001.parquet"
    rows: int
    error_rows: int
    frames: int  # total frames at frame level (0 otherwise)
    sha256: str  # of the output file's bytes
    bytes: int
    errors_sha256: str
    errors_bytes: int
    node: str = ""  # the Ray node that wrote the files
    committed: str = ""  # ISO time of the commit
    reasons: dict = field(default_factory=dict)  # error rows by reason

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "ShardRecord":
        """Validated record from a parsed JSON object; FormatError naming ``where``."""
        if not isinstance(d, dict):
            raise FormatError(f"{where}: a shard record must be an object, got {type(d).__name__}")
        missing = [f for f in RECORD_FIELDS if f not in d]
        if missing:
            raise FormatError(f"{where}: shard record {d.get('name')!r} is missing field(s) {', '.join(missing)}")
        name = d["name"]
        if not isinstance(name, str) or not _NAME_RE.match(name) or name.startswith("."):
            raise FormatError(f"{where}: bad shard name {name!r}")
        for f in ("rows", "error_rows", "frames", "bytes", "errors_bytes"):
            if not isinstance(d[f], int) or d[f] < 0:
                raise FormatError(f"{where}: shard {name!r}: {f} must be a non-negative integer, got {d[f]!r}")
        exts = tuple(ENCODINGS.values())
        if d["output"] not in tuple(f"{SHARDS_DIR}/{name}{e}" for e in exts):
            raise FormatError(f"{where}: shard {name!r}: output {d['output']!r} is not {SHARDS_DIR}/{name}.*")
        if d["errors"] != f"{ERRORS_DIR}/{name}.parquet":
            raise FormatError(f"{where}: shard {name!r}: errors {d['errors']!r} is not {ERRORS_DIR}/{name}.parquet")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class RunFacts:
    """What a worker needs to encode or read a shard of a run; small, so it travels with tasks
    instead of every task opening the manifest."""

    fingerprint: str
    modality: str
    level: str
    k: int
    num_classes: int
    encoding: str
    id_dtype: str
    frame_shift_ms: float | None

    def key_facts(self) -> dict[str, Any]:
        """The facts copied into each Parquet shard's schema metadata."""
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
            "modality": self.modality, "level": self.level, "k": self.k, "num_classes": self.num_classes,
            "id_dtype": self.id_dtype, "frame_shift_ms": self.frame_shift_ms,
        }

    def shard_file(self, name: str) -> str:
        return f"{SHARDS_DIR}/{name}{ENCODINGS[self.encoding]}"

    @staticmethod
    def errors_file(name: str) -> str:
        return f"{ERRORS_DIR}/{name}.parquet"


@dataclass
class Manifest:
    """Everything about a run except the soft targets themselves.

    ``shards`` holds the committed records once the run is opened (read from the commit log,
    not from manifest.json); ``commits`` is the log pointer written into manifest.json.
    """

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
    commits: dict[str, Any] = field(default_factory=lambda: {"index": None, "log": [], "seq": 0})
    software: dict[str, str] = field(default_factory=software_versions)
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    runs: list[dict[str, Any]] = field(default_factory=list)  # one summary per pseudo-label run
    input_options: dict[str, Any] = field(default_factory=dict)  # how Parquet inputs were read (key/data column)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    shards: dict[str, ShardRecord] = field(default_factory=dict, compare=False)

    def to_json(self) -> str:
        # Field by field (all plain JSON values), leaving out the shards: asdict would first
        # deep-copy every shard record (~60 us each), and the manifest is saved every few
        # seconds of a run: 6 s a save at 100,000 shards.
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "shards"}
        return json.dumps(d, indent=1, sort_keys=True)

    def facts(self) -> RunFacts:
        return RunFacts(self.fingerprint, self.modality, self.level, self.k, self.num_classes, self.encoding,
                        self.id_dtype, self.frame_shift_ms)

    def key_facts(self) -> dict[str, Any]:
        return self.facts().key_facts()

    @property
    def total_rows(self) -> int:
        return sum(r.rows for r in self.shards.values())


def _require(d: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in d]
    if missing:
        raise FormatError(f"{where}: missing field(s) {', '.join(missing)}")


def _check_commits(c: Any, uri: str) -> None:
    if not isinstance(c, dict) or not isinstance(c.get("log"), list) or not isinstance(c.get("seq"), int):
        raise FormatError(f"{uri}: commits must be {{'index': FILE or null, 'log': [FILE, ...], 'seq': N}}")
    for f in ([c.get("index")] if c.get("index") is not None else []) + c["log"]:
        if not isinstance(f, str) or not re.fullmatch(rf"{COMMITS_DIR}/[A-Za-z0-9_.-]+\.jsonl", f) or ".." in f:
            raise FormatError(f"{uri}: commit file {f!r} is not a file under {COMMITS_DIR}/")


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
    _require(d, ("format_version",), uri)
    if d.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{uri}: unsupported format_version {d.get('format_version')!r}; this kdpipe reads version {FORMAT_VERSION}"
            + (" (a version 1 run: rerun pseudo_label.py into a new --output)" if d.get("format_version") == 1 else "")
        )
    _require(d, REQUIRED_FIELDS, uri)
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
    if d["level"] == "frame" and not d["frame_shift_ms"]:
        raise FormatError(f"{uri}: frame-level run without frame_shift_ms")
    _check_commits(d["commits"], uri)
    known = set(Manifest.__dataclass_fields__) - {"shards"}
    return Manifest(**{k: v for k, v in d.items() if k in known})


def read_manifest(run_uri: str) -> Manifest | None:
    """manifest.json of a run directory (without its shard records); None if absent."""
    uri = storage.join(run_uri, MANIFEST_FILE)
    try:
        text = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    try:
        return parse_manifest(text.decode("utf-8"), uri)
    except UnicodeDecodeError:
        raise FormatError(f"{uri}: not UTF-8 text") from None


def save_manifest(run_uri: str, manifest: Manifest) -> None:
    manifest.updated = now_iso()
    storage.atomic_write_bytes(storage.join(run_uri, MANIFEST_FILE), manifest.to_json().encode("utf-8"))
