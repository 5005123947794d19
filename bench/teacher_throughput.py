# python bench/teacher_throughput.py --preset cpu-small [--memory-check]
"""Teacher stage throughput: pipeline vs the teacher's pure forward, in one run, one machine.

    python bench/teacher_throughput.py --preset cpu-small                   # CPU, ~2 min
    python bench/teacher_throughput.py --preset cpu-small --memory-check    # + 10x-shards memory check
    python bench/teacher_throughput.py --preset cpu-small --ray-floor       # + Ray's own cost of a decode stage
    python bench/teacher_throughput.py --preset standin                     # CPU: the GPU stand-in, ~1.5 min
    python bench/teacher_throughput.py --preset vit-b16                     # GPU machine
    python bench/teacher_throughput.py --preset wav2vec2-large [--compile]  # GPU machine
    python bench/teacher_throughput.py --preset vit-b16 --smoke             # tiny sizes: checks it runs (CPU ok)
    bash bench/gpu_suite.sh OUT                                             # every GPU preset in < 9 min

One run measures, on the same machine, model and batch size:
  1. decode: pipeline.teacher.decode.DecodeShards over one shard in this process (one core);
  2. pure forward: pipeline.models.runner.ModelRunner.predict over batches already on the
     device (the same frontend + autocast code the actors run), after warm-up, synchronised
     on CUDA; torch threads = the actor's CPUs on CPU (Ray gives an actor OMP_NUM_THREADS =
     its num_cpus), so both sides get the same compute;
  3. actor call: TeacherPredictor.__call__ on a stream of the same batches as Arrow tables
     (host->device copy, forward, top-k, part file written), ``--actor-concurrency`` calls at
     once on threads as Ray Data makes them: what one actor adds around the forward
     (``call_ratio=``); model FLOPs per sample and the device's measured matmul rate give the
     pure forward's model-FLOPs utilisation (``mfu=``); with --compile, the compiled forward
     is the reference and the eager one is timed beside it (``compile_speedup=``);
  4. pipeline: pipeline.teacher.job.run (decode tasks -> teacher actors -> compaction) in a
     child process with a fresh local Ray, over a generated WebDataset corpus. Throughput is
     samples / the summary's ``seconds``, which counts from the moment the dataset starts
     executing (actor start-up and model load included; Ray start-up excluded and shown apart).
``decode_overhead=`` is the decode worker processes' CPU per sample in the pipeline over the
in-process decode's (and with --ray-floor, ``decode_overhead_beyond_ray=`` the same less what
Ray's worker processes spend outside their tasks for a no-op stage of the same shape).
The line before the last is ``steady_ratio=S``: all samples over the span of the teacher
actor's calls (Ray's task events), i.e. the pipeline once the teacher is warm, / pure forward.
The last line is ``ratio=R`` = pipeline (summary seconds) / pure forward (samples/s).
On a shared machine wall-clock numbers move with other people's load: the report also gives
CPU seconds per sample by process (the teacher actor's vs the pure forward's), and the CPU
that processes outside the run used meanwhile.

--memory-check runs the pipeline over N and 10N shards (same shard size) and compares the
peak RSS of the driver and of the largest Ray worker process (sampled every 0.25 s with psutil).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (  # noqa: E402
    audio_pool, image_pool, mib, pseudo_label_cmd, run_job, steady_rate, write_corpus,
)

PRESETS = {
    # Utterance-level CNN over log-mel of ~1 s clips. On one core its forward (~4.5 ms of CPU per
    # clip) costs ~8x the FLAC decode task (~0.55 ms/clip): the forward dominates, as a GPU
    # teacher's should; decode still competes with it for the machine's 2 cores.
    "cpu-small": dict(
        modality="audio", teacher="pipeline.models.zoo:audio_cnn?width=32", seconds=(0.8, 1.2), pool=128,
        shards=24, per_shard=128, batch_size=64, top_k=5, prep=[], device="cpu",
        smoke=dict(shards=2, per_shard=32, forward_seconds=2.0),
        memory=dict(shards=8, per_shard=32),
    ),
    # The GPU stand-in (pipeline/models/standin.py): wav2vec2-large's H200 timing (93.8 ms per batch
    # of 64 ten-second clips), asleep with the GIL released, on 10 s FLAC clips; frame level, 32
    # classes. What it measures is the actor: call_ratio (the actor's call over the pure forward).
    # On 2 cores the pipeline itself is decode-bound (a 10 s FLAC costs ~4 ms of one core; the
    # forward wants 64 every 94 ms), so its ratios are printed but are not this preset's point.
    "standin": dict(
        modality="audio", teacher="pipeline.models.zoo:gpu_standin", seconds=(10.0, 10.0), pool=16,
        shards=8, per_shard=128, distinct=2, batch_size=64, top_k=10, prep=["--features", "none"], device="cpu",
        forward_seconds=8.0, actor_concurrency=3,  # a GPU's: the stand-in's forward leaves the CPU free
        smoke=dict(shards=2, per_shard=16, distinct=1, batch_size=8, pool=4, forward_seconds=1.0, warmup=1),
        memory=dict(shards=2, per_shard=128),
    ),
    # ViT-B/16 at 224 on 500x375 JPEGs (the DESIGN.md reference setup); for an H100 box.
    "vit-b16": dict(
        modality="image", teacher="pipeline.models.zoo:vit", image_size=(500, 375), pool=256,
        # 600k images (~94 s at the reference 6,403 img/s); 16 shard files, the rest hard links.
        shards=600, per_shard=1000, distinct=16, batch_size=256, top_k=10,
        prep=["--image-resize", "224", "--image-crop", "224"], device="auto",
        smoke=dict(shards=3, per_shard=12, distinct=2, batch_size=8, pool=16, forward_seconds=2.0, warmup=1),
        memory=dict(shards=8, per_shard=1000),
    ),
    # ResNet-50 at 224 (resize 256, centre crop) on 500x375 JPEGs, one in 8 progressive: the
    # image teacher CPU decode can least keep up with (12,744 img/s pure on an H100).
    "resnet50": dict(
        modality="image", teacher="pipeline.models.zoo:resnet50", image_size=(500, 375), pool=256,
        progressive_every=8, shards=600, per_shard=1000, distinct=16, batch_size=256, top_k=10,
        prep=["--image-resize", "256", "--image-crop", "224"], device="auto",
        smoke=dict(shards=3, per_shard=12, distinct=2, batch_size=8, pool=16, forward_seconds=2.0, warmup=1),
        memory=dict(shards=8, per_shard=1000),
    ),
    # wav2vec 2.0 large on 10 s FLAC clips, frame-level top-10 (20 ms frames); for an H100 box.
    "wav2vec2-large": dict(
        modality="audio", teacher="pipeline.models.zoo:wav2vec2_large_frames", seconds=(10.0, 10.0), pool=64,
        # 640k audio-s (~97 s at the reference 6,599 audio-s/s); 8 shard files, the rest hard links.
        shards=128, per_shard=500, distinct=8, batch_size=64, top_k=10, prep=["--features", "none"], device="auto",
        smoke=dict(shards=3, per_shard=3, distinct=2, batch_size=3, pool=4, seconds=(1.0, 1.5), forward_seconds=2.0,
                   warmup=1),
        memory=dict(shards=4, per_shard=500),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                   help="teacher, corpus and batch size: cpu-small (runs here), vit-b16 / wav2vec2-large (GPU box)")
    p.add_argument("--smoke", action="store_true", help="tiny corpus and timings: checks that a preset runs (CPU ok)")
    p.add_argument("--teacher", default=None, help="override the preset's teacher spec (module:factory?kwargs)")
    p.add_argument("--shards", type=int, default=None, help="input shards (default: the preset's)")
    p.add_argument("--per-shard", type=int, default=None, help="samples per shard (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="teacher batch size, both measurements (default: preset)")
    p.add_argument("--top-k", type=int, default=None, help="classes kept per sample/frame (default: preset)")
    p.add_argument("--pool", type=int, default=None, help="distinct encoded samples cycled through the corpus")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="teacher device for both measurements (default: preset; auto = cuda if present)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype on GPU")
    p.add_argument("--image-decode", choices=["auto", "cpu", "gpu"], default="auto",
                   help="image presets: where JPEGs are decoded, in-process and in the pipeline (auto: gpu on a "
                        "CUDA device); with gpu the two paths' agreement is measured too")
    p.add_argument("--compile", action="store_true",
                   help="the job's --compile: the pure forward, the actor's call and the pipeline use the "
                        "torch.compile'd teacher; the eager forward is timed beside it (compile_speedup=)")
    p.add_argument("--ray-floor", action="store_true",
                   help="also run a no-op decode stage of the same shape (shards, rows, payload bytes) under the "
                        "same Ray settings, to tell Ray's own cost of a decode worker from kdpipe's "
                        "(decode_overhead_beyond_ray=)")
    p.add_argument("--skip-pipeline", action="store_true",
                   help="only the in-process measurements (decode, pure forward, actor call): no pipeline run")
    p.add_argument("--actors", type=int, default=None, help="teacher actors in the pipeline (default: the job's)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per teacher actor")
    p.add_argument("--actor-concurrency", type=int, default=None,
                   help="calls one teacher actor runs at once, in the pipeline and in the in-process call "
                        "measurement (default: the job's: 3 on a GPU, 1 on a CPU; the standin preset: 3)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per teacher actor (0.5: two actors share a GPU, so one's host work overlaps the "
                        "other's forward; give --actors 2 with it)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the in-process measurements (default: --cpus-per-actor, as Ray gives an actor)")
    p.add_argument("--forward-seconds", type=float, default=None, help="timed seconds of pure forward (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up batches before timing (default 3)")
    p.add_argument("--format", choices=["parquet", "webdataset"], default="parquet", help="soft-target shard encoding")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="everything after this goes to pseudo_label.py verbatim (e.g. --extra --bucket-rows 256)")
    p.add_argument("--memory-check", action="store_true",
                   help="also run N and FACTOR x N shards and compare peak driver / worker RSS")
    p.add_argument("--memory-only", action="store_true", help="run only the memory check (last line: memory=PASS|FAIL)")
    p.add_argument("--memory-shards", type=int, default=None, help="N for the memory check (default: preset)")
    p.add_argument("--memory-per-shard", type=int, default=None, help="samples per shard in the memory check")
    p.add_argument("--memory-factor", type=int, default=10, help="the larger run has this many times the shards")
    p.add_argument("--memory-tolerance", type=float, default=0.20, help="allowed growth of peak RSS (0.2 = 20%%)")
    p.add_argument("--workdir", default=None, help="where corpora and outputs go (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, corpus, soft targets)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write all numbers to this JSON file")
    return p


def resolve(args) -> dict:
    cfg = dict(PRESETS[args.preset])
    cfg.setdefault("forward_seconds", 10.0)
    cfg.setdefault("warmup", 3)
    if args.smoke:
        cfg.update(cfg["smoke"])
        cfg["memory"] = dict(shards=1, per_shard=cfg["per_shard"])
    cfg["compile"] = args.compile
    for name in ("teacher", "shards", "per_shard", "batch_size", "top_k", "pool", "device", "forward_seconds", "warmup"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    if args.memory_shards is not None:
        cfg["memory"]["shards"] = args.memory_shards
    if args.memory_per_shard is not None:
        cfg["memory"]["per_shard"] = args.memory_per_shard
    return cfg


def make_pool(cfg: dict, seed: int = 0):
    if cfg["modality"] == "audio":
        return audio_pool(cfg["pool"], cfg["seconds"], seed=seed), "flac"
    return image_pool(cfg["pool"], cfg["image_size"], seed=seed, progressive_every=cfg.get("progressive_every", 0)), "jpg"


def device_of(choice: str) -> str:
    import torch

    if choice == "cpu":
        return "cpu"
    if choice == "cuda" or torch.cuda.is_available():
        return "cuda"
    return "cpu"


def job_prep(cfg: dict, decode: str | None = None) -> dict:
    """The preprocessing the job will resolve for this preset (defaults + the preset's flags);
    images decoded where ``decode`` says (default: the preset's resolved --image-decode)."""
    from pipeline.cli import add_preprocessing_flags, resolve_preprocessing
    from pipeline.modalities import preprocessing_from_dict

    p = argparse.ArgumentParser()
    add_preprocessing_flags(p)
    prep = resolve_preprocessing(cfg["modality"], None, p.parse_args(cfg["prep"]))
    if cfg["modality"] == "image":
        prep = preprocessing_from_dict({**prep, "decode": decode or cfg["image_decode"]}).to_dict()
    return prep


# --------------------------------------------------------------------------------------------
# in-process measurements


class InProcess:
    """The in-process measurements, all at batch size B on ``device``."""

    def __init__(self, cfg: dict, shard_uri: str, device: str, threads: int, precision: str, concurrency: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.cfg, self.shard_uri, self.device, self.threads, self.precision = cfg, shard_uri, device, threads, precision
        self.concurrency = concurrency
        self.flops_per_sample: float | None = None
        self.compile = bool(cfg.get("compile"))
        self.compile_s: float | None = None
        self.eager: list[dict] = []  # with compile: the eager pure forward, timed in the same rounds
        self.prep = job_prep(cfg)
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.level = self.num_classes = self.k = None
        self.batches: list = []
        self.batch_audio_s: list[float] = []

    def decode(self, min_seconds: float = 2.0) -> dict:
        """What a decode task does for one shard (tar read, decode, bucket sort, Arrow), in this
        process; one untimed pass first (imports, page cache), then passes for >= min_seconds."""
        import pyarrow as pa

        from pipeline.modalities import preprocessing_from_dict
        from pipeline.teacher.accounting import Row
        from pipeline.teacher.decode import DecodeShards

        dec = DecodeShards(preprocessing_from_dict(self.prep))
        run = lambda: list(dec({"name": ["bench"], "uri": [self.shard_uri]}))  # noqa: E731
        tables = run()
        passes, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            run()
            passes += 1
            wall = time.perf_counter() - t0
            if wall >= min_seconds:
                break
        cpu = time.process_time() - c0
        table = pa.concat_tables(tables)
        table = table.filter(pa.array(table.column("kind").to_numpy() == Row.SAMPLE))
        n = table.num_rows
        self.payload_bytes_per_row = table.column("payload").nbytes / max(n, 1)
        sr = self.prep.get("sample_rate", 16000)
        secs = float(np.sum(table.column("length").to_numpy())) / sr if self.cfg["modality"] == "audio" else 0.0
        # Batches as the actors see them: consecutive rows of the length-sorted bucket.
        B = self.cfg["batch_size"]
        batches = [table.slice(i, B) for i in range(0, n, B)]
        self.batches = [b for b in batches if b.num_rows == B] or batches[:1]
        self.batch_audio_s = [float(np.sum(b.column("length").to_numpy())) / sr if self.cfg["modality"] == "audio"
                              else 0.0 for b in self.batches]
        return {"samples": n * passes, "seconds": wall, "cpu_s": cpu, "samples_per_s": n * passes / wall,
                "audio_s_per_s": secs * passes / wall, "cpu_ms_per_sample": 1e3 * cpu / (n * passes),
                "payload_bytes_per_sample": self.payload_bytes_per_row}

    def device_decode(self, min_seconds: float = 3.0) -> dict:
        """Image decode="gpu": the actor's decode, resize and crop of the batches alone
        (device_decode.decode_batch, synchronised per batch), after one untimed pass."""
        from pipeline.modalities import preprocessing_from_dict
        from pipeline.modalities.device_decode import decode_batch

        prep = preprocessing_from_dict(self.prep)
        run = lambda b: decode_batch(b.column("payload"), prep, self.device)  # noqa: E731
        for b in self.batches:
            run(b)
        self.sync()
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < min_seconds:
            for b in self.batches:
                paths = run(b).paths
                self.sync()
                n += b.num_rows
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"samples": n, "seconds": wall, "samples_per_s": n / wall, "cpu_ms_per_sample": 1e3 * cpu / n,
                "paths_last_batch": np.bincount(paths, minlength=4).tolist()}

    def agreement(self) -> dict:
        """The GPU decode path against the CPU one on the same images (this run's first shard):
        pixels, and the teacher's logits on each (top-1 agreement, largest difference)."""
        import pyarrow as pa
        import torch

        from pipeline.modalities import preprocessing_from_dict
        from pipeline.models.runner import ModelRunner
        from pipeline.teacher.accounting import Row
        from pipeline.teacher.decode import DecodeShards

        def rows(prep):
            dec = DecodeShards(preprocessing_from_dict(prep))
            t = pa.concat_tables(list(dec({"name": ["bench"], "uri": [self.shard_uri]})))
            return t.filter(pa.array(t.column("kind").to_numpy() == Row.SAMPLE))

        gpu_rows, cpu_rows = rows(self.prep), rows(job_prep(self.cfg, "cpu"))
        assert gpu_rows.column("key").equals(cpu_rows.column("key"))
        gpu_runner = ModelRunner.from_specs([self.cfg["teacher"]], (), preprocessing_from_dict(self.prep), self.device,
                                            self.precision)
        # one teacher, its weights as built once
        cpu_runner = ModelRunner(gpu_runner.models, preprocessing_from_dict(job_prep(self.cfg, "cpu")), self.device,
                                 self.precision)
        B = self.cfg["batch_size"]
        agree = n = 0
        max_logit = max_pixel = 0.0
        pixel_sum = 0.0
        with torch.inference_mode():
            for i in range(0, gpu_rows.num_rows, B):
                xg, _ = gpu_runner.to_device(gpu_rows.column("payload").slice(i, B))
                xc, _ = cpu_runner.to_device(cpu_rows.column("payload").slice(i, B))
                d = (xg.int() - xc.int()).abs()
                max_pixel = max(max_pixel, float(d.max()))
                pixel_sum += float(d.float().sum())
                lg, lc = gpu_runner.predict(xg, None).logits[0].float(), cpu_runner.predict(xc, None).logits[0].float()
                agree += int((lg.argmax(-1) == lc.argmax(-1)).sum())
                max_logit = max(max_logit, float((lg - lc).abs().max()))
                n += xg.shape[0]
        self._free()
        return {"images": n, "top1_agreement": agree / n, "max_logit_diff": max_logit, "max_pixel_diff": max_pixel,
                "mean_pixel_diff": pixel_sum / (n * xg[0].numel())}

    def pure_and_call(self, work: str) -> tuple[dict, dict]:
        """Pure forward and the actor's call, timed in alternating rounds (so drift in the load of
        a shared machine hits both alike), ``forward_seconds`` of pure forward in all.

        pure: the ModelRunner's predict over the batches already on the device (frontend + model
        + autocast). call: TeacherPredictor.__call__ on the same batches as Arrow tables (host ->
        device copy, forward, top-k, part file written into ``work``, records out), i.e. all an
        actor does per batch, ``concurrency`` calls at a time on threads as Ray Data makes them.
        With ``compile`` in the config both use the torch.compile'd teacher (the job's
        --compile), and the eager forward is timed in the same rounds (``self.eager``)."""
        from pipeline.modalities import preprocessing_from_dict
        from pipeline.shards.manifest import RunFacts
        from pipeline.shards.schema import id_dtype
        from pipeline.models.runner import ModelRunner
        from pipeline.teacher.predictor import TeacherPredictor

        t0 = time.perf_counter()
        prep = preprocessing_from_dict(self.prep)
        runner = ModelRunner.from_specs([self.cfg["teacher"]], (), prep, self.device, self.precision)
        on_dev = [runner.to_device(b.column("payload")) for b in self.batches]
        self.sync()
        build = time.perf_counter() - t0
        outs = runner.predict(*on_dev[0]).logits
        self.level = "frame" if outs[0].dim() == 3 else "utterance"
        self.num_classes = int(outs[0].shape[-1])
        self.k = min(self.cfg["top_k"], self.num_classes)
        facts = RunFacts("bench", self.cfg["modality"], self.level, self.k, self.num_classes, "parquet",
                         str(id_dtype(self.num_classes)), 20.0 if self.level == "frame" else None)
        if self.flops_per_sample is None:
            self.flops_per_sample = model_flops(runner, on_dev[0]) / self.batches[0].num_rows
        eager = runner
        if self.compile:  # the reference and the actor then use the compiled teacher, as the job does
            runner = ModelRunner.from_specs([self.cfg["teacher"]], (), prep, self.device, self.precision)
            runner.compile(self.cfg["batch_size"])
            t1 = time.perf_counter()
            runner.predict(*on_dev[0])
            self.sync()
            self.compile_s = time.perf_counter() - t1
            print(f"[bench] torch.compile: first forward (compilation) {self.compile_s:.1f} s", flush=True)
        pred = TeacherPredictor((), (), prep, facts, os.path.join(work, "inprocess-run"), runner=runner,
                                concurrency=self.concurrency)
        # The actor's calls as Ray Data makes them: up to `concurrency` at once, on threads.
        pool = ThreadPoolExecutor(self.concurrency)
        for i in range(self.cfg["warmup"]):
            runner.predict(*on_dev[i % len(on_dev)])
            eager.predict(*on_dev[i % len(on_dev)])
        list(pool.map(pred, [self.batches[i % len(self.batches)] for i in range(max(self.cfg["warmup"], self.concurrency))]))

        # Every round runs the same stream of batches, long enough that filling and draining the
        # actor's pipeline of concurrent calls (at a round's start and end: a stream in Ray has
        # neither) costs a few percent at most.
        order = [i % len(self.batches) for i in range(max(len(self.batches), 16 * self.concurrency))]
        stream = [self.batches[i] for i in order]

        def pure():
            for i in order:
                runner.predict(*on_dev[i])

        def pure_eager():
            for i in order:
                eager.predict(*on_dev[i])

        def call():
            list(pool.map(pred, stream))

        fns = [("pure", pure), ("call", call)] + ([("eager", pure_eager)] if self.compile else [])
        acc = {name: [0.0, 0.0, 0] for name, _ in fns}  # wall, cpu, passes
        rnd = 0
        while acc["pure"][0] < self.cfg["forward_seconds"]:
            for name, fn in fns[rnd % len(fns):] + fns[:rnd % len(fns)]:  # rotating order: drift hits all alike
                self.sync()
                w, c = time.perf_counter(), time.process_time()
                fn()
                self.sync()
                a = acc[name]
                a[0] += time.perf_counter() - w
                a[1] += time.process_time() - c
                a[2] += 1
            rnd += 1
        rows = sum(b.num_rows for b in stream)
        audio_s = sum(self.batch_audio_s[i] for i in order)
        out = []
        for name in acc:
            wall, cpu, passes = acc[name]
            n = rows * passes
            out.append({"samples": n, "seconds": wall, "cpu_s": cpu, "samples_per_s": n / wall,
                        "audio_s_per_s": audio_s * passes / wall, "cpu_ms_per_sample": 1e3 * cpu / n,
                        "loadavg": os.getloadavg()[0], "model_build_s": build})
        pool.shutdown()
        on_dev = runner = eager = pred = None  # frees the teacher (and its device memory) before the pipeline run
        self._free()
        shutil.rmtree(os.path.join(work, "inprocess-run"), ignore_errors=True)
        if self.compile:
            self.eager.append(out[2])
        return out[0], out[1]

    def _free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def model_flops(runner, batch) -> float:
    """FLOPs of one forward of ``batch`` (x, lengths) on the device: matmuls and convolutions,
    counted by torch's FlopCounterMode (2 per multiply-add). Under no_grad, not inference_mode:
    the counter cannot see through weight-norm parametrizations (wav2vec 2.0's) in the latter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        runner.forward(*batch)
    return float(counter.get_total_flops())


def peak_matrix_rate(device: str, precision: str, seconds: float = 3.0) -> dict:
    """The chip's measured dense matrix-multiply rate (FLOP/s) in the forward's dtype: square
    matmuls of 8192 (CUDA) or 2048 (CPU, torch's threads), as many as fit in ``seconds``. The
    denominator of model FLOPs utilisation: what this chip does, not its data sheet."""
    import torch

    from pipeline.models.runner import PRECISIONS

    dtype = PRECISIONS[precision] if device == "cuda" else torch.float32
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        sync()
        reps += 10
    wall = time.perf_counter() - t0
    return {"flop_per_s": 2.0 * n ** 3 * reps / wall, "n": n, "dtype": str(dtype).replace("torch.", "")}


# --------------------------------------------------------------------------------------------
# pipeline runs


def pipeline_argv(cfg: dict, args, inputs: list[str], output: str) -> list[str]:
    argv = ["--input", *inputs, "--output", output, "--teacher", cfg["teacher"], "--batch-size", str(cfg["batch_size"]),
            "--top-k", str(cfg["top_k"]), "--format", args.format, "--device", cfg["device"],
            "--precision", args.precision, "--cpus-per-actor", str(args.cpus_per_actor), "--progress-interval", "30",
            "--actor-concurrency", str(cfg["actor_concurrency"]), *(["--compile"] if cfg["compile"] else []),
            *cfg["prep"]]
    if cfg["modality"] == "image":
        argv += ["--image-decode", cfg["image_decode"]]
    if args.actors:
        argv += ["--actors", str(args.actors)]
    if args.gpus_per_actor:
        argv += ["--gpus-per-actor", str(args.gpus_per_actor)]
    return argv + list(args.extra)


def run_pipeline(cfg: dict, args, inputs: list[str], work: str, tag: str, timeline: bool = False):
    out_dir = os.path.join(work, f"st-{tag}")
    shutil.rmtree(out_dir, ignore_errors=True)
    log = os.path.join(work, f"pseudo_label-{tag}.log")
    marks = os.path.join(work, f"marks-{tag}.json")
    env = {"KDPIPE_BENCH_TIMELINE": os.path.join(work, f"timeline-{tag}.json")} if timeline else None
    res = run_job(pseudo_label_cmd(marks, pipeline_argv(cfg, args, inputs, out_dir)), log, marks, env=env)
    if res.rc != 0 or res.summary is None:
        print(res.output[-6000:], file=sys.stderr)
        raise SystemExit(f"pseudo-label run {tag!r} failed (exit {res.rc}); log: {log}")
    res.timeline = env["KDPIPE_BENCH_TIMELINE"] if env else None
    return res


def memory_check(cfg: dict, args, work: str, pool, ext: str) -> tuple[bool, dict]:
    m = cfg["memory"]
    small_n, per = m["shards"], m["per_shard"]
    big_n = small_n * args.memory_factor
    corpus = write_corpus(os.path.join(work, "mem-corpus"), pool, ext, big_n, per, prefix="m", distinct=cfg.get("distinct"))
    print(f"\n== memory check: {small_n} vs {big_n} shards of {per} samples ({corpus.bytes / 2**20:,.0f} MiB in all)",
          flush=True)
    runs = {}
    for tag, n in (("small", small_n), ("big", big_n)):
        r = run_pipeline(cfg, args, corpus.shards[:n], work, f"mem-{tag}")
        runs[tag] = r
        t = r.tree
        print(f"  {n:>5} shards  {r.summary['samples']:>8,} samples  {r.summary['seconds']:>7.1f} s   "
              f"peak RSS: driver {mib(t.peak_driver_rss)}, largest worker {mib(t.peak_worker_rss)} "
              f"({t.peak_worker_role}), all workers {mib(t.peak_workers_rss_sum)}", flush=True)
    s, b = runs["small"].tree, runs["big"].tree
    ratios = {"driver": b.peak_driver_rss / max(s.peak_driver_rss, 1),
              "worker": b.peak_worker_rss / max(s.peak_worker_rss, 1),
              "workers_sum": b.peak_workers_rss_sum / max(s.peak_workers_rss_sum, 1)}
    ok = ratios["driver"] <= 1 + args.memory_tolerance and ratios["worker"] <= 1 + args.memory_tolerance
    print(f"  {args.memory_factor}x shards / 1x: driver {ratios['driver']:.3f}, largest worker {ratios['worker']:.3f}, "
          f"all workers {ratios['workers_sum']:.3f} (limit {1 + args.memory_tolerance:.2f} for driver and worker)")
    print(f"  memory check: {'PASS' if ok else 'FAIL'}", flush=True)
    info = {"small_shards": small_n, "big_shards": big_n, "per_shard": per, "ratios": ratios, "pass": ok,
            "small": vars(s), "big": vars(b)}
    return ok, info


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    work = args.workdir or tempfile.mkdtemp(prefix="kdpipe-bench-teacher-")
    os.makedirs(work, exist_ok=True)
    results: dict = {"preset": args.preset, "smoke": args.smoke, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                     "config": {k: v for k, v in cfg.items() if k not in ("smoke", "memory")}}
    try:
        import torch

        device = device_of(cfg["device"])
        cfg["device"] = device  # both sides on the same device
        cfg["image_decode"] = (args.image_decode if args.image_decode != "auto"
                               else "gpu" if device == "cuda" else "cpu")
        if cfg["modality"] == "image" and cfg["image_decode"] == "gpu" and device != "cuda" and not args.skip_pipeline:
            raise SystemExit("--image-decode gpu needs a CUDA device (or --skip-pipeline: the in-process parts "
                             "decode on the CPU device)")
        results["gpu"] = torch.cuda.get_device_name() if device == "cuda" else None
        # as the job chooses (pipeline.teacher.job.actor_concurrency), unless given
        from pipeline.teacher.job import default_actor_concurrency

        cfg["actor_concurrency"] = (args.actor_concurrency or cfg.get("actor_concurrency")
                                    or default_actor_concurrency(device == "cuda"))
        if args.threads:
            threads = args.threads
        elif device == "cpu":
            threads = max(1, int(args.cpus_per_actor))
        else:
            threads = torch.get_num_threads()
        print(f"[bench] preset {args.preset}{' (smoke)' if args.smoke else ''}: teacher {cfg['teacher']}, "
              f"batch {cfg['batch_size']}, device {device}, {os.cpu_count()} CPUs, torch threads {threads}, "
              f"load average {os.getloadavg()[0]:.1f}; work dir {work}", flush=True)
        t0 = time.perf_counter()
        pool, ext = make_pool(cfg)
        ok = True
        if not args.memory_only:
            corpus = write_corpus(os.path.join(work, "corpus"), pool, ext, cfg["shards"], cfg["per_shard"],
                                  distinct=cfg.get("distinct"))
            print(f"[bench] corpus: {len(corpus.shards)} shards, {corpus.samples:,} samples, "
                  f"{corpus.audio_seconds:,.0f} audio-s, {corpus.bytes / 2**20:,.1f} MiB "
                  f"({time.perf_counter() - t0:.1f} s to build)", flush=True)
            ip = InProcess(cfg, corpus.shards[0], device, threads, args.precision, cfg["actor_concurrency"])
            m = {"decode": ip.decode()}
            print(f"[bench] decode, one core: {m['decode']['samples_per_s']:,.1f} samples/s, "
                  f"{m['decode']['payload_bytes_per_sample']:,.0f} payload bytes per sample", flush=True)
            if cfg["modality"] == "image" and cfg["image_decode"] == "gpu":
                m["device_decode"] = ip.device_decode()
                print(f"[bench] decode on the teacher's device alone: {m['device_decode']['samples_per_s']:,.1f} "
                      f"img/s ({m['device_decode']['cpu_ms_per_sample']:.3f} ms host CPU per image)", flush=True)
                m["agreement"] = ip.agreement()
                a = m["agreement"]
                print(f"[bench] GPU vs CPU decode on {a['images']} images: top-1 agreement {a['top1_agreement']:.4f}, "
                      f"largest logit difference {a['max_logit_diff']:.4f}, pixels {a['mean_pixel_diff']:.3f} "
                      f"mean / {a['max_pixel_diff']:.0f} max grey levels apart", flush=True)
            m["pure_before"], m["call_before"] = ip.pure_and_call(work)
            print(f"[bench] pure forward: {m['pure_before']['samples_per_s']:,.1f} samples/s; actor call "
                  f"{m['call_before']['samples_per_s']:,.1f}", flush=True)
            pipe = None
            if not args.skip_pipeline:
                pipe = run_pipeline(cfg, args, corpus.shards, work, "main", timeline=True)
                print(f"[bench] pipeline: {pipe.summary['samples_per_s']:,.1f} samples/s", flush=True)
                m["pure_after"], m["call_after"] = ip.pure_and_call(work)
                print(f"[bench] pure forward again: {m['pure_after']['samples_per_s']:,.1f} samples/s; actor call "
                      f"{m['call_after']['samples_per_s']:,.1f}", flush=True)
            if args.ray_floor and pipe is not None:
                from benchlib import ray_floor

                m["ray_floor"] = ray_floor(work, cfg["shards"], cfg["per_shard"], int(ip.payload_bytes_per_row))
            calls = [m[t] for t in ("call_before", "call_after") if t in m]
            m["actor_call"] = {k: sum(c[k] for c in calls) / len(calls)
                               for k in ("samples_per_s", "audio_s_per_s", "cpu_ms_per_sample")}
            m["eager"], m["compile_s"] = ip.eager, ip.compile_s
            m.update(level=ip.level, num_classes=ip.num_classes, k=ip.k, threads=threads, device=device,
                     concurrency=cfg["actor_concurrency"], flops_per_sample=ip.flops_per_sample,
                     peak=peak_matrix_rate(device, args.precision))
            results.update(report(cfg, m, pipe, corpus))
        if args.memory_check or args.memory_only:
            ok, results["memory"] = memory_check(cfg, args, work, pool, ext)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        if args.memory_only:
            print(f"memory={'PASS' if ok else 'FAIL'}")
        else:
            if results.get("decode_overhead") is not None:
                print(f"decode_overhead={results['decode_overhead']:.2f}")
            if results.get("decode_overhead_beyond_ray") is not None:
                print(f"decode_overhead_beyond_ray={results['decode_overhead_beyond_ray']:.2f}")
            if results.get("mfu") is not None:
                print(f"mfu={results['mfu']:.3f}")
            if results.get("compile_speedup") is not None:
                print(f"compile_speedup={results['compile_speedup']:.2f}")
            print(f"call_ratio={results['call_ratio']:.2f}")
            if results.get("ratio_steady") is not None:
                print(f"steady_ratio={results['ratio_steady']:.2f}")
            if results.get("ratio") is not None:
                print(f"ratio={results['ratio']:.2f}")
        return 0 if ok else 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def ray_data_task_cpu(stats: str, op: str) -> float | None:
    """Total remote CPU seconds of operator ``op`` from Ray Data's ds.stats() text."""
    import re

    i = stats.find(f"({op})")
    if i < 0:
        return None
    mt = re.search(r"Remote cpu time:.*?([\d.]+)(us|ms|s) total", stats[i:])
    if not mt:
        return None
    return float(mt.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[mt.group(2)]


def report(cfg: dict, m: dict, pipe, corpus) -> dict:
    """Print the table and return the numbers; ``pipe`` None: the in-process measurements only."""
    audio = cfg["modality"] == "audio"
    per_s = corpus.audio_seconds / corpus.samples  # mean audio seconds per sample
    befores = [m[t] for t in ("pure_before", "pure_after") if t in m]
    pure = sum(p["samples_per_s"] for p in befores) / len(befores)

    def row(name, sps, cpu_ms=None, note=""):
        a = f"{sps * per_s:>11,.1f}" if audio else ""
        c = f"{cpu_ms:>10.2f}" if cpu_ms is not None else f"{'':>10}"
        print(f"  {name:<48}{sps:>11,.1f}{a}{sps / pure:>9.2f}{c}  {note}")

    print(f"\n== {cfg['teacher']}  batch {cfg['batch_size']}  {m['level']} level  {m['num_classes']} classes  "
          f"top-{m['k']}  device {m['device']}  torch threads {m['threads']}  ({os.cpu_count()} CPUs)"
          + ("  torch.compile" if cfg.get("compile") else ""))
    print(f"  {'':<48}{'samples/s':>11}{'audio-s/s' if audio else '':>11}{'/pure':>9}{'CPU ms/s':>10}")
    for tag, label in (("pure_before", "pure forward, before the pipeline"), ("pure_after", "pure forward, after the pipeline")):
        if tag in m:
            p = m[tag]
            row(label, p["samples_per_s"], p["cpu_ms_per_sample"], f"{p['seconds']:.1f} s timed, load avg {p['loadavg']:.1f}")
    row("pure forward, mean (the reference)", pure)
    compile_speedup = None
    if m.get("eager"):
        eager = sum(e["samples_per_s"] for e in m["eager"]) / len(m["eager"])
        compile_speedup = pure / eager
        row("pure forward, eager (without torch.compile)", eager, None,
            f"compiled / eager = {compile_speedup:.2f}; compilation took {m.get('compile_s') or 0:.1f} s")
    row(f"actor __call__ x{m['concurrency']} threads (copy+fwd+top-k+parts)", m["actor_call"]["samples_per_s"],
        m["actor_call"]["cpu_ms_per_sample"], "timed in rounds alternating with the pure forward")
    row("decode, one core (DecodeShards, one shard)", m["decode"]["samples_per_s"], m["decode"]["cpu_ms_per_sample"],
        "decode alone, not a share of pure")
    call_ratio = m["actor_call"]["samples_per_s"] / pure
    peak = m["peak"]["flop_per_s"]
    fps = m.get("flops_per_sample") or 0.0
    mfu = fps * pure / peak if fps else None
    if fps:
        print(f"  model FLOPs: {fps / 1e9:,.2f} GFLOP per sample; pure forward {fps * pure / 1e12:,.2f} TFLOP/s against "
              f"{peak / 1e12:,.2f} TFLOP/s measured for {m['peak']['dtype']} matmuls of {m['peak']['n']} on this "
              f"device: model FLOPs utilisation {mfu:.1%}")
    out = {"in_process": m, "pure_samples_per_s": pure, "call_ratio": call_ratio, "mfu": mfu,
           "flops_per_sample": fps or None, "peak_matrix_flop_per_s": peak, "compile_speedup": compile_speedup,
           "ratio": None, "ratio_steady": None, "decode_overhead": None,
           "device_decode_samples_per_s": (m.get("device_decode") or {}).get("samples_per_s"),
           "agreement": m.get("agreement")}
    if m.get("device_decode"):
        row("decode+resize+crop on the teacher's device alone", m["device_decode"]["samples_per_s"],
            m["device_decode"]["cpu_ms_per_sample"], "decode_batch per batch, synchronised")
    if pipe is None:
        return out

    s = pipe.summary
    n = s["samples"]
    pipe_sps = n / s["seconds"]
    first, _ = steady_rate(pipe.marks)
    tl = []
    if pipe.timeline and pipe.marks and pipe.marks.get("pipeline_start_wall") and os.path.exists(pipe.timeline):
        from benchlib import timeline_summary

        tl = timeline_summary(pipe.timeline, pipe.marks["pipeline_start_wall"])
    calls = next((t for t in tl if t[0] == "teacher calls (submit)"), None)
    # Steady state: all samples over the span of the teacher actor's calls, from its first call
    # to its last (Ray's task events). Start-up (Ray Data's actors, the actor's imports and
    # model load) lies before the first call; the span is the pipeline with a warm teacher.
    # (With concurrent calls their spans overlap: "busy" can exceed the span.)
    steady = n / (calls[2] - calls[1]) if calls and calls[2] > calls[1] else None
    window = pipe.tree.cpu_between(pipe.marks["pipeline_start_wall"]) if pipe.marks and pipe.marks.get("pipeline_start_wall") else {}
    other = window.pop("other processes (not ours)", None)
    teacher_cpu = sum(v for r, v in window.items() if "TeacherPredictor" in r)
    row("pipeline (summary: samples / seconds)", pipe_sps, 1e3 * teacher_cpu / n if n else None,
        f"{n:,} samples in {s['seconds']:.1f} s (CPU ms/s. = teacher actor's)")
    if steady:
        row("pipeline, steady (span of the teacher's calls)", steady, None,
            f"calls busy {calls[3]:.1f} s in a span of {calls[2] - calls[1]:.1f} s; "
            f"first call {calls[1]:.1f} s after the start")
    task_cpu = ray_data_task_cpu(pipe.marks.get("ray_data_stats", "") if pipe.marks else "", "TeacherPredictor")
    # What decode costs in the pipeline, all of it: the decode worker processes' CPU in the
    # window (their imports, Ray's task plumbing, serialising blocks), over what the same decode
    # costs in this process.
    decode_role = sum(v for r, v in window.items() if "DecodeShards" in r)
    decode_overhead = (1e3 * decode_role / n) / m["decode"]["cpu_ms_per_sample"] if decode_role and n else None
    dec_cpu = ray_data_task_cpu(pipe.marks.get("ray_data_stats", "") if pipe.marks else "", "DecodeShards")
    if decode_overhead is not None:
        print(f"  decode worker processes: {1e3 * decode_role / n:.3f} ms CPU per sample in the pipeline"
              + (f" (their tasks alone {1e3 * dec_cpu / n:.3f})" if dec_cpu else "")
              + f", in-process decode {m['decode']['cpu_ms_per_sample']:.3f}: decode_overhead {decode_overhead:.2f}")
    beyond_ray = None
    if decode_overhead is not None and m.get("ray_floor"):
        f = m["ray_floor"]
        beyond_ray = (1e3 * decode_role / n - f["outside_tasks_ms_per_row"]) / m["decode"]["cpu_ms_per_sample"]
        print(f"  Ray's own cost of a decode stage of this shape (no-op tasks, same shards, rows and payload bytes): "
              f"{f['worker_ms_per_row']:.3f} ms per sample in its worker processes, {f['outside_tasks_ms_per_row']:.3f} "
              f"outside its tasks; without that: decode_overhead_beyond_ray {beyond_ray:.2f}")
    if window:
        pure_cpu = sum(p["cpu_ms_per_sample"] for p in befores) / len(befores)
        tree_cpu = 1e3 * sum(window.values()) / n
        actor_cpu = 1e3 * teacher_cpu / n
        tasks = (f"; its tasks alone (Ray Data's remote CPU time, overlapping calls counted per call) "
                 f"{1e3 * task_cpu / n:.2f}" if task_cpu else "")
        print(f"  CPU-time view (robust to other load): pure forward {pure_cpu:.2f} ms/sample, actor call in-process "
              f"{m['actor_call']['cpu_ms_per_sample']:.2f}; in the pipeline the teacher actor process spent "
              f"{actor_cpu:.2f} (incl. its start-up){tasks}; the whole process tree {tree_cpu:.2f}")
    print(f"  Ray start-up (excluded above): {s['startup_seconds']:.1f} s; whole child process {pipe.wall:.1f} s")
    print(f"  written: {s['bytes_written']:,} bytes ({s.get('bytes_per_frame') or s.get('bytes_per_sample')} per "
          f"{'frame' if m['level'] == 'frame' else 'sample'})")
    if window:
        total = sum(window.values())
        print(f"  CPU seconds during the pipeline ({s['seconds']:.1f} s x {os.cpu_count()} CPUs = "
              f"{s['seconds'] * os.cpu_count():.0f} CPU-s available; our process tree used {total:.1f}):")
        for role, secs in list(window.items())[:10]:
            print(f"    {role:<56}{secs:>7.1f} s {1e3 * secs / n:>8.2f} ms/sample")
        if other is not None:
            print(f"    {'(other processes on this machine, not ours)':<56}{other:>7.1f} s")
    if tl:
        print("  timeline (s after the pipeline start; from Ray's task events):")
        for what, a, b, busy, count in tl:
            print(f"    {what:<30} first start {a:6.1f}  last end {b:6.1f}  busy {busy:6.1f} s in {count} span(s)")
        if first is not None:
            print(f"    {'first result at the driver':<30} {first:6.1f}")
    print(f"  peak RSS: driver {mib(pipe.tree.peak_driver_rss)}, largest worker {mib(pipe.tree.peak_worker_rss)} "
          f"({pipe.tree.peak_worker_role})")
    out.update({
        "pipeline": {"summary": s, "samples_per_s": pipe_sps, "audio_s_per_s": pipe_sps * per_s if audio else None,
                     "first_batch_s": first, "steady_samples_per_s": steady, "cpu_in_window": window,
                     "other_cpu_in_window": other, "timeline": tl, "wall": pipe.wall,
                     "peak_driver_rss": pipe.tree.peak_driver_rss, "peak_worker_rss": pipe.tree.peak_worker_rss},
        "teacher_task_cpu_s": task_cpu, "decode_task_cpu_s": dec_cpu, "ratio": pipe_sps / pure,
        "ratio_steady": (steady / pure) if steady else None, "decode_overhead": decode_overhead,
        "decode_overhead_beyond_ray": beyond_ray})
    return out


if __name__ == "__main__":
    sys.exit(main())
