"""The pseudo-label job: sharded corpus -> teacher actors -> soft-target cache.

    python jobs/pseudo_label.py --input data/unlabeled --output runs/st --teacher CKPT_DIR
    ray job submit --working-dir . -- python jobs/pseudo_label.py ...   (same flags)

Everything that can be checked is checked before Ray starts: flags, inputs, teacher specs,
preprocessing, the fingerprint against an existing run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

from pipeline import storage
from pipeline.cli import DECODE_TASK_MEMORY, add_preprocessing_flags, init_ray, resolve_preprocessing
from pipeline.config import ConfigError, add_config_flag, parse_args
from pipeline.fingerprint import fingerprint
from pipeline.inputs import SHARD_EXTENSIONS, sniff_modality, unique_shard_names
from pipeline.models.probe import probe_output
from pipeline.models.spec import SpecError, build_model, describe_model, identity, parse_spec
from pipeline.shards import FormatError, Manifest, RunWriter
from pipeline.softtargets import id_dtype
from pipeline.teacher.collect import Progress, ShardCollector, fmt_duration

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pseudo_label.py",
        description="Run teacher model(s) over a sharded corpus and write top-k soft targets (the cache).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )
    add_config_flag(p)
    g = p.add_argument_group("data")
    g.add_argument("--input", nargs="+", required=True, metavar="URI",
                   help="input shards: WebDataset .tar or .parquet files, directories, globs or brace patterns "
                        "(shard-{0000..0099}.tar), local or s3://")
    g.add_argument("--output", required=True, metavar="URI", help="run directory for the soft-target cache (local or s3://)")
    g.add_argument("--modality", choices=["audio", "image"], default=None,
                   help="input modality; default: from the teacher, else sniffed from the first shard's members")
    g.add_argument("--key-column", default=None,
                   help="Parquet inputs: column holding sample keys (default 'key'; without one: ids SHARD/ROW)")
    g.add_argument("--data-column", default=None,
                   help="Parquet inputs: column holding media bytes or a datasets Audio/Image struct {bytes, path} "
                        "(default: first binary column, else first such struct)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", action="append", required=True, metavar="SPEC",
                   help="checkpoint dir, 'package.module:factory?kwarg=value&weights=FILE', TorchScript file, "
                        "hf:DIR, timm:NAME?weights=FILE, torchvision:NAME?weights=FILE or onnx:FILE (docs/recipes.md); "
                        "repeat for an ensemble (averaged in probability space)")
    g.add_argument("--level", choices=["utterance", "frame"], default=None,
                   help="soft targets per utterance/image or per frame; default: from the teacher's output shape")
    g.add_argument("--frame-shift-ms", type=float, default=None,
                   help="frame-level teachers that do not declare it: output frame shift in ms")
    g.add_argument("--top-k", type=int, default=10, help="classes kept per sample (or frame)")
    add_preprocessing_flags(p)
    g = p.add_argument_group("execution")
    g.add_argument("--format", choices=["parquet", "webdataset"], default="parquet", help="soft-target shard encoding")
    g.add_argument("--batch-size", type=int, default=64, help="teacher batch size")
    g.add_argument("--actors", type=int, default=None, help="teacher actors; default: one per GPU share, 1 without GPUs")
    g.add_argument("--gpus-per-actor", type=float, default=1.0, help="GPUs per teacher actor (fractional allowed)")
    g.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per teacher actor")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: GPU actors when the cluster has GPUs now, else CPU fallback; cuda: always GPU actors "
                        "(waits for an autoscaling GPU group)")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype on GPU (CPU runs fp32)")
    g.add_argument("--bucket-rows", type=int, default=1024, help="decoded samples sorted by length together, to cut padding")
    g.add_argument("--max-error-rate", type=float, default=0.05,
                   help="exit non-zero when quarantined / (samples + quarantined) exceeds this")
    g.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    g.add_argument("--address", default=None,
                   help="Ray cluster address; default: $RAY_ADDRESS (set by ray job submit), else an embedded local Ray")
    return p


@dataclass
class TeacherPlan:
    specs: list
    teacher: dict
    modality: str
    level: str
    num_classes: int
    frame_shift_ms: float | None
    preprocessing: dict
    class_names: list[str] | None


def plan_teacher(args, first_shard: str) -> TeacherPlan:
    """Resolve --teacher specs, modality, preprocessing, level, classes; all before Ray starts."""
    specs, described, models = [], [], []
    for s in args.teacher:
        try:
            spec = parse_spec(s)
            model = build_model(spec)
        except (SpecError, FileNotFoundError) as e:
            raise ConfigError(f"--teacher {s}: {e}") from None
        specs.append(spec)
        models.append(model)
        described.append(describe_model(spec, model))
    modalities = {d["modality"] for d in described if d["modality"]}
    if len(modalities) > 1:
        raise ConfigError(f"--teacher: ensemble members disagree on modality: {sorted(modalities)}")
    modality = args.modality or (modalities.pop() if modalities else None) or sniff_modality(first_shard)
    if modality is None:
        raise ConfigError(f"cannot tell the modality of {first_shard}; pass --modality audio|image")
    preps = [d["preprocessing"] for d in described if d["preprocessing"]]
    if any(pp != preps[0] for pp in preps[1:]):
        raise ConfigError("--teacher: ensemble members were trained with different preprocessing; "
                          "they must see the same input")
    if preps and preps[0].get("modality") != modality:
        raise ConfigError(f"--modality {modality}: the teacher was trained on {preps[0].get('modality')} inputs")
    prep = resolve_preprocessing(modality, preps[0] if preps else None, args)
    shapes = []
    for s, model in zip(args.teacher, models):
        try:
            out = probe_output(model, prep)
        except Exception as e:
            raise ConfigError(f"--teacher {s}: forward pass on a blank {modality} input failed "
                              f"({type(e).__name__}: {e}); check the preprocessing flags") from None
        shapes.append(tuple(out.shape))
    if len({s[-1] for s in shapes}) != 1 or len({len(s) for s in shapes}) != 1:
        raise ConfigError(f"--teacher: ensemble members disagree on output shape {shapes}")
    level = "frame" if len(shapes[0]) == 3 else "utterance"
    if args.level and args.level != level:
        raise ConfigError(f"--level {args.level}: the teacher outputs {'(B, T, C)' if level == 'frame' else '(B, C)'}, "
                          f"which is {level} level")
    num_classes = shapes[0][-1]
    frame_shift = None
    if level == "frame":
        shifts = {d["frame_shift_ms"] for d in described if d["frame_shift_ms"]}
        if len(shifts) > 1:
            raise ConfigError(f"--teacher: ensemble members disagree on frame shift {sorted(shifts)}")
        frame_shift = args.frame_shift_ms or (shifts.pop() if shifts else None)
        if frame_shift is None:
            raise ConfigError("frame-level teacher does not declare its frame shift; pass --frame-shift-ms")
    if not 1 <= args.top_k:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    names = next((d["class_names"] for d in described if d["class_names"]), None)
    teacher = {"specs": [sp.describe() for sp in specs], "identities": [identity(sp) for sp in specs],
               "ensemble": "mean-probability" if len(specs) > 1 else None}
    return TeacherPlan(list(args.teacher), teacher, modality, level, num_classes, frame_shift, prep, names)


def _validate_args(args) -> None:
    for name in ("batch_size", "bucket_rows"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.actors is not None and args.actors < 1:
        raise ConfigError("--actors must be >= 1")
    if args.gpus_per_actor <= 0:
        raise ConfigError("--gpus-per-actor must be > 0")
    if not 0 <= args.max_error_rate <= 1:
        raise ConfigError("--max-error-rate must be between 0 and 1")


def run(argv=None) -> int:
    """Entry point of jobs/pseudo_label.py; returns the process exit code."""
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        _validate_args(args)
        refs = storage.expand_shards(args.input, SHARD_EXTENSIONS)
        plan = plan_teacher(args, refs[0].uri)
    except (ConfigError, FileNotFoundError, FormatError) as e:
        parser.error(str(e))
    names = unique_shard_names([r.uri for r in refs])
    fp = fingerprint(plan.teacher["identities"], plan.preprocessing, args.top_k, plan.level)
    k = min(args.top_k, plan.num_classes)
    manifest = Manifest(
        fingerprint=fp, teacher=plan.teacher, modality=plan.modality, level=plan.level,
        preprocessing=plan.preprocessing, k=k, num_classes=plan.num_classes, encoding=args.format,
        id_dtype=str(id_dtype(plan.num_classes)), frame_shift_ms=plan.frame_shift_ms, class_names=plan.class_names,
    )
    try:
        writer = RunWriter(args.output, manifest)
    except FormatError as e:
        parser.error(str(e))
    done = writer.completed()
    todo = [r for r in refs if names[r.uri] not in done]
    skipped = len(refs) - len(todo)
    print(f"[pseudo-label] {len(refs)} input shard(s), {skipped} already complete in {args.output} "
          f"(fingerprint {fp[:12]}); teacher {', '.join(plan.teacher['specs'])}; {plan.modality}, {plan.level} level, "
          f"{plan.num_classes} classes, top-{k}", flush=True)
    progress = Progress(len(todo), sum(r.size for r in todo), skipped, args.progress_interval)
    if not todo:
        print("[pseudo-label] cache hit: every shard is complete for this fingerprint; no teacher batch was run", flush=True)
        return report(writer, progress, skipped, Counter(), args, cache_hit=True)
    collector = ShardCollector(writer, {names[r.uri]: (r.uri, r.size) for r in todo}, progress)
    execute(args, plan, k, [(names[r.uri], r.uri) for r in todo], collector)
    return report(writer, progress, skipped, collector.error_reasons, args)


def execute(args, plan: TeacherPlan, k: int, shards: list[tuple[str, str]], collector: ShardCollector) -> None:
    """Build the Ray Data pipeline (decode tasks -> teacher actors) and stream it into the collector."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.teacher.decode import DecodeShards
    from pipeline.teacher.predictor import TeacherPredictor

    init_ray(args.address)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    gpus = ray.cluster_resources().get("GPU", 0) if args.device != "cpu" else 0
    # --device cuda asks for GPU actors even when no GPU node is up yet (an autoscaling GPU
    # group starting from zero adds them); auto uses GPUs only if the cluster has some now.
    use_gpu = args.device == "cuda" or gpus > 0
    actors = args.actors or (max(1, int(gpus // args.gpus_per_actor)) if gpus else 1)
    print(f"[pseudo-label] {actors} teacher actor(s) on {'GPU' if use_gpu else 'CPU (no GPU in the cluster)'}, "
          f"batch {args.batch_size}, {len(shards)} shard(s) to compute", flush=True)
    parquet_options = {"key_column": args.key_column, "data_column": args.data_column}
    ds = ray.data.from_items([{"name": n, "uri": u} for n, u in shards], override_num_blocks=len(shards))
    # Decode runs as plain CPU tasks, one per shard. Its memory reservation (a bucket of decoded
    # audio) also makes its remote args differ from the teacher's, so Ray Data does not fuse the
    # two into one actor, which would serialise decode and forward instead of overlapping them.
    ds = ds.map_batches(DecodeShards(plan.preprocessing, args.bucket_rows, parquet_options), batch_size=1, num_cpus=1,
                        memory=DECODE_TASK_MEMORY)
    ds = ds.map_batches(
        TeacherPredictor, batch_size=args.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"specs": plan.specs, "preprocessing": plan.preprocessing, "level": plan.level,
                               "k": k, "num_classes": plan.num_classes, "precision": args.precision,
                               "device": "cuda" if use_gpu else "cpu"},
        compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
        num_gpus=args.gpus_per_actor if use_gpu else 0, num_cpus=args.cpus_per_actor,
    )
    collector.progress.restart()  # throughput counts from here: Ray start-up is reported apart
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        collector.add(batch)
        collector.check()
    collector.finish()


def report(writer: RunWriter, progress: Progress, skipped: int, reasons: Counter, args, cache_hit: bool = False) -> int:
    """Print the summary (table + one JSON line), record it in the manifest, return the exit code."""
    m = writer.manifest
    el = progress.elapsed
    # The exit code judges the whole run directory, so a rerun (or a cache hit) over a run with
    # too many quarantined keys still fails.
    run_rows = sum(r.rows for r in m.shards.values())
    run_errors = sum(r.error_rows for r in m.shards.values())
    rate = run_errors / (run_rows + run_errors) if run_rows + run_errors else 0.0
    units = progress.frames if m.level == "frame" else progress.samples
    summary = {
        "output": args.output, "fingerprint": m.fingerprint, "cache_hit": cache_hit,
        "shards_done": progress.shards, "shards_skipped": skipped, "shards_total": len(m.shards),
        "samples": progress.samples, "frames": progress.frames, "errors": progress.errors,
        "errors_by_reason": dict(sorted(reasons.items())), "run_error_rate": round(rate, 6),
        "seconds": round(el, 2), "startup_seconds": round(progress.startup, 2), "samples_per_s": round(progress.samples / el, 2) if el > 0 else 0.0,
        "bytes_written": progress.written,
        "bytes_per_sample": round(progress.written / progress.samples, 2) if progress.samples else None,
        "bytes_per_frame": round(progress.written / progress.frames, 2) if progress.frames else None,
        "max_error_rate": args.max_error_rate, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    writer.flush(force=True, run_summary=summary)
    unit = "frame" if m.level == "frame" else "sample"
    print("[pseudo-label] summary")
    print(f"  shards       {progress.shards} done, {skipped} skipped (cached), {len(m.shards)} in the run")
    print(f"  samples      {progress.samples:,}" + (f" ({progress.frames:,} frames)" if m.level == "frame" else ""))
    print(f"  errors       {progress.errors:,} (run directory: {run_errors:,} of {run_rows + run_errors:,}, {rate:.2%})" +
          "".join(f"\n    {r:<20} {n:,}" for r, n in sorted(reasons.items())))
    print(f"  throughput   {summary['samples_per_s']:,} samples/s over {fmt_duration(el)} "
          f"(+{progress.startup:.1f} s start-up)")
    per = summary["bytes_per_frame"] if m.level == "frame" else summary["bytes_per_sample"]
    print(f"  written      {progress.written:,} bytes" + (f", {per} bytes per {unit}" if per else ""))
    print(json.dumps({"summary": summary}), flush=True)
    if rate > args.max_error_rate:
        print(f"[pseudo-label] FAILED: error rate {rate:.2%} exceeds --max-error-rate {args.max_error_rate:.2%}; "
              f"see {storage.join(args.output, 'errors')}", file=sys.stderr, flush=True)
        return 1
    return 0
