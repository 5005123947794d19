"""The train-student job: Ray Train (TorchTrainer, DDP) on cached soft targets and/or labels.

    python jobs/train_student.py --soft-targets runs/st --student 'pipeline.models.zoo:audio_cnn?width=8' \
        --output runs/student [--labeled data/labeled --labeled-ratio 0.2]
    python jobs/train_student.py --labeled data/labeled --student ... --output runs/teacher   # labels only

Everything about the cache and the student is checked on the driver before any worker starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

from pipeline import storage
from pipeline.cli import add_limit_flags, add_preprocessing_flags, add_ray_flags, add_trust_flag, check_cpu_room, init_ray, \
    limits_from_args, resolve_preprocessing, use_gpu
from pipeline.config import ConfigError, JobParser, add_config_flag, parse_args
from pipeline.inputs import SHARD_EXTENSIONS, shard_name
from pipeline.modalities import preprocessing_from_dict
from pipeline.models.facts import Declared, ModelFacts, declare, frame_stride, resolve
from pipeline.models.spec import CHECKPOINT_CONFIG, SpecError, absolute_spec, check_trust_modules, parse_spec
from pipeline.shards import FormatError, SoftTargetRun
from pipeline.softtargets import TAIL_MODES
from pipeline.storage import STORAGE_EXIT, StorageError, storage_failure, what_to_do
from pipeline.student.data import count_samples
from pipeline.student.errors import DataError
from pipeline.student.losses import LOSSES
from pipeline.student.plan import DataPlan, LossPlan, OptimPlan, StudentExec, StudentPlan
from pipeline.student.tasks import LABELED, PSEUDO, RAW, ShardTask
from pipeline.student.train import TRAIN_STATE, read_metrics

RUN_NAME = "train"
FINAL_DIR = "final"


def build_parser() -> argparse.ArgumentParser:
    p = JobParser(
        prog="train_student.py",
        description="Train a student with Ray Train from cached soft targets, labeled data, or both.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )
    add_config_flag(p)
    g = p.add_argument_group("data")
    g.add_argument("--soft-targets", metavar="URI", default=None,
                   help="soft-target run directory written by pseudo_label.py; omit to train on labels only")
    g.add_argument("--input", nargs="+", metavar="URI", default=None,
                   help="where the soft-target run's input shards live now, if they moved (matched by shard name); "
                        "with --online-teacher: the unlabeled shards to distil on")
    g.add_argument("--labeled", nargs="+", metavar="URI", default=None,
                   help="labeled shards (.cls or .frames.npy members), mixed in at --labeled-ratio")
    g.add_argument("--labeled-ratio", type=float, default=0.2,
                   help="share of labeled samples in each epoch when mixing with soft targets (labeled shards are "
                        "repeated to reach it)")
    g.add_argument("--labeled-repeat", type=int, default=None,
                   help="passes over the labeled shards per epoch (default: 1, or what --labeled-ratio needs when "
                        "mixing); makes epochs over a small labeled set longer and cheaper")
    g.add_argument("--eval", nargs="+", metavar="URI", default=None, help="labeled shards evaluated after every epoch")
    g.add_argument("--label-frame-shift-ms", type=float, default=10.0, help="frame shift of .frames.npy labels")
    g.add_argument("--key-column", default=None,
                   help="Parquet --labeled / --eval / online --input shards: column of sample keys (the soft-target "
                        "run's own inputs are read the way pseudo_label.py read them)")
    g.add_argument("--data-column", default=None, help="Parquet --labeled / --eval / online --input shards: media column")
    g.add_argument("--shuffle-buffer", type=int, default=512, help="rows in each worker's local shuffle buffer (0: off)")
    g.add_argument("--pad-ms", type=float, default=100.0,
                   help="audio batches are zero-padded to a multiple of this many ms, so the step sees a few shapes "
                        "instead of a new one per batch (0: to the longest clip exactly)")
    g = p.add_argument_group("model")
    g.add_argument("--student", required=True, metavar="SPEC",
                   help="'package.module:factory?kwarg=value' (or a checkpoint dir to start from)")
    add_trust_flag(g)
    g.add_argument("--output", required=True, metavar="URI", help="checkpoints, metrics.jsonl and final/ (local or s3://)")
    g = p.add_argument_group("distillation")
    g.add_argument("--loss", choices=LOSSES, default="kl",
                   help="kl: T^2-scaled KL to the teacher's top-k; mse: MSE on top-k logits (Tang et al.); "
                        "hard: cross-entropy on the teacher's top-1")
    g.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T")
    g.add_argument("--top-k", type=int, default=None, help="k' <= stored k classes used from the cache (default: all)")
    g.add_argument("--tail", choices=TAIL_MODES, default="renormalize", help="tail mass outside the top-k' (docs/format.md)")
    g.add_argument("--alpha", type=float, default=0.5,
                   help="weight of hard-label cross-entropy; 1 - alpha weighs the distillation term")
    g.add_argument("--label-blur", type=float, default=0.0, metavar="SIGMA",
                   help="hard labels (and --loss hard's teacher top-1) as a Gaussian of this std in classes around "
                        "the label, for ordered classes such as pitch bins (CREPE: 1.25 = 25 cents); 0: one-hot")
    g.add_argument("--confidence-threshold", type=float, default=0.0,
                   help="ignore teacher targets (samples, or frames) whose confidence is below this")
    g.add_argument("--online-teacher", metavar="SPEC", default=None,
                   help="online distillation: run this teacher in the training loop on --input instead of the cache")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training data")
    g.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps (overrides epochs)")
    g.add_argument("--batch-size", type=int, default=64, help="batch size per worker")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=0.01, help="weight decay")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 5%% of all steps)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to this fraction of --lr")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--seed", type=int, default=0, help="seed for init, shard order and shuffling")
    add_preprocessing_flags(p, "the soft-target run's (what the teacher saw)")
    add_limit_flags(p)
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=2, help="data-parallel training workers")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: GPU workers when the cluster has GPUs now; cuda: always (waits for an autoscaling GPU group)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per training worker")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype on GPU")
    g.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the latest checkpoint")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept in OUTPUT/train")
    g.add_argument("--checkpoint-every", type=int, default=1,
                   help="checkpoint every N epochs (and after the last); a resumed run restarts from the last one")
    add_ray_flags(g)
    return p


def _validate(args) -> None:
    if not args.soft_targets and not args.labeled and not args.online_teacher:
        raise ConfigError("nothing to train on: give --soft-targets, --labeled, or --online-teacher with --input")
    if args.online_teacher and args.soft_targets:
        raise ConfigError("--online-teacher replaces --soft-targets; give one of them")
    if args.online_teacher and not args.input:
        raise ConfigError("--online-teacher needs --input (the shards to distil on)")
    if args.input and not (args.soft_targets or args.online_teacher):
        raise ConfigError("--input only applies with --soft-targets or --online-teacher")
    for name in ("epochs", "batch_size", "workers", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps must be >= 1")
    if args.temperature <= 0:
        raise ConfigError("--temperature must be > 0")
    if not math.isfinite(args.label_blur) or args.label_blur < 0:
        raise ConfigError(f"--label-blur must be a finite number >= 0, got {args.label_blur}")
    if not 0 <= args.alpha <= 1:
        raise ConfigError("--alpha must be between 0 and 1")
    if not 0 < args.labeled_ratio < 1 and args.labeled and (args.soft_targets or args.online_teacher):
        raise ConfigError("--labeled-ratio must be between 0 and 1 (exclusive) when mixing")
    if args.lr <= 0:
        raise ConfigError("--lr must be > 0")
    if args.pad_ms < 0:
        raise ConfigError("--pad-ms must be >= 0")


def pad_samples(prep: dict, pad_ms: float) -> int:
    """--pad-ms in samples at the model's rate (1 for images, whose size is fixed)."""
    if prep.get("modality") != "audio":
        return 1
    return max(1, round(prep["sample_rate"] * pad_ms / 1000))


@dataclass(frozen=True)
class Setup:
    """What planning resolved: the plan, the shard tasks of the training and eval datasets, and
    the soft-target cache (None: labels only, or online distillation)."""

    plan: StudentPlan
    tasks: list[ShardTask]
    eval_tasks: list[ShardTask]
    cache: SoftTargetRun | None


def plan(args) -> Setup:
    """Resolve and check everything, before Ray starts."""
    try:
        trust = check_trust_modules(args.trust_module)
    except SpecError as e:
        raise ConfigError(str(e)) from None
    cache = SoftTargetRun(args.soft_targets) if args.soft_targets else None  # O(1) requests
    manifest = cache.manifest if cache else None
    student, online = _models(args, trust, manifest)
    stored_k, teacher_stride = _targets(args, student, manifest, online is not None)
    tasks, n_pseudo = _pseudo_tasks(args, cache)
    labeled, n_labeled = _labeled_tasks(args, n_pseudo if tasks else 0)
    tasks += labeled
    eval_tasks = [ShardTask(LABELED, shard_name(r.uri), r.uri)
                  for r in storage.expand_shards(args.eval, SHARD_EXTENSIONS)] if args.eval else []
    rows = n_pseudo + n_labeled
    steps_per_epoch = max(1, math.ceil(rows / args.workers / args.batch_size))
    total = args.steps or steps_per_epoch * args.epochs
    epochs = args.epochs if not args.steps else max(args.epochs, math.ceil(args.steps / steps_per_epoch))
    alpha = args.alpha if (cache is not None or online) else 1.0  # labels only: all CE
    if (cache is not None or online) and not args.labeled and alpha == 1.0:
        raise ConfigError("--alpha 1 puts all weight on labels, but there is no labeled data")
    data = DataPlan(modality=student.modality, level=student.level,
                    preprocessing=preprocessing_from_dict(student.preprocessing), num_classes=student.num_classes,
                    stored_k=stored_k, label_frame_shift_ms=args.label_frame_shift_ms,
                    frame_shift_ms=student.frame_shift_ms, teacher_stride=teacher_stride, limits=limits_from_args(args),
                    pad_samples=pad_samples(student.preprocessing, args.pad_ms))
    loss = LossPlan(loss=args.loss, temperature=args.temperature, k=args.top_k, tail=args.tail, alpha=alpha,
                    confidence_threshold=args.confidence_threshold, label_blur=args.label_blur)
    optim = OptimPlan(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
                      warmup_steps=args.warmup_steps if args.warmup_steps is not None else int(0.05 * total),
                      min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, epochs=epochs, max_steps=args.steps,
                      total_steps=total, batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                      seed=args.seed, precision=args.precision, checkpoint_every=args.checkpoint_every)
    names = manifest.class_names if manifest else None
    sp = StudentPlan(
        student=str(args.student), trust=trust, factory=student.declared.spec.factory,
        kwargs=dict(student.declared.spec.kwargs), num_classes=student.num_classes,
        class_names=tuple(names) if names else None, softtargets=args.soft_targets,
        softtargets_fingerprint=manifest.fingerprint if manifest else None, online_teacher=args.online_teacher,
        output=args.output, has_eval=bool(eval_tasks), data=data, loss=loss, optim=optim,
        counts={"pseudo": n_pseudo, "labeled": n_labeled, "steps_per_epoch": steps_per_epoch})
    return Setup(sp, tasks, eval_tasks, cache)


def _models(args, trust: tuple, manifest) -> tuple[ModelFacts, Declared | None]:
    """The student (resolved against the data) and the online teacher (declared), if any."""
    try:
        kind = parse_spec(str(args.student), trust).kind  # before building it: an hf: or onnx: model is not loaded
    except (SpecError, FileNotFoundError) as e:
        raise ConfigError(f"--student {args.student}: {e}") from None
    if kind not in ("factory", "checkpoint"):
        raise ConfigError(f"--student {args.student}: a {kind} model cannot be trained by kdpipe (it can "
                          "teach); give a 'package.module:factory' spec or a kdpipe checkpoint")
    student = declare(str(args.student), trust, "--student")
    online = declare(args.online_teacher, trust, "--online-teacher") if args.online_teacher else None
    modality = (manifest.modality if manifest else None) or student.modality or (online.modality if online else None)
    if modality is None:
        raise ConfigError("cannot tell the modality: the student does not declare it and there is no soft-target run")
    if student.modality and student.modality != modality:
        raise ConfigError(f"--student is a {student.modality} model but the data is {modality}")
    base_prep = (manifest.preprocessing if manifest else None) or student.preprocessing or \
        (online.preprocessing if online else None)
    prep = resolve_preprocessing(modality, base_prep, args)
    return resolve(student, modality, prep, "--student"), online


def _targets(args, student: ModelFacts, manifest, online: bool) -> tuple[int, int]:
    """(classes stored per target, student frames per teacher frame), checked against the cache."""
    stored_k, teacher_stride = student.num_classes, 1
    if manifest is not None:
        where = f"--soft-targets {args.soft_targets}"
        if manifest.level != student.level:
            raise ConfigError(f"{where}: the cache is {manifest.level} level but the student outputs {student.level} "
                              "level")
        if manifest.num_classes != student.num_classes:
            raise ConfigError(f"{where}: the cache has {manifest.num_classes} classes but the student outputs "
                              f"{student.num_classes}")
        if student.level == "frame":
            teacher_stride = frame_stride(manifest.frame_shift_ms, student.frame_shift_ms, where)
        stored_k = manifest.k
    if args.top_k is not None and not 1 <= args.top_k <= stored_k:
        raise ConfigError(f"--top-k {args.top_k}: must be between 1 and the stored k={stored_k}")
    if online and args.top_k is not None:
        stored_k = args.top_k
    return stored_k, teacher_stride


def _pseudo_tasks(args, cache: SoftTargetRun | None) -> tuple[list[ShardTask], int]:
    """The cache's shards paired with their inputs (--input: where they are now), or the raw
    inputs of online distillation; and how many samples they hold."""
    tasks: list[ShardTask] = []
    n = 0
    if cache is not None:
        moved = {}
        if args.input:
            moved = {shard_name(r.uri): r.uri for r in storage.expand_shards(args.input, SHARD_EXTENSIONS)}
        records = cache.manifest.shards
        if not records:
            raise ConfigError(f"--soft-targets {args.soft_targets}: the run has no complete shard")
        # Before any worker starts: every listed file is there, at the size the log says.
        damaged = cache.verify()
        if damaged:
            name, why = sorted(damaged.items())[0]
            raise ConfigError(f"--soft-targets {args.soft_targets}: {len(damaged)} shard(s) damaged, e.g. {name}: "
                              f"{why}; rerun pseudo_label.py on that run to recompute them")
        for name in cache.shard_names:
            rec = records[name]
            if args.input and name not in moved:
                raise ConfigError(f"--input: no shard named {name!r} (needed by the soft-target run)")
            tasks.append(ShardTask(PSEUDO, name, moved.get(name, rec.input), rec))
            n += rec.rows
    if args.online_teacher:
        for r in storage.expand_shards(args.input, SHARD_EXTENSIONS):
            tasks.append(ShardTask(RAW, shard_name(r.uri), r.uri))
            n += count_samples(r.uri)
    return tasks, n


def _labeled_tasks(args, n_pseudo: int) -> tuple[list[ShardTask], int]:
    """--labeled shards, repeated to --labeled-ratio of the epoch (or --labeled-repeat times);
    and the samples they add per epoch."""
    if not args.labeled:
        return [], 0
    lab = [(r.uri, count_samples(r.uri)) for r in storage.expand_shards(args.labeled, SHARD_EXTENSIONS)]
    once = sum(n for _, n in lab)
    rep = 1
    if args.labeled_repeat is not None:
        if args.labeled_repeat < 1:
            raise ConfigError("--labeled-repeat must be >= 1")
        rep = args.labeled_repeat
    elif n_pseudo and once:
        r = args.labeled_ratio
        rep = max(1, round(r * n_pseudo / ((1 - r) * once)))
    return [ShardTask(LABELED, f"{shard_name(u)}#{i}", u) for i in range(rep) for u, _ in lab], rep * once


def _absolute_paths(args) -> None:
    """Local paths in the flags, made absolute in place: Ray Train workers run in a working
    directory of their own, where a relative --output or SPEC would point somewhere else."""
    for name in ("output", "soft_targets"):
        if getattr(args, name):
            setattr(args, name, storage.absolute(getattr(args, name)))
    for name in ("input", "labeled", "eval"):
        if getattr(args, name):
            setattr(args, name, [storage.absolute(u) for u in getattr(args, name)])
    args.student = absolute_spec(args.student)
    args.online_teacher = absolute_spec(args.online_teacher)


def _final_done(args, sp: StudentPlan) -> dict | None:
    uri = storage.join(args.output, FINAL_DIR, CHECKPOINT_CONFIG)
    if not storage.exists(uri):
        return None
    final = json.loads(storage.read_bytes(uri))
    if final.get("softtargets_fingerprint") != sp.softtargets_fingerprint:
        raise ConfigError(f"{args.output}: holds a student trained on another soft-target cache; use a new --output")
    done = final.get("epoch", 0) >= sp.optim.epochs or (sp.optim.max_steps and final.get("step", 0) >= sp.optim.max_steps)
    return final if done else None


def _storage(output: str):
    """(storage_path, storage_filesystem) for Ray Train: s3 goes through the same s3fs as the rest."""
    if not storage.is_remote(output):
        return os.path.abspath(output), None
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(output)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def run(argv=None) -> int:
    """Entry point of jobs/train_student.py; returns the process exit code."""
    started = _job_start(argv)
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        _validate(args)
        _absolute_paths(args)
        setup = plan(args)
        sp = setup.plan
        ex = exec_plan(args)
        done = _final_done(args, sp)
    except (ConfigError, FormatError, FileNotFoundError, StorageError) as e:
        parser.error(str(e))
    c = sp.counts
    print(f"[train] {sp.data.modality} {sp.data.level}-level student {sp.factory} on {c['pseudo']:,} "
          f"soft-target + {c['labeled']:,} labeled samples per epoch; {sp.optim.epochs} epoch(s), "
          f"{c['steps_per_epoch']} steps/epoch, {ex.workers} worker(s)", flush=True)
    if done is not None:
        print(f"[train] already complete: {storage.join(args.output, FINAL_DIR)} is at epoch {done.get('epoch')}, "
              f"step {done.get('step')}; nothing to do", flush=True)
        print(json.dumps({"summary": {"output": args.output, "final": storage.join(args.output, FINAL_DIR),
                                      "epoch": done.get("epoch"), "step": done.get("step"), "already_complete": True}}))
        return 0
    t0 = time.monotonic()
    epochs_before = len(read_metrics(args.output))  # a resumed run: the epochs already recorded
    planned_s = time.time() - started  # (imports and) planning
    try:
        t_ray = time.monotonic()
        init_ray(ex.address, ex.dashboard)  # timed here (fit's own call is then a no-op)
        ray_s = time.monotonic() - t_ray
        result = fit(ex, sp, setup.tasks, setup.eval_tasks, setup.cache, started)
    except DataError as e:
        print(f"[train] error: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        failure = storage_failure(e)
        if failure is None:
            raise
        print(f"[train] storage error: {failure}; {what_to_do(failure)}", file=sys.stderr, flush=True)
        return STORAGE_EXIT
    final_uri = storage.join(args.output, FINAL_DIR)
    with tempfile.TemporaryDirectory() as d:
        result.checkpoint.to_directory(d)
        os.remove(os.path.join(d, TRAIN_STATE))  # final/ is the model, not the optimizer
        storage.put_dir(d, final_uri)
    history = read_metrics(args.output)
    last = history[-1] if history else {}
    ck_path = result.checkpoint.path
    if storage.is_remote(args.output) and "://" not in ck_path:
        ck_path = args.output.split("://", 1)[0] + "://" + ck_path
    summary = {"output": args.output, "final": final_uri, "checkpoint": ck_path,
               "epochs": last.get("epoch"), "steps": last.get("step"), "seconds": round(time.monotonic() - t0, 1),
               # from the job's start to its first optimizer step (this run's first epoch)
               "startup_s": (history[epochs_before:] or [{}])[0].get("startup_s"),
               "last": last}
    first = ""
    if summary["startup_s"] is not None:
        # where it went: imports and planning, Ray's start (or connect), the rest is Ray Train's
        # start (controller, worker group, DDP), the model's build and the first batch
        train_start = summary["startup_s"] - planned_s - ray_s
        summary["startup"] = {"plan_s": round(planned_s, 2), "ray_init_s": round(ray_s, 2),
                              "train_start_s": round(train_start, 2)}
        first = (f"; first step {summary['startup_s']} s after start (imports and plan {planned_s:.1f} s, Ray "
                 f"{ray_s:.1f} s, Ray Train's start to the first batch {train_start:.1f} s)")
    loss = f"{last['loss']:.4f}" if last.get("loss") is not None else "-"
    print(f"[train] done: epoch {last.get('epoch')} step {last.get('step')} loss {loss}{first}; final model in "
          f"{final_uri} (a valid --teacher and --checkpoint)", flush=True)
    print(json.dumps({"summary": summary}), flush=True)
    return 0


def _job_start(argv) -> float:
    """When this job started (wall clock, for startup_s): from the command line (``argv`` None:
    sys.argv), its process's start, so that the imports count; called with arguments (a recipe
    or a notebook running jobs in one process), now."""
    if argv is not None:
        return time.time()
    import psutil

    return psutil.Process().create_time()


def exec_plan(args) -> StudentExec:
    """The flags that say how the job runs, frozen before Ray starts."""
    return StudentExec(args.workers, args.cpus_per_worker, args.device, args.address, args.dashboard, args.max_failures,
                       args.keep_checkpoints, args.key_column, args.data_column)


def fit(ex: StudentExec, sp: StudentPlan, tasks: list[ShardTask], eval_tasks: list[ShardTask],
        cache: SoftTargetRun | None, started: float | None = None):
    """Build the datasets and run the TorchTrainer; returns Ray Train's Result. ``started``:
    when the job started (wall clock), for the first epoch's startup_s.

    A worker-group failure is retried from the latest checkpoint up to --max-failures times
    (the same RunConfig resumes it), except a data error, which raises DataError at once."""
    import ray
    from ray.data import DataContext, RandomSeedConfig
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.student.data import ShardRows
    from pipeline.student.errors import data_error
    from pipeline.student.train import train_loop

    init_ray(ex.address, ex.dashboard)
    DataContext.get_current().enable_progress_bars = False
    gpu = use_gpu(ex.device)
    check_cpu_room("train", "--workers", ex.workers, "--cpus-per-worker", ex.cpus_per_worker, ex.address)
    rows = ShardRows(sp.data, cache.uri if cache else None, cache.facts if cache else None,
                     {"key_column": ex.key_column, "data_column": ex.data_column},
                     cache.manifest.input_options if cache else None)

    def dataset(items: list[ShardTask], shuffle: bool, seed: int):
        ds = ray.data.from_items([t.to_row() for t in items], override_num_blocks=len(items))
        if shuffle:  # a new shard order every epoch (every execution), reproducible from the seed
            ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
        return ds.map_batches(rows, batch_size=1, num_cpus=1)

    path, fs = _storage(sp.output)
    for attempt in range(ex.max_failures + 1):
        datasets = {"train": dataset(tasks, shuffle=True, seed=sp.optim.seed + attempt)}
        if eval_tasks:
            datasets["eval"] = dataset(eval_tasks, shuffle=False, seed=0)
        trainer = TorchTrainer(
            train_loop,
            # the job's start (wall clock): the first epoch's record says how long it took to
            # the first optimizer step
            train_loop_config={"plan": sp, "started": started if attempt == 0 else None},
            scaling_config=ScalingConfig(num_workers=ex.workers, use_gpu=gpu,
                                         resources_per_worker={"CPU": ex.cpus_per_worker}),
            run_config=RunConfig(name=RUN_NAME, storage_path=path, storage_filesystem=fs,
                                 failure_config=FailureConfig(max_failures=0),
                                 checkpoint_config=CheckpointConfig(num_to_keep=ex.keep_checkpoints)),
            datasets=datasets,
        )
        try:
            result = trainer.fit()
            error = result.error
        except Exception as e:  # Ray Train V2 raises TrainingFailedError from fit()
            result, error = None, e
        if error is None:
            if result.checkpoint is None:
                raise RuntimeError("training finished without a checkpoint")
            return result
        message = data_error(error)
        if message:
            raise DataError(message)
        if attempt == ex.max_failures:
            raise error
        print(f"[train] worker group failed ({type(error).__name__}); restarting from the latest checkpoint "
              f"({attempt + 1}/{ex.max_failures})", flush=True)
    raise AssertionError("unreachable")
