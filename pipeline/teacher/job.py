"""The pseudo-label job: sharded corpus -> teacher actors -> soft-target cache.

    python jobs/pseudo_label.py --input data/unlabeled --output runs/st --teacher CKPT_DIR
    ray job submit --working-dir . -- python jobs/pseudo_label.py ...   (same flags)

Everything that can be checked is checked before Ray starts: flags, inputs, teacher specs,
preprocessing, the fingerprint against an existing run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable

from pipeline import storage
from pipeline.cli import (DECODE_TASK_MEMORY, add_limit_flags, add_preprocessing_flags, add_ray_flags, add_trust_flag,
                          check_cpu_room, init_ray, use_gpu)
from pipeline.config import ConfigError, JobParser, add_config_flag, parse_args
from pipeline.inputs import SHARD_EXTENSIONS, check_parquet_shard
from pipeline.shards import FormatError, LeaseHeld, RunWriter
from pipeline.storage import STORAGE_EXIT, StorageError, storage_failure, what_to_do
from pipeline.teacher.commit import Progress, ShardTracker, fmt_duration
# Imported now although only the workers run them: under `ray job submit --working-dir`, the
# driver's copy of pipeline/ may be deleted or rewritten under it mid-run (see
# pipeline.cli.shared_temp_dirs), and a module first imported then would not be found.
from pipeline.teacher.compact import Compactor
from pipeline.teacher.decode import DecodeShards
from pipeline.teacher.plan import ExecPlan, TeacherPlan, exec_plan, plan_teacher
from pipeline.teacher.predictor import TeacherPredictor

if TYPE_CHECKING:
    import pyarrow as pa

# A look at each batch of PART / END records before the driver's tracker takes it
OnRecords = Callable[["pa.Table", ShardTracker], None]


def build_parser() -> argparse.ArgumentParser:
    p = JobParser(
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
    g.add_argument("--top-k", type=int, default=10, help="classes kept per sample (or frame); at most the classes")
    add_trust_flag(g)
    add_preprocessing_flags(p)
    add_limit_flags(p)
    g = p.add_argument_group("execution")
    g.add_argument("--format", choices=["parquet", "webdataset"], default="parquet", help="soft-target shard encoding")
    g.add_argument("--batch-size", type=int, default=64, help="teacher batch size")
    g.add_argument("--actors", type=int, default=None, help="teacher actors; default: one per GPU share, 1 without GPUs")
    g.add_argument("--gpus-per-actor", type=float, default=1.0, help="GPUs per teacher actor (fractional allowed)")
    g.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per teacher actor")
    g.add_argument("--actor-concurrency", type=int, default=None,
                   help="batches each teacher actor works on at once, on threads: while one runs on the GPU, the "
                        "next is staged and copied and the last is turned into part files; default: 3 on GPU "
                        "actors, 1 on CPU actors (their forward is host work already)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: GPU actors when the cluster has GPUs now, else CPU fallback; cuda: always GPU actors "
                        "(waits for an autoscaling GPU group)")
    g.add_argument("--image-decode", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where JPEGs are decoded, resized and cropped: gpu (nvJPEG in the teacher actor; the decode "
                        "tasks only validate them), cpu (the decode tasks, with PIL), auto (gpu when the teacher "
                        "actors get a GPU). The two differ by a few grey levels, so the choice is part of the cache's "
                        "fingerprint")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype on GPU (CPU runs fp32)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the teacher(s) for fixed shapes: batches padded to --batch-size rows, audio "
                        "to length buckets (at most 25%% longer), each shape compiled once per actor; measure it "
                        "first (bench/teacher_throughput.py --compile): it pays only where the forward is the bound")
    g.add_argument("--bucket-rows", type=int, default=1024, help="decoded samples sorted by length together, to cut padding")
    g.add_argument("--max-error-rate", type=float, default=0.05,
                   help="exit non-zero when quarantined / (samples + quarantined) exceeds this")
    g.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    g.add_argument("--verify", action="store_true",
                   help="before skipping complete shards, check their files' sha256 against the commit log (reads "
                        "every file; sizes are always checked)")
    add_ray_flags(g)
    return p


def run(argv=None, on_records: OnRecords | None = None) -> int:
    """Entry point of jobs/pseudo_label.py; returns the process exit code.

    on_records: called with every batch of records the pipeline yields and the tracker about
    to take it (a bench times them: bench/benchlib.py)."""
    parser = build_parser()
    args = parse_args(parser, argv)
    t_plan = time.monotonic()
    early = (ConfigError, FileNotFoundError, FormatError, LeaseHeld, StorageError)
    # Workers write the run directory, in working directories of their own: a relative
    # --output must mean the directory the job was started in.
    args.output = storage.absolute(args.output)
    try:
        ex = exec_plan(args)
        refs = storage.expand_shards(args.input, SHARD_EXTENSIONS)
        first_parquet = next((r.uri for r in refs if r.uri.endswith(".parquet")), None)
        if first_parquet:
            try:
                check_parquet_shard(first_parquet, args.key_column, args.data_column)
            except ValueError as e:
                raise ConfigError(f"--input: {e}") from None
        plan = plan_teacher(args, refs[0].uri)
        if ex.compile and getattr(plan.preprocessing, "features", None) == "fbank":
            raise ConfigError("--compile: fbank features have no fixed shape (Kaldi fbank is padded to the longest "
                              "row of each batch); use --features logmel or none, or leave --compile out")
        writer = RunWriter(args.output, plan.manifest(ex.encoding, ex.parquet_options))
    except early as e:
        parser.error(str(e))
    try:
        removed = writer.cleanup()
        inputs = writer.plan_inputs(refs, verify=ex.verify)
    except early + (ValueError,) as e:
        writer.abandon()
        parser.error(str(e))
    plan_s = time.monotonic() - t_plan  # listing, the run's commit log, matching: grows with the shards
    try:
        return _run(args, ex, plan, refs, writer, inputs, removed, plan_s, on_records)
    except BaseException as e:
        writer.abandon()  # what was committed stays committed; the lease is given back
        failure = storage_failure(e) if isinstance(e, Exception) else None
        if failure is None:
            raise
        # one last line naming the URI and the cause, not Ray's wrapped traceback
        print(f"[pseudo-label] storage error: {failure}; {what_to_do(failure)}", file=sys.stderr, flush=True)
        return STORAGE_EXIT


def _run(args, ex: ExecPlan, plan: TeacherPlan, refs: list, writer: RunWriter, inputs, removed: int,
         plan_s: float, on_records: OnRecords | None) -> int:
    for r in refs:
        if len(r.spellings) > 1:
            print(f"[pseudo-label] warning: input {r.uri} is given {len(r.spellings)} times "
                  f"({', '.join(r.spellings)}); used once", flush=True)
    for name, why in sorted(inputs.damaged.items()):
        print(f"[pseudo-label] shard {name} is damaged ({why}); recomputing it", flush=True)
    skipped = len(inputs.done)
    print(f"[pseudo-label] {len(refs)} input shard(s), {skipped} already complete in {args.output} "
          f"(fingerprint {plan.fingerprint[:12]}{', checksums verified' if ex.verify else ''}); teacher "
          f"{', '.join(plan.teacher['specs'])}; {plan.modality}, {plan.level} level, {plan.num_classes} classes, "
          f"top-{plan.k}" + ("; JPEGs decoded on the GPU (--image-decode)" if getattr(plan.preprocessing, "decode", "cpu")
                             == "gpu" else "")
          + (f"; removed {removed} file(s) no commit names" if removed else ""), flush=True)
    progress = Progress(len(inputs.todo), sum(r.size for r in inputs.todo), skipped, ex.progress_interval)
    if not inputs.todo:
        print("[pseudo-label] cache hit: every shard is complete for this fingerprint; no teacher batch was run",
              flush=True)
        return report(writer, progress, skipped, None, args, ex, plan_s, cache_hit=True)
    todo = {inputs.names[r.uri]: (r.uri, r.size) for r in inputs.todo}
    tracker = execute(ex, plan, writer, todo, progress, on_records)
    return report(writer, progress, skipped, tracker, args, ex, plan_s, damaged=len(inputs.damaged))


def build_dataset(ex: ExecPlan, plan: TeacherPlan, run_uri: str, facts, shards: dict[str, tuple[str, int]],
                  use_gpu: bool, actors: int):
    """The Ray dataset of the run (decode tasks -> teacher actors writing parts) whose rows
    are PART / END records; built apart from draining it so benches and tests can drain it
    their own way."""
    import pyarrow as pa
    import ray
    from ray.data import ActorPoolStrategy

    concurrency = actor_concurrency(ex, use_gpu)
    # Decode runs as plain CPU tasks, each reading whole shards (one, or a few small ones: see
    # shards_per_decode_task). Its memory reservation (a bucket of decoded audio) also makes its
    # remote args differ from the teacher's, so Ray Data does not fuse the two into one actor,
    # which would serialise decode and forward instead of overlapping them.
    group = shards_per_decode_task([size for _, size in shards.values()], ray.cluster_resources().get("CPU", 1))
    # One input block per decode task, exactly ``group`` shards each (the last may hold fewer), so
    # that no task is cut from two blocks. One block per shard cost the driver ~20 KB of Ray
    # objects and metadata per shard (bench/many_shards.py).
    names, uris = list(shards), [u for u, _ in shards.values()]
    ds = ray.data.from_arrow([pa.table({"name": names[i:i + group], "uri": uris[i:i + group]})
                              for i in range(0, len(names), group)])
    ds = ds.map_batches(DecodeShards(plan.preprocessing, ex.bucket_rows, ex.parquet_options, ex.limits),
                        batch_size=group, num_cpus=1, memory=DECODE_TASK_MEMORY)
    return ds.map_batches(
        TeacherPredictor, batch_size=ex.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"specs": plan.specs, "trust": plan.trust, "preprocessing": plan.preprocessing,
                               "facts": facts, "run_uri": run_uri, "precision": ex.precision,
                               "device": "cuda" if use_gpu else "cpu", "concurrency": concurrency,
                               "compile_batch": ex.batch_size if ex.compile else None},
        # Calls run concurrently on the actor's threads, so its host work overlaps the forward
        # (pipeline.teacher.predictor); one more task in flight than calls, so the next batch
        # is already fetched when a call ends.
        compute=ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=concurrency,
                                  enable_true_multi_threading=True, max_tasks_in_flight_per_actor=concurrency + 1),
        num_gpus=ex.gpus_per_actor if use_gpu else 0, num_cpus=ex.cpus_per_actor,
    )


DECODE_TASKS_PER_CPU = 8  # at least this many decode tasks per CPU of the cluster: load balance
DECODE_TASK_BYTES = 256 * 2**20  # at most this much input per decode task (a retry redoes it all)
DECODE_TASK_SHARDS = 32  # and at most this many shards: CPUs counted now may be fewer than later


def shards_per_decode_task(sizes: list[int], cpus: float) -> int:
    """How many input shards one decode task reads, in turn (each still ends with its own END row).

    One, unless the run has many small shards: Ray spends ~25-30 ms of a worker's CPU on every
    task (scheduling, the streaming generator, putting blocks, stats), which is more than
    decoding a shard of a thousand thumbnails costs. Shards are then grouped, keeping at least
    DECODE_TASKS_PER_CPU tasks per CPU and at most DECODE_TASK_BYTES of input and
    DECODE_TASK_SHARDS shards per task (an autoscaling cluster has more CPUs later than now).
    sizes: input shard sizes in bytes (0 where unknown)."""
    if not sizes:
        return 1
    mean = max(sum(sizes) / len(sizes), 1.0)
    by_count = len(sizes) // max(1, int(DECODE_TASKS_PER_CPU * max(cpus, 1)))
    return max(1, min(by_count, int(DECODE_TASK_BYTES // mean), DECODE_TASK_SHARDS))


def default_actor_concurrency(use_gpu: bool) -> int:
    """Calls one teacher actor runs at once without --actor-concurrency: 3 on a GPU (one batch
    on the device, one staged, one written), 1 on a CPU, where the forward is host work and
    more calls would only contend for the actor's CPUs."""
    return 3 if use_gpu else 1


def actor_concurrency(ex: ExecPlan, use_gpu: bool) -> int:
    """--actor-concurrency, else ``default_actor_concurrency``."""
    return ex.actor_concurrency or default_actor_concurrency(use_gpu)


def ray_compactor(run_uri: str, facts):
    """(compact, wait) for ShardTracker: compaction on long-lived actors, one pinned to each node,
    called round-robin, so that shard files are written on every node and no node's compactor
    queues the whole run (on object storage, or a shared file system, any node can read any
    part).

    Actors, not tasks: a task per shard would often land on a fresh worker process and pay its
    start-up (imports) every time, which costs more than compacting a small shard. No CPU is
    reserved: a compaction is a little I/O and a sort, and must never queue behind the decode
    tasks that fill every CPU. Pinned hard: SPREAD, and even soft node affinity, placed both of
    a two-node cluster's compactors on the driver's node. A compaction whose actor died or
    cannot be restarted (its node left) is resubmitted to the next compactor; with none left,
    to one placed anywhere."""
    import itertools

    import ray
    from ray.exceptions import ActorUnschedulableError, RayActorError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)(Compactor)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    pool = [actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(run_uri, facts)
            for n in nodes] or [actor.remote(run_uri, facts)]
    turn = itertools.count()  # round-robin over the pool
    handles = itertools.count()  # one per compact() call, stable across a resubmission
    jobs: dict[int, tuple] = {}  # handle -> (ref, actor, args)

    def submit(handle: int, args: tuple) -> None:
        if not pool:
            pool.append(actor.remote(run_uri, facts))
        target = pool[next(turn) % len(pool)]
        jobs[handle] = (target.compact.remote(*args), target, args)

    def compact(name, input_uri, parts, expected, expected_hash):
        handle = next(handles)
        submit(handle, (name, input_uri, parts, expected, expected_hash))
        return handle

    def wait(pending, timeout):
        refs = {jobs[h][0]: h for h in pending}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout, fetch_local=True)
        done = []
        for r in ready:
            h = refs[r]
            _, target, args = jobs[h]
            try:
                done.append((h, ray.get(r)))
            # its node is gone: the actor died, or (pinned there) can never be restarted
            except (RayActorError, ActorUnschedulableError):
                if target in pool:
                    pool.remove(target)
                submit(h, args)
                continue
            del jobs[h]
        finished = {h for h, _ in done}
        return done, [h for h in pending if h not in finished]

    return compact, wait


def execute(ex: ExecPlan, plan: TeacherPlan, writer: RunWriter, shards: dict[str, tuple[str, int]],
            progress: Progress, on_records: OnRecords | None = None) -> ShardTracker:
    """Start Ray, run the pipeline, commit every shard it completes; returns the tracker (its
    ``dataset`` is the drained Ray dataset, for its stats)."""
    import ray
    from ray.data import DataContext

    init_ray(ex.address, ex.dashboard)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    # Ray Data's per-task USS poll (a thread reading /proc/PID/smaps every second in every task,
    # for its stats) is a diagnostic kdpipe does not read; with a large object store mapped into
    # every worker, each read walks its page tables.
    ctx.memory_usage_poll_interval_s = None
    gpu = use_gpu(ex.device)
    gpus = ray.cluster_resources().get("GPU", 0)
    actors = ex.actors or (max(1, int(gpus // ex.gpus_per_actor)) if gpus and gpu else 1)
    check_cpu_room("pseudo-label", "--actors", actors, "--cpus-per-actor", ex.cpus_per_actor, ex.address)
    print(f"[pseudo-label] {actors} teacher actor(s) on {'GPU' if gpu else 'CPU (no GPU in the cluster)'}, "
          f"batch {ex.batch_size}, {actor_concurrency(ex, gpu)} call(s) in flight per actor, {len(shards)} shard(s) "
          "to compute", flush=True)
    facts = writer.manifest.facts()
    ds = build_dataset(ex, plan, writer.uri, facts, shards, gpu, actors)
    tracker = ShardTracker(writer, shards, progress, *ray_compactor(writer.uri, facts))
    tracker.dataset = ds
    progress.restart()  # throughput counts from here: Ray start-up is reported apart
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        if on_records is not None:
            on_records(batch, tracker)
        tracker.add(batch)
    tracker.finish()
    return tracker


def report(writer: RunWriter, progress: Progress, skipped: int, tracker: ShardTracker | None, args, ex: ExecPlan,
           plan_s: float, cache_hit: bool = False, damaged: int = 0) -> int:
    """Print the summary (table + one JSON line), record it in the manifest, return the exit code."""
    m = writer.manifest
    el = progress.elapsed
    reasons = tracker.error_reasons if tracker else Counter()
    received = tracker.received_bytes if tracker else 0
    decoded = dict(tracker.image_decode) if tracker and any(tracker.image_decode.values()) else None
    # The exit code judges the whole run directory, so a rerun (or a cache hit) over a run with
    # too many quarantined keys still fails.
    run_rows = sum(r.rows for r in m.shards.values())
    run_errors = sum(r.error_rows for r in m.shards.values())
    rate = run_errors / (run_rows + run_errors) if run_rows + run_errors else 0.0
    summary = {
        "output": args.output, "fingerprint": m.fingerprint, "cache_hit": cache_hit,
        "shards_done": progress.shards, "shards_skipped": skipped, "shards_recomputed_damaged": damaged,
        "shards_total": len(m.shards),
        "samples": progress.samples, "frames": progress.frames, "errors": progress.errors,
        "errors_by_reason": dict(sorted(reasons.items())), "run_error_rate": round(rate, 6),
        "seconds": round(el, 2), "startup_seconds": round(progress.startup, 2), "plan_seconds": round(plan_s, 2),
        "samples_per_s": round(progress.samples / el, 2) if el > 0 else 0.0,
        "bytes_written": progress.written,
        "bytes_per_sample": round(progress.written / progress.samples, 2) if progress.samples else None,
        "bytes_per_frame": round(progress.written / progress.frames, 2) if progress.frames else None,
        "driver_bytes_received": received,
        "driver_bytes_per_sample": round(received / (progress.samples + progress.errors), 4)
        if progress.samples + progress.errors else None,
        "max_error_rate": ex.max_error_rate, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if decoded:  # image decode="gpu": how the images got their pixels
        summary["image_decode"] = decoded
    writer.close(run_summary=summary)
    unit = "frame" if m.level == "frame" else "sample"
    print("[pseudo-label] summary")
    print(f"  shards       {progress.shards} done, {skipped} skipped (cached), {len(m.shards)} in the run")
    print(f"  samples      {progress.samples:,}" + (f" ({progress.frames:,} frames)" if m.level == "frame" else ""))
    print(f"  errors       {progress.errors:,} (run directory: {run_errors:,} of {run_rows + run_errors:,}, {rate:.2%})" +
          "".join(f"\n    {r:<20} {n:,}" for r, n in sorted(reasons.items())))
    if decoded:
        print(f"  decode       {decoded['gpu_decoded']:,} on the GPU ({decoded['gpu_progressive']:,} progressive), "
              f"{decoded['cpu_decoded']:,} by the decode tasks (not GPU-decodable), "
              f"{decoded['cpu_fallback']:,} refused by the GPU decoder and decoded on the host")
    print(f"  throughput   {summary['samples_per_s']:,} samples/s over {fmt_duration(el)} "
          f"(+{progress.startup:.1f} s start-up, {plan_s:.1f} s planning)")
    per = summary["bytes_per_frame"] if m.level == "frame" else summary["bytes_per_sample"]
    print(f"  written      {progress.written:,} bytes" + (f", {per} bytes per {unit}" if per else ""))
    print(f"  driver       received {received:,} bytes of records"
          + (f" ({summary['driver_bytes_per_sample']} per sample)" if summary["driver_bytes_per_sample"] else ""))
    print(json.dumps({"summary": summary}), flush=True)
    if rate > ex.max_error_rate:
        print(f"[pseudo-label] FAILED: error rate {rate:.2%} exceeds --max-error-rate {ex.max_error_rate:.2%}; "
              f"see {storage.join(args.output, 'errors')}", file=sys.stderr, flush=True)
        return 1
    return 0
