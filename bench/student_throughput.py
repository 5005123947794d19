# python bench/student_throughput.py --preset cpu-small
"""Student training throughput: the pipeline vs a pure train step; hard labels vs cached soft
targets vs online distillation.

    python bench/student_throughput.py --preset cpu-step               # CPU: a step-dominated student
    python bench/student_throughput.py --preset tiny-image             # CPU: 100k 8x8 images, input-bound
    python bench/student_throughput.py --preset cpu-small              # CPU: hard vs soft vs online
    python bench/student_throughput.py --preset gpu-speech             # GPU box: wav2vec2-large teacher
    python bench/student_throughput.py --preset gpu-image              # GPU box: ViT-B/16 teacher
    python bench/student_throughput.py --preset gpu-speech --smoke     # tiny sizes: checks it runs (CPU ok)

One run, one machine, the same student, batch size and clips:
  0. builds a labeled corpus (FLAC, JPEG or PNG in WebDataset tars, with .cls or .frames.npy
     labels) and its soft-target cache (jobs/pseudo_label.py with the preset's teacher);
  pure: the student's train step (pipeline.models.runner + the job's StepLoss + AdamW) over
     batches from the cache already collated in memory, same device and torch threads as a
     training worker; timed before and after the runs below (wall, and CPU per sample);
  input path: ShardRows (read the soft-target shard, decode the input shard, join) + collate,
     in this process, CPU per sample; next to the teacher stage's decode task on the same
     shards (pipeline.teacher.decode), the floor any input path pays;
  (a) jobs/train_student.py --labeled CORPUS                 hard labels only
  (b) jobs/train_student.py --soft-targets CACHE             the cached soft targets
  (c) jobs/train_student.py --online-teacher T --input CORPUS  the teacher in the training loop
Each run is a child process with a fresh local Ray; throughput is read from OUTPUT/metrics.jsonl
(samples_per_s per epoch) and the steady state is the mean over the epochs after the first
(the first pays for worker start-up and the first dataset execution).

The last lines are ``soft_over_hard=R1 soft_over_online=R2`` and ``ratio=R``: (b)'s steady
throughput / the pure train step's (wall); target >= 0.9 for a step-dominated student.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import REPO, audio_pool, image_pool, mib, run_job, write_corpus  # noqa: E402

PRESETS = {
    # A step-dominated student: the audio CNN at width 32 trains at ~10 ms of CPU per ~1 s clip,
    # ~20x what decoding the clip costs, so the input path has ample time to keep up.
    "cpu-step": dict(
        modality="audio", seconds=(0.8, 1.2), pool=128, shards=32, per_shard=128, num_classes=10, frame_labels=None,
        teacher="pipeline.models.zoo:audio_cnn?width=32", student="pipeline.models.zoo:audio_cnn?width=32",
        batch_size=64, epochs=3, top_k=5, prep=[], device="cpu", workers=1, cpus_per_worker=1.0,
        runs=["soft"], smoke=dict(shards=2, per_shard=32, epochs=2, step_seconds=1.0),
    ),
    # Input-bound by design: 100,000 8x8 PNGs and a 1.2k-parameter CNN (issue 10's case). What
    # matters is the input path's CPU per sample next to the teacher stage's decode of the same images.
    "tiny-image": dict(
        modality="image", image_png=8, pool=4096, shards=100, per_shard=1000, num_classes=10, frame_labels=None,
        teacher="pipeline.models.zoo:image_cnn?width=4", student="pipeline.models.zoo:image_cnn?width=4",
        batch_size=512, epochs=2, top_k=5, prep=["--image-resize", "8", "--image-crop", "8"], device="cpu",
        workers=1, cpus_per_worker=1.0, runs=["soft"],
        smoke=dict(shards=4, per_shard=500, epochs=2, step_seconds=1.0),
    ),
    # Utterance-level audio CNNs over log-mel of ~1 s clips. Per sample on one core: student
    # train step ~2.5 ms, teacher forward ~3 ms, so (b)/(c) should come out near 2.
    "cpu-small": dict(
        modality="audio", seconds=(0.8, 1.2), pool=128, shards=16, per_shard=128, num_classes=10, frame_labels=None,
        teacher="pipeline.models.zoo:audio_cnn?width=32", student="pipeline.models.zoo:audio_cnn?width=8",
        batch_size=64, epochs=4, top_k=5, prep=[], device="cpu", workers=1, cpus_per_worker=1.0,
        smoke=dict(shards=2, per_shard=32, epochs=2, step_seconds=1.0),
    ),
    # Frame-level speech: wav2vec2-large teacher (20 ms frames, top-10) and a small wav2vec2
    # student on raw 10 s clips (both take raw waveform: the student must see the cache's input).
    "gpu-speech": dict(
        modality="audio", seconds=(10.0, 10.0), pool=64, shards=16, per_shard=256, num_classes=32, frame_labels=10.0,
        teacher="pipeline.models.zoo:wav2vec2_large_frames",
        student="pipeline.models.zoo:wav2vec2_frames?conv_dim=256&embed_dim=256&encoder_layers=4&ffn=1024"
                "&heads=4&pos_conv_groups=16",
        batch_size=32, epochs=3, top_k=10, prep=["--features", "none"], device="auto", workers=1, cpus_per_worker=1.0,
        smoke=dict(shards=2, per_shard=3, epochs=2, batch_size=3, pool=4, seconds=(1.0, 1.5), step_seconds=1.0),
    ),
    # Images: ViT-B/16 teacher, ResNet-50 student, 500x375 JPEGs -> 224. CPU JPEG decode may
    # bound all three runs on a GPU box (see docs/performance.md), which would flatten (b)/(c).
    "gpu-image": dict(
        modality="image", image_size=(500, 375), pool=256, shards=32, per_shard=500, num_classes=1000,
        frame_labels=None, teacher="pipeline.models.zoo:vit", student="pipeline.models.zoo:resnet50",
        batch_size=128, epochs=3, top_k=10, prep=["--image-resize", "224", "--image-crop", "224"], device="auto",
        workers=1, cpus_per_worker=1.0,
        smoke=dict(shards=2, per_shard=4, epochs=2, batch_size=4, pool=8, step_seconds=1.0),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                   help="student, teacher, corpus, batch size: cpu-small (runs here), gpu-speech / gpu-image (GPU box)")
    p.add_argument("--smoke", action="store_true", help="tiny corpus, 2 epochs: checks that a preset runs (CPU ok)")
    p.add_argument("--student", default=None, help="override the preset's student spec")
    p.add_argument("--teacher", default=None, help="override the preset's teacher spec (cache and online)")
    p.add_argument("--shards", type=int, default=None, help="corpus shards (default: the preset's)")
    p.add_argument("--per-shard", type=int, default=None, help="samples per shard (default: the preset's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run; the first is excluded from the steady state")
    p.add_argument("--batch-size", type=int, default=None, help="batch size per worker (default: the preset's)")
    p.add_argument("--top-k", type=int, default=None, help="k of the cache, and k' of online distillation")
    p.add_argument("--workers", type=int, default=None, help="training workers (default: the preset's)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per training worker")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="device (default: the preset's)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype on GPU")
    p.add_argument("--only", nargs="+", choices=["hard", "soft", "online"], default=None,
                   help="run only these (ratios need hard/online with soft)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the sequence this many times, reversing the order each time (a b c c b a ...), and "
                        "average: cancels drift in the load of a shared machine")
    p.add_argument("--step-seconds", type=float, default=None,
                   help="timed seconds for each in-process cost measurement (default 4)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="everything after this goes to every train_student.py run verbatim")
    p.add_argument("--workdir", default=None, help="where corpus, cache and outputs go (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json", default=None, metavar="FILE", help="also write all numbers to this JSON file")
    return p


def resolve(args) -> dict:
    cfg = dict(PRESETS[args.preset])
    cfg.setdefault("step_seconds", 4.0)
    if args.smoke:
        cfg.update(cfg["smoke"])
    for name in ("student", "teacher", "shards", "per_shard", "epochs", "batch_size", "top_k", "workers",
                 "cpus_per_worker", "device", "step_seconds"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    return cfg


def _prep(cfg: dict) -> dict:
    from pipeline.cli import add_preprocessing_flags, resolve_preprocessing

    p = argparse.ArgumentParser()
    add_preprocessing_flags(p)
    return resolve_preprocessing(cfg["modality"], None, p.parse_args(cfg["prep"]))


def teacher_forward_cost(cfg: dict, pool, device: str, threads: int, precision: str) -> float:
    """Seconds per sample of the online teacher's forward + top-k (what (c) adds per step)."""
    import torch

    from pipeline.modalities import prepare, preprocessing_from_dict
    from pipeline.modalities.payload import payload_array
    from pipeline.models.runner import ModelRunner
    from pipeline.softtargets import topk_from_logits

    torch.set_num_threads(threads)
    pp = preprocessing_from_dict(_prep(cfg))
    B = cfg["batch_size"]
    col = payload_array([prepare(pool[i % len(pool)][0], pp)[0][1] for i in range(B)], pp)
    runner = ModelRunner.from_specs([cfg["teacher"]], (), pp, device, precision)
    x, lens = runner.to_device(col)

    def fwd():
        topk_from_logits(runner.predict(x, lens).logits[0], cfg["top_k"])

    return _timed(fwd, cfg["step_seconds"], device) / B


def _timed(fn, seconds: float, device: str) -> float:
    """Seconds per call: CPU time of this process on CPU (robust to other load on a shared
    machine; one thread, as a worker has), wall time with synchronisation on CUDA."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync()
    return (time.process_time() - c0 if device == "cpu" else time.perf_counter() - t0) / n


def cache_batches(cache: str, cfg: dict, max_rows: int) -> tuple:
    """(DataPlan, collated batches of the cache's first shards, input-path CPU per sample,
    teacher-stage decode CPU per sample), all in this process, one core."""
    import pyarrow as pa

    from pipeline.shards import SoftTargetRun
    from pipeline.student.collate import collate
    from pipeline.student.data import ShardRows
    from pipeline.student.plan import DataPlan
    from pipeline.modalities import preprocessing_from_dict
    from pipeline.teacher.decode import DecodeShards

    run = SoftTargetRun(cache)
    m = run.manifest
    prep = preprocessing_from_dict(m.preprocessing)
    from pipeline.student.job import build_parser as train_parser
    from pipeline.student.job import pad_samples

    # padded as train_student.py pads by default (the same shapes reach the step)
    data = DataPlan(modality=m.modality, level=m.level, preprocessing=prep, num_classes=m.num_classes, stored_k=m.k,
                    frame_shift_ms=m.frame_shift_ms,
                    pad_samples=pad_samples(m.preprocessing, train_parser().get_default("pad_ms")))
    rows = ShardRows(data, run.uri, run.facts)
    names, n = [], 0
    for name in run.shard_names:
        names.append(name)
        n += run.record(name).rows
        if n >= max_rows:
            break

    def student_input():
        tables = []
        for name in names:
            rec = run.record(name)
            tables += list(rows.pseudo(name, rec.input, rec))
        t = pa.concat_tables(tables)
        B = cfg["batch_size"]
        return [collate(t.slice(i, B), data) for i in range(0, t.num_rows - B + 1, B)] or [collate(t, data)], t.num_rows

    def decode():
        dec = DecodeShards(prep)
        return sum(tb.num_rows for name in names for tb in dec.shard(name, run.record(name).input))

    student_input(), decode()  # warm: imports, page cache
    # alternated, best of 3 each: on a shared machine one timing of each drifts by +-30 %
    input_s = decode_s = float("inf")
    for _ in range(3):
        c0 = time.process_time()
        batches, n_rows = student_input()
        input_s = min(input_s, (time.process_time() - c0) / n_rows)
        c0 = time.process_time()
        n_dec = decode()
        decode_s = min(decode_s, (time.process_time() - c0) / n_dec)
    return data, batches, input_s, decode_s


def pure_step(cfg: dict, data, batches: list, device: str, threads: int, precision: str) -> dict:
    """The student's train step over batches already in memory: the pieces train_loop uses
    (seeded init, ModelRunner, StepLoss, AdamW, the same precision), nothing of the input path.
    Returns samples/s (wall) and CPU ms per sample."""
    import torch

    from pipeline.models.runner import ModelRunner
    from pipeline.models.spec import build_model, parse_spec
    from pipeline.student.plan import LossPlan, OptimPlan
    from pipeline.student.train import StepLoss, lr_lambda, make_optimizer, train_step

    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = build_model(parse_spec(cfg["student"]), seed=0).to(dev).train()
    runner = ModelRunner([model], data.preprocessing, dev, precision)
    loss_fn = StepLoss(LossPlan(loss="kl", alpha=0.0))
    optim = OptimPlan(total_steps=10**6)  # the job's defaults: AdamW, clipping at 1.0, warmup + cosine
    opt = make_optimizer(model.parameters(), optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_lambda(k, 10, optim.total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=device == "cuda" and precision == "fp16")
    on_dev = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    i = [0]

    def step():  # train_loop's own step, minus the data iterator
        b = on_dev[i[0] % len(on_dev)]
        i[0] += 1
        loss, _ = train_step(runner, loss_fn, opt, sched, scaler, b, optim.grad_clip)
        float(loss.detach())  # the loop reads the loss back every step

    for _ in range(3):
        step()
    sync()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < cfg["step_seconds"]:
        step()
        n += int(on_dev[(i[0] - 1) % len(on_dev)]["x"].shape[0])
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"samples_per_s": n / wall, "cpu_ms_per_sample": 1e3 * cpu / n, "samples": n, "seconds": wall}


def train_argv(cfg: dict, args, out: str) -> list[str]:
    return ["--student", cfg["student"], "--output", out, "--epochs", str(cfg["epochs"]),
            "--batch-size", str(cfg["batch_size"]), "--workers", str(cfg["workers"]),
            "--cpus-per-worker", str(cfg["cpus_per_worker"]), "--device", cfg["device"], "--precision", args.precision,
            "--seed", "0", *cfg["prep"], *args.extra]


def train_once(cfg: dict, args, work: str, name: str, extra: list[str], rep: int) -> dict:
    """One train_student.py run in a child process; its steady-state numbers."""
    out = os.path.join(work, f"student-{name}-{rep}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(REPO, "jobs", "train_student.py"), *train_argv(cfg, args, out), *extra]
    metrics_path = os.path.join(out, "metrics.jsonl")
    r = run_job(cmd, os.path.join(work, f"train-{name}-{rep}.log"), probe=lambda: epochs_done(metrics_path))
    hist = read_metrics(out)
    if r.rc != 0 or not hist:
        print(r.output[-6000:], file=sys.stderr)
        raise SystemExit(f"train run {name!r} failed (exit {r.rc}); log in {work}")
    later = hist[1:] or hist
    n_later = sum(h["samples"] for h in later)
    cpu = steady_cpu(r.tree, len(hist))
    role_ms = lambda key: 1e3 * sum(v for k, v in cpu.items() if key in k) / n_later if cpu else None  # noqa: E731
    return {"per_epoch": [h["samples_per_s"] for h in hist],
            "steady": n_later / sum(h["seconds"] for h in later), "best": max(h["samples_per_s"] for h in later),
            "steady_wall": sum(h["seconds"] for h in later), "epochs": len(hist), "wall": r.wall, "steady_cpu": cpu,
            "worker_cpu_ms": role_ms("RayTrainWorker"), "data_cpu_ms": role_ms("ShardRows"),
            "samples_per_epoch": hist[-1]["samples"], "loss": hist[-1]["loss"],
            "data_wait_share": hist[-1].get("data_wait_share"),
            "phases": hist[-1].get("phases"), "phases_seconds": hist[-1].get("seconds"),
            "startup_s": hist[0].get("startup_s"),
            "peak_driver_rss": r.tree.peak_driver_rss, "peak_worker_rss": r.tree.peak_worker_rss,
            "cpu_by_role": r.tree.cpu_by_role}


def aggregate(runs: list[dict]) -> dict:
    """Repeats of one configuration: mean steady throughput and CPU per sample, best epoch,
    summed steady wall and CPU."""
    mean = lambda key: (sum(r[key] for r in runs) / len(runs)) if all(r[key] is not None for r in runs) else None  # noqa: E731
    cpu: dict[str, float] = {}
    for r in runs:
        for k, v in r["steady_cpu"].items():
            cpu[k] = cpu.get(k, 0.0) + v
    return {"steady": mean("steady"), "steady_each": [r["steady"] for r in runs], "best": max(r["best"] for r in runs),
            "worker_cpu_ms_each": [r["worker_cpu_ms"] for r in runs],
            "per_epoch": [x for r in runs for x in r["per_epoch"]], "steady_wall": sum(r["steady_wall"] for r in runs),
            "worker_cpu_ms": mean("worker_cpu_ms"), "data_cpu_ms": mean("data_cpu_ms"),
            "steady_cpu": dict(sorted(cpu.items(), key=lambda kv: -kv[1])), "wall": sum(r["wall"] for r in runs),
            "peak_driver_rss": max(r["peak_driver_rss"] for r in runs),
            "peak_worker_rss": max(r["peak_worker_rss"] for r in runs), "repeats": len(runs),
            "loss": runs[-1]["loss"], "samples_per_epoch": runs[-1]["samples_per_epoch"],
            "data_wait_share": runs[-1]["data_wait_share"], "phases": runs[-1]["phases"],
            "startup_s": [r["startup_s"] for r in runs],
            "phases_seconds": runs[-1]["phases_seconds"]}


def epochs_done(metrics_path: str) -> int:
    """Lines in OUTPUT/metrics.jsonl: epochs finished so far (rank 0 rewrites it after each)."""
    try:
        with open(metrics_path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def steady_cpu(tree, epochs: int) -> dict:
    """CPU seconds per role from the end of epoch 1 to the end of the last epoch, using the
    epoch counter sampled with the process tree (to within one sampling interval)."""
    t_first = next((t for t, _, e in tree.series if e is not None and e >= 1), None)
    t_last = next((t for t, _, e in tree.series if e is not None and e >= epochs), None)
    if t_first is None or t_last is None or t_last <= t_first:
        return {}
    return tree.cpu_between(t_first, t_last)


def read_metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    work = args.workdir or tempfile.mkdtemp(prefix="kdpipe-bench-student-")
    os.makedirs(work, exist_ok=True)
    runs = args.only or cfg.get("runs") or ["hard", "soft", "online"]
    results: dict = {"preset": args.preset, "smoke": args.smoke, "cpus": os.cpu_count(),
                     "config": {k: v for k, v in cfg.items() if k != "smoke"}}
    try:
        import torch

        device = "cuda" if cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available()) else "cpu"
        cfg["device"] = device
        threads = max(1, int(cfg["cpus_per_worker"])) if device == "cpu" else torch.get_num_threads()
        print(f"[bench] preset {args.preset}{' (smoke)' if args.smoke else ''}: student {cfg['student']}, teacher "
              f"{cfg['teacher']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs, {cfg['workers']} worker(s), "
              f"device {device}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; work dir {work}",
              flush=True)
        t0 = time.perf_counter()
        if cfg["modality"] == "audio":
            pool, ext = audio_pool(cfg["pool"], cfg["seconds"]), "flac"
        elif cfg.get("image_png"):
            from teacher_driver import png_pool

            pool, ext = png_pool(cfg["pool"]), "png"
        else:
            pool, ext = image_pool(cfg["pool"], cfg["image_size"]), "jpg"
        corpus = write_corpus(os.path.join(work, "corpus"), pool, ext, cfg["shards"], cfg["per_shard"],
                              num_classes=cfg["num_classes"], frame_labels_ms=cfg["frame_labels"])
        print(f"[bench] corpus: {len(corpus.shards)} shards, {corpus.samples:,} labeled samples, "
              f"{corpus.bytes / 2**20:,.1f} MiB ({time.perf_counter() - t0:.1f} s)", flush=True)

        cache = os.path.join(work, "cache")
        cmd = [sys.executable, os.path.join(REPO, "jobs", "pseudo_label.py"), "--input", corpus.root,
               "--output", cache, "--teacher", cfg["teacher"], "--top-k", str(cfg["top_k"]),
               "--batch-size", str(cfg["batch_size"]), "--device", device, "--precision", args.precision,
               "--progress-interval", "60", *cfg["prep"]]
        r = run_job(cmd, os.path.join(work, "pseudo_label.log"))
        if r.rc != 0 or r.summary is None:
            print(r.output[-6000:], file=sys.stderr)
            raise SystemExit(f"pseudo-label failed (exit {r.rc})")
        results["cache"] = r.summary
        # The teacher stage's decode tasks in their own pipeline (a teacher actor beside them, as a
        # training worker sits beside the student's data tasks): the like-for-like floor for (b)'s
        # data-task CPU. Their start-up (interpreter, imports) is left out, as (b)'s steady epochs leave it out.
        decode_work = sum(v for k, v in r.tree.work_cpu_by_role.items() if "DecodeShards" in k)
        results["teacher_decode_task_cpu_ms"] = (1e3 * decode_work / r.summary["samples"]
                                                 if decode_work and r.summary["samples"] and not r.summary["cache_hit"]
                                                 else None)
        print(f"[bench] soft-target cache: {r.summary['samples']:,} samples, {r.summary['bytes_written']:,} bytes, "
              f"teacher stage {r.summary['samples_per_s']:,.1f} samples/s", flush=True)

        torch.set_num_threads(threads)
        data, batches, input_s, decode_s = cache_batches(cache, cfg, max_rows=max(8 * cfg["batch_size"], 2000))
        costs = {"input_cpu_ms": 1e3 * input_s, "decode_cpu_ms": 1e3 * decode_s, "input_over_decode": input_s / decode_s,
                 "threads": threads, "device": device}
        costs["pure_before"] = pure_step(cfg, data, batches, device, threads, args.precision)
        print(f"[bench] in-process, per sample: input path (read cache + decode + join + collate) "
              f"{costs['input_cpu_ms']:.3f} ms CPU, the teacher stage's decode {costs['decode_cpu_ms']:.3f} ms "
              f"({costs['input_over_decode']:.2f}x); pure train step {costs['pure_before']['samples_per_s']:,.1f} "
              f"samples/s ({costs['pure_before']['cpu_ms_per_sample']:.3f} ms CPU)", flush=True)
        if "online" in runs:
            costs["teacher_forward_ms"] = 1e3 * teacher_forward_cost(cfg, pool, device, threads, args.precision)
            step_ms = costs["pure_before"]["cpu_ms_per_sample"]
            costs["expected_soft_over_online"] = (step_ms + costs["teacher_forward_ms"]) / step_ms
        results["in_process"] = costs

        extra = {"hard": ["--labeled", corpus.root],
                 "soft": ["--soft-targets", cache, "--top-k", str(cfg["top_k"])],
                 "online": ["--online-teacher", cfg["teacher"], "--input", corpus.root, "--top-k", str(cfg["top_k"])]}
        order = [n for rep in range(args.repeats) for n in (runs if rep % 2 == 0 else runs[::-1])]
        done: dict[str, list] = {}
        for name in order:
            one = train_once(cfg, args, work, name, extra[name], len(done.get(name, [])))
            done.setdefault(name, []).append(one)
            print(f"[bench] {name:<6} per epoch {', '.join(f'{v:,.1f}' for v in one['per_epoch'])} samples/s; "
                  f"steady {one['steady']:,.1f} samples/s ({one['wall']:.0f} s in all)", flush=True)
        table = {name: aggregate(done[name]) for name in runs}
        results["runs"] = table
        costs["pure_after"] = pure_step(cfg, data, batches, device, threads, args.precision)
        pure = (costs["pure_before"]["samples_per_s"] + costs["pure_after"]["samples_per_s"]) / 2
        costs["pure_samples_per_s"] = pure
        report(cfg, costs, table, results["teacher_decode_task_cpu_ms"])
        ratios = {}
        if "soft" in table and "hard" in table:
            ratios["soft_over_hard"] = table["soft"]["steady"] / table["hard"]["steady"]
        if "soft" in table and "online" in table:
            ratios["soft_over_online"] = table["soft"]["steady"] / table["online"]["steady"]
        dec = results["teacher_decode_task_cpu_ms"]
        if "soft" in table and table["soft"]["data_cpu_ms"] and dec:
            ratios["data_tasks_over_decode_tasks"] = table["soft"]["data_cpu_ms"] / dec
        if "soft" in table:
            ratios["ratio"] = table["soft"]["steady"] / pure
        results["ratios"] = ratios
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        others = " ".join(f"{k}={v:.2f}" for k, v in ratios.items() if k != "ratio")
        if others:
            print(others)
        print(f"ratio={ratios['ratio']:.3f}" if "ratio" in ratios else "no ratio (needs the soft run)")
        return 0
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def report(cfg: dict, costs: dict, table: dict, decode_task_ms: float | None) -> None:
    """The table; decode_task_ms: CPU per sample of the teacher stage's decode tasks in their pipeline."""
    print(f"\n== student {cfg['student']}  batch {cfg['batch_size']}  {cfg['workers']} worker(s)  device {cfg['device']}  "
          f"({os.cpu_count()} CPUs)")
    pb, pa_ = costs["pure_before"], costs["pure_after"]
    print(f"  pure train step (batches in memory)  {pb['samples_per_s']:,.1f} before, {pa_['samples_per_s']:,.1f} after "
          f"the runs: {costs['pure_samples_per_s']:,.1f} samples/s ({pb['cpu_ms_per_sample']:.3f} / "
          f"{pa_['cpu_ms_per_sample']:.3f} ms CPU per sample)")
    print(f"  input path, in process   {costs['input_cpu_ms']:.3f} ms CPU per sample = {costs['input_over_decode']:.2f}x the "
          f"teacher stage's decode ({costs['decode_cpu_ms']:.3f} ms)   target <= 1.5x")
    print(f"  {'run':<34}{'steady':>10}{'best ep.':>10}{'worker CPU':>12}{'data CPU':>10}   samples/s per epoch, all "
          f"repeats")
    print(f"  {'':<34}{'samples/s':>10}{'samples/s':>10}{'ms/sample':>12}{'ms/sample':>10}   (the first is excluded)")
    names = {"hard": "(a) hard labels only", "soft": "(b) cached soft targets", "online": "(c) online teacher in the loop"}
    fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    for k, v in table.items():
        print(f"  {names[k]:<34}{v['steady']:>10,.1f}{v['best']:>10,.1f}{fmt(v['worker_cpu_ms']):>12}"
              f"{fmt(v['data_cpu_ms']):>10}   {', '.join(f'{x:,.1f}' for x in v['per_epoch'])}")
    print("  where a worker's last epoch went (seconds, mean per worker; pipeline.student.stats.PHASES; the input "
          "thread's block wait, shuffle and collate overlap the loop's own):")
    for k, v in table.items():
        ph = v.get("phases")
        if ph:
            loop = ph["input_wait"] + ph["h2d"] + ph["step"]
            print(f"  {k:<7} first optimizer step {', '.join(str(x) for x in v['startup_s'])} s after the job "
                  "started (each repeat)")
            print(f"  {k:<7} epoch {v['phases_seconds']:.2f}: input thread: block wait {ph['block_wait']:.2f}, shuffle "
                  f"{ph['shuffle']:.2f}, collate {ph['collate']:.2f} | loop: input wait {ph['input_wait']:.2f}, "
                  f"copy {ph['h2d']:.2f}, step {ph['step']:.2f}, other {v['phases_seconds'] - loop:.2f}")
    for k, v in table.items():
        if v["repeats"] > 1:
            cpu_each = ", ".join(f"{x:.2f}" if x is not None else "-" for x in v["worker_cpu_ms_each"])
            print(f"  {k:<7} each repeat: steady {', '.join(f'{x:,.1f}' for x in v['steady_each'])} samples/s; "
                  f"worker CPU {cpu_each} ms/sample")
    a, b, c = table.get("hard"), table.get("soft"), table.get("online")
    if b:
        print(f"  (b) / pure step = {b['steady'] / costs['pure_samples_per_s']:.3f}   target >= 0.9 (step-dominated "
              f"student); input wait share, last epoch: {b.get('data_wait_share')}")
        if b["data_cpu_ms"] is not None:
            print(f"  (b) data tasks in the pipeline: {b['data_cpu_ms']:.3f} ms CPU per sample = "
                  f"{b['data_cpu_ms'] / costs['decode_cpu_ms']:.2f}x the decode in process")
            if decode_task_ms:
                print(f"      the teacher stage's decode tasks in its pipeline: {decode_task_ms:.3f} ms CPU per sample; "
                      f"(b)'s data tasks = {b['data_cpu_ms'] / decode_task_ms:.2f}x that   target <= 1.5x")
    if a and b:
        cpu = (f"; by training-worker CPU per sample {a['worker_cpu_ms'] / b['worker_cpu_ms']:.3f}"
               if a["worker_cpu_ms"] and b["worker_cpu_ms"] else "")
        print(f"  (b)/(a) = {b['steady'] / a['steady']:.3f} (steady), {b['best'] / a['best']:.3f} (best epochs){cpu}"
              f"   target >= 0.95")
    if b and c:
        cpu = (f"; by training-worker CPU per sample {c['worker_cpu_ms'] / b['worker_cpu_ms']:.3f}"
               if c["worker_cpu_ms"] and b["worker_cpu_ms"] else "")
        print(f"  (b)/(c) = {b['steady'] / c['steady']:.3f} (steady), {b['best'] / c['best']:.3f} (best epochs){cpu}")
        if costs.get("expected_soft_over_online"):
            print(f"            expected from in-process costs: {costs['expected_soft_over_online']:.2f} = (student "
                  f"step + teacher forward {costs['teacher_forward_ms']:.2f}) / student step, ms per sample")
    for k, v in table.items():
        other = v["steady_cpu"].get("other processes (not ours)")
        if other is not None and v.get("steady_wall"):
            print(f"  {k:<7} steady epochs: {v['steady_wall']:.1f} s wall; other processes on this machine used "
                  f"{other:.1f} CPU-s of the {v['steady_wall'] * os.cpu_count():.0f} available")
    for k, v in table.items():
        top = ", ".join(f"{r} {s:.1f}s" for r, s in list(v["steady_cpu"].items())[:5] if "not ours" not in r)
        print(f"  {k:<7} peak RSS driver {mib(v['peak_driver_rss'])}, largest worker {mib(v['peak_worker_rss'])}; "
              f"CPU in the steady epochs: {top}")


if __name__ == "__main__":
    sys.exit(main())
