"""The train-student job's typed, frozen plan, resolved before Ray starts.

``StudentPlan`` is everything the workers need (what to read and how to decode it, the loss,
the optimisation schedule, where to write); the job builds it once from the flags, the
soft-target manifest and the student spec, and it is stored in every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.modalities import DEFAULT_LIMITS, DecodeLimits, Preprocessing


@dataclass(frozen=True)
class DataPlan:
    """How shards become training rows (pipeline.student.data)."""

    modality: str
    level: str
    preprocessing: Preprocessing
    num_classes: int
    stored_k: int  # teacher classes per target in the cache (num_classes without one)
    label_frame_shift_ms: float = 10.0  # of .frames.npy labels
    frame_shift_ms: float | None = None  # the student's output frame shift
    teacher_stride: int = 1  # student frames per teacher frame: the teacher's shift / the student's
    limits: DecodeLimits = DEFAULT_LIMITS
    rows_per_block: int = 1024
    # Audio batches are padded to a multiple of this many samples: the step then meets a few
    # distinct shapes instead of a new one per batch (oneDNN and cuDNN set up kernels per shape;
    # measured +15% CPU per sample on fresh shapes, docs/performance.md).
    pad_samples: int = 1


@dataclass(frozen=True)
class LossPlan:
    """alpha * CE(labels) + (1 - alpha) * KD(teacher targets), pipeline.student.losses."""

    loss: str = "kl"
    temperature: float = 1.0
    k: int | None = None  # k' <= stored k classes used; None: all
    tail: str = "renormalize"
    alpha: float = 0.5
    confidence_threshold: float = 0.0
    label_blur: float = 0.0  # std in classes of the Gaussian hard targets (ordered classes); 0: one-hot


@dataclass(frozen=True)
class OptimPlan:
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    total_steps: int = 1
    batch_size: int = 64
    shuffle_buffer: int = 512
    seed: int = 0
    precision: str = "bf16"
    checkpoint_every: int = 1


@dataclass(frozen=True)
class StudentPlan:
    student: str  # the spec, local paths absolute (checkpoint dir or module:factory)
    trust: tuple[str, ...]
    factory: str  # "module:function" the checkpoint records
    kwargs: dict
    num_classes: int
    class_names: tuple[str, ...] | None
    softtargets: str | None  # the run directory, or None (labels only / online)
    softtargets_fingerprint: str | None
    online_teacher: str | None
    output: str
    has_eval: bool
    data: DataPlan
    loss: LossPlan
    optim: OptimPlan
    counts: dict  # pseudo / labeled samples and steps per epoch, for the log

    def to_dict(self) -> dict:
        """JSON-able form (the checkpoint's ``plan``)."""
        d = asdict(self)
        d["data"]["preprocessing"] = self.data.preprocessing.to_dict()
        d["trust"] = list(self.trust)
        d["class_names"] = list(self.class_names) if self.class_names else None
        return d

    def checkpoint_config(self) -> dict:
        """What a checkpoint's config.json says about the model (read by parse_spec/describe_model)."""
        return {"modality": self.data.modality, "level": self.data.level, "num_classes": self.num_classes,
                "frame_shift_ms": self.data.frame_shift_ms, "preprocessing": self.data.preprocessing.to_dict(),
                "class_names": list(self.class_names) if self.class_names else None,
                "softtargets_fingerprint": self.softtargets_fingerprint, "plan": self.to_dict()}


@dataclass(frozen=True)
class StudentExec:
    """How the student job runs on Ray; none of it changes what is trained (StudentPlan).
    Built from the flags before Ray starts, the only thing ``fit`` reads besides the plan."""

    workers: int
    cpus_per_worker: float
    device: str  # auto | cuda | cpu
    address: str | None
    dashboard: bool
    max_failures: int  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int
    key_column: str | None  # how labeled / raw Parquet shards are read
    data_column: str | None
