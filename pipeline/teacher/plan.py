"""The pseudo-label job's typed, frozen plans, resolved from the flags before Ray starts.

``TeacherPlan`` is what the soft targets mean (teachers, modality, level, classes, k,
preprocessing: everything the fingerprint covers); ``ExecPlan`` is how the job runs (batch
size, actors, devices, limits). Workers get these, never the argparse namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.cli import init_ray, limits_from_args, resolve_preprocessing, use_gpu
from pipeline.config import ConfigError
from pipeline.fingerprint import fingerprint
from pipeline.inputs import sniff_modality
from pipeline.modalities import DecodeLimits, Preprocessing, preprocessing_from_dict
from pipeline.modalities.image import GPU_RESAMPLE
from pipeline.models.facts import Declared, declare, probe
from pipeline.models.spec import SpecError, absolute_spec, check_trust_modules, identity
from pipeline.shards import Manifest
from pipeline.shards.schema import id_dtype


@dataclass(frozen=True)
class TeacherPlan:
    """What the cache holds. ``specs`` are the user's teacher specs with local paths made
    absolute; ``trust`` the --trust-module list they are parsed with."""

    specs: tuple[str, ...]
    trust: tuple[str, ...]
    modality: str
    level: str
    num_classes: int
    k: int  # effective: min(--top-k, num_classes); the fingerprint covers this value
    frame_shift_ms: float | None
    preprocessing: Preprocessing
    class_names: tuple[str, ...] | None
    teacher: dict = field(compare=False)  # specs, identities, ensemble rule (manifest "teacher")
    fingerprint: str = ""

    def manifest(self, encoding: str, input_options: dict | None = None) -> Manifest:
        """A new run's manifest for this plan."""
        return Manifest(
            input_options={k: v for k, v in (input_options or {}).items() if v is not None},
            fingerprint=self.fingerprint, teacher=self.teacher, modality=self.modality, level=self.level,
            preprocessing=self.preprocessing.to_dict(), k=self.k, num_classes=self.num_classes, encoding=encoding,
            id_dtype=str(id_dtype(self.num_classes)), frame_shift_ms=self.frame_shift_ms,
            class_names=list(self.class_names) if self.class_names else None,
        )


@dataclass(frozen=True)
class ExecPlan:
    """How the job runs; none of it changes the soft targets."""

    encoding: str
    batch_size: int
    bucket_rows: int
    actors: int | None
    gpus_per_actor: float
    cpus_per_actor: float
    device: str
    precision: str
    limits: DecodeLimits
    key_column: str | None
    data_column: str | None
    max_error_rate: float
    progress_interval: float
    address: str | None
    verify: bool
    actor_concurrency: int | None = None  # calls in flight per teacher actor; None: by device (job.actor_concurrency)
    dashboard: bool = False  # the embedded local Ray's dashboard
    compile: bool = False  # torch.compile the teacher for fixed input shapes (ModelRunner.compile)

    @property
    def parquet_options(self) -> dict:
        return {"key_column": self.key_column, "data_column": self.data_column}


def exec_plan(args) -> ExecPlan:
    """Validated execution settings from the flags."""
    for name in ("batch_size", "bucket_rows"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.actors is not None and args.actors < 1:
        raise ConfigError("--actors must be >= 1")
    if args.gpus_per_actor <= 0:
        raise ConfigError("--gpus-per-actor must be > 0")
    if args.cpus_per_actor < 0:
        raise ConfigError("--cpus-per-actor must be >= 0")
    if not 0 <= args.max_error_rate <= 1:
        raise ConfigError("--max-error-rate must be between 0 and 1")
    if args.progress_interval <= 0:
        raise ConfigError("--progress-interval must be > 0")
    if args.actor_concurrency is not None and args.actor_concurrency < 1:
        raise ConfigError("--actor-concurrency must be >= 1")
    return ExecPlan(args.format, args.batch_size, args.bucket_rows, args.actors, args.gpus_per_actor,
                    args.cpus_per_actor, args.device, args.precision, limits_from_args(args), args.key_column,
                    args.data_column, args.max_error_rate, args.progress_interval, args.address, args.verify,
                    args.actor_concurrency, args.dashboard, args.compile)


def plan_teacher(args, first_shard: str) -> TeacherPlan:
    """Resolve --teacher specs, modality, preprocessing, level, classes, k; all before Ray starts."""
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    try:
        trust = check_trust_modules(args.trust_module)
    except SpecError as e:
        raise ConfigError(str(e)) from None
    members = [declare(s, trust, "--teacher") for s in args.teacher]
    modality, prep = _input(args, members, first_shard)
    level, num_classes = _output(args, members, prep)
    frame_shift = _frame_shift(args, members) if level == "frame" else None
    if modality == "image":  # last: it may start Ray (auto on a cluster), after every other check
        place = image_decode_place(args, preprocessing_from_dict(prep).resample)
        prep = preprocessing_from_dict({**prep, "decode": place}).to_dict()  # "cpu": the dict as before
    k = min(args.top_k, num_classes)
    names = next((m.class_names for m in members if m.class_names), None)
    specs = [m.spec for m in members]
    teacher = {"specs": [sp.describe() for sp in specs], "identities": [identity(sp) for sp in specs],
               "ensemble": "mean-probability" if len(specs) > 1 else None}
    fp = fingerprint(teacher["identities"], prep, k, level)
    return TeacherPlan(tuple(str(absolute_spec(s)) for s in args.teacher), trust, modality, level, num_classes, k,
                       frame_shift, preprocessing_from_dict(prep), names, teacher, fp)


def _input(args, members: list[Declared], first_shard: str) -> tuple[str, dict]:
    """(modality, preprocessing) the ensemble sees: what its members declare (they must agree),
    --modality or the first shard's contents, the flags on top."""
    modalities = {m.modality for m in members if m.modality}
    if len(modalities) > 1:
        raise ConfigError(f"--teacher: ensemble members disagree on modality: {sorted(modalities)}")
    modality = args.modality or (modalities.pop() if modalities else None) or sniff_modality(first_shard)
    if modality is None:
        raise ConfigError(f"cannot tell the modality of {first_shard}; pass --modality audio|image")
    preps = [m.preprocessing for m in members if m.preprocessing]
    if any(pp != preps[0] for pp in preps[1:]):
        raise ConfigError("--teacher: ensemble members were trained with different preprocessing; "
                          "they must see the same input")
    if preps and preps[0].get("modality") != modality:
        raise ConfigError(f"--modality {modality}: the teacher was trained on {preps[0].get('modality')} inputs")
    return modality, resolve_preprocessing(modality, preps[0] if preps else None, args)


def _output(args, members: list[Declared], prep: dict) -> tuple[str, int]:
    """(level, classes) of the ensemble's output: a forward pass of each member (they must agree)."""
    outs = [probe(m, prep, "--teacher") for m in members]
    if len(set(outs)) != 1:
        raise ConfigError(f"--teacher: ensemble members disagree on their output (level, classes): {outs}")
    level, num_classes = outs[0]
    if args.level and args.level != level:
        raise ConfigError(f"--level {args.level}: the teacher outputs {'(B, T, C)' if level == 'frame' else '(B, C)'}, "
                          f"which is {level} level")
    return level, num_classes


def _frame_shift(args, members: list[Declared]) -> float:
    """A frame-level ensemble's frame shift: --frame-shift-ms, else what its members declare."""
    shifts = {m.frame_shift_ms for m in members if m.frame_shift_ms}
    if len(shifts) > 1:
        raise ConfigError(f"--teacher: ensemble members disagree on frame shift {sorted(shifts)}")
    frame_shift = args.frame_shift_ms or (shifts.pop() if shifts else None)
    if frame_shift is None:
        raise ConfigError("frame-level teacher does not declare its frame shift; pass --frame-shift-ms")
    return frame_shift


def image_decode_place(args, resample: str) -> str:
    """--image-decode -> where the teacher's JPEGs are decoded ("cpu" or "gpu"; part of the
    preprocessing, so of the fingerprint). auto: what --output's existing run used, so a rerun
    resumes it whatever GPUs there are now; for a new run "gpu" when the teacher actors get a
    GPU (--device cuda; --device auto with GPUs in the cluster, which connects to it), the
    resize filter has a GPU implementation and torchvision is installed; else "cpu", today's path."""
    import importlib.util
    import os

    choice, device = args.image_decode, args.device
    reasons = []
    if device == "cpu":
        reasons.append("--device cpu gives the teacher no GPU")
    if resample not in GPU_RESAMPLE:
        reasons.append(f"the {resample!r} resize filter has no GPU implementation (use one of {GPU_RESAMPLE})")
    if importlib.util.find_spec("torchvision") is None:
        reasons.append("torchvision is not installed (pip install 'kdpipe[vision]')")
    if choice == "cpu":
        return "cpu"
    if choice == "gpu":
        if reasons:
            raise ConfigError(f"--image-decode gpu: {reasons[0]}")
        return "gpu"
    existing = _existing_decode(args.output)
    if existing == "gpu" and reasons:
        raise ConfigError(f"--image-decode auto: {args.output} holds soft targets whose JPEGs were decoded on the GPU, "
                          f"and this run cannot do that ({reasons[0]}); run where the teacher gets a GPU, or use "
                          "another --output")
    if existing is not None:
        return existing
    if reasons:
        return "cpu"
    if device == "cuda":
        return "gpu"
    if not (args.address or os.environ.get("RAY_ADDRESS")):  # the embedded Ray sees this machine's GPUs
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    init_ray(args.address, args.dashboard)
    return "gpu" if use_gpu(device) else "cpu"


def _existing_decode(output: str) -> str | None:
    """The decode place of the image run already in ``output``; None without one (or with a
    manifest that cannot be read: the run writer says what is wrong with it)."""
    from pipeline.shards import FormatError
    from pipeline.shards.manifest import read_manifest
    from pipeline.storage import StorageError

    try:
        m = read_manifest(output)
    except (FormatError, StorageError, OSError):
        return None
    if m is None or m.modality != "image":
        return None
    return (m.preprocessing or {}).get("decode", "cpu")
