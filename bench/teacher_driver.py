# python bench/teacher_driver.py            (1,000,000 tiny images + a frame-level audio run; ~12 min on 2 cores)
# python bench/teacher_driver.py --smoke    (10,000 images: checks that it runs)
"""What the pseudo-label driver carries, and what kdpipe's bookkeeping costs, in one run.

    python bench/teacher_driver.py [--images 1000000 --shards 1000] [--smoke] [--json FILE]

1. Builds N tiny images (8x8 PNG, a pool of distinct ones under distinct keys) in S
   WebDataset shards, and a frame-level audio corpus (10 s clips).
2. Runs the real job (jobs/pseudo_label.py in a child process with a fresh local Ray,
   ``pipeline.models.zoo:image_cnn?width=4``, ``--image-resize 8 --image-crop 8 --top-k 5
   --batch-size 1024``) over the first N/10 images and over all N, sampling the driver's RSS;
   the job's summary says how many bytes of records its driver loop received.
3. Runs a naive Ray Data script over the same N images in the same run: a shard list ->
   a decode task per shard (tarfile + PIL) -> an actor pool of one running the same model,
   top-5 -> ``write_parquet`` from the workers; no accounting, no errors table, no resume;
   started lean: ``ray.init(include_dashboard=False, log_to_driver=False)``.
4. Runs the job on the audio corpus with a frame-level 3,000-class teacher, k = 10.

Prints the driver bytes per sample of both job runs, the driver's peak RSS at N/10 and N,
both throughputs and their ratio (pipeline phase: samples / seconds after Ray started, for
both); the last line is ``driver_bytes_per_sample=...`` (the image run at N).
Targets (issues 9, 19): driver bytes per sample <= 1; driver peak RSS within 10% from N/10 to
N; kdpipe throughput (its default, lean embedded Ray) >= 0.9 x the lean naive script's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import REPO, audio_pool, mib, run_job, write_corpus  # noqa: E402

IMAGE_TEACHER = "pipeline.models.zoo:image_cnn?width=4"
AUDIO_TEACHER = "pipeline.models.zoo:audio_cnn?width=4&level=frame&time_stride=2&num_classes=3000"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=1_000_000, help="tiny images in the big run")
    p.add_argument("--shards", type=int, default=1000, help="shards they are written in")
    p.add_argument("--audio-clips", type=int, default=600, help="10 s clips for the frame-level run (0: skip)")
    p.add_argument("--batch-size", type=int, default=1024, help="teacher batch size (both pipelines)")
    p.add_argument("--smoke", action="store_true", help="10,000 images in 10 shards, 40 clips: checks it runs")
    p.add_argument("--workdir", default=None, help="where corpora and outputs go (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json", default=None, metavar="FILE", help="also write all numbers to this JSON file")
    return p


def png_pool(n: int, seed: int = 0) -> list[tuple[bytes, float]]:
    """n distinct 8x8 RGB PNGs -> [(bytes, 0.0)]."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append((buf.getvalue(), 0.0))
    return out


def job_cmd(inputs: list[str], output: str, teacher: str, extra: list[str], batch: int) -> list[str]:
    return [sys.executable, os.path.join(REPO, "jobs", "pseudo_label.py"), "--input", *inputs, "--output", output,
            "--teacher", teacher, "--batch-size", str(batch), "--progress-interval", "30", *extra]


def run_kdpipe(tag: str, work: str, inputs: list[str], teacher: str, extra: list[str], batch: int) -> dict:
    out = os.path.join(work, f"st-{tag}")
    res = run_job(job_cmd(inputs, out, teacher, extra, batch), os.path.join(work, f"{tag}.log"))
    if res.rc != 0 or res.summary is None:
        raise SystemExit(f"[bench] kdpipe run {tag} failed (rc {res.rc}); see {work}/{tag}.log:\n{res.output[-3000:]}")
    s = res.summary
    return {"samples": s["samples"], "frames": s["frames"], "seconds": s["seconds"], "wall": round(res.wall, 1),
            "samples_per_s": s["samples"] / s["seconds"], "driver_bytes_received": s["driver_bytes_received"],
            "driver_bytes_per_sample": s["driver_bytes_received"] / max(s["samples"], 1),
            "driver_bytes_per_frame": s["driver_bytes_received"] / s["frames"] if s["frames"] else None,
            "bytes_written": s["bytes_written"], "peak_driver_rss": res.tree.peak_driver_rss,
            "driver_cpu_s": res.tree.cpu_by_role.get("driver", 0.0), "cpu_by_role": res.tree.cpu_by_role}


# --------------------------------------------------------------------------------------------
# the naive script: what a user would write with Ray Data and nothing else


def naive_main(inputs_file: str, output: str, batch: int, result_file: str) -> int:
    """Child mode: the naive pipeline over the shards listed in ``inputs_file``."""
    import tarfile

    import ray
    import torch
    from PIL import Image

    from pipeline.models.zoo import image_cnn

    with open(inputs_file) as f:
        shards = [ln.strip() for ln in f if ln.strip()]
    # Lean, as a user who measured would start it: no dashboard, no worker logs streamed.
    ray.init(logging_level="WARNING", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.monotonic()

    def decode(batch_in: dict):
        for uri in batch_in["uri"]:
            keys, pixels = [], []
            with tarfile.open(str(uri)) as tar:
                for m in tar:
                    keys.append(m.name.split(".", 1)[0])
                    img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                    pixels.append(np.asarray(img, dtype=np.uint8))
            yield {"key": np.array(keys), "image": np.stack(pixels)}

    class Predict:
        def __init__(self):
            torch.manual_seed(0)
            self.model = image_cnn(width=4).eval()
            self.mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)

        def __call__(self, b: dict) -> dict:
            x = torch.from_numpy(b["image"]).permute(0, 3, 1, 2).float().div_(255.0)
            with torch.inference_mode():
                lp = torch.log_softmax(self.model((x - self.mean) / self.mean), -1)
                top = lp.topk(5, -1)
            return {"key": b["key"], "ids": top.indices.numpy().astype(np.uint8),
                    "logprobs": top.values.numpy().astype(np.float16)}

    ds = ray.data.from_items([{"uri": u} for u in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(decode, batch_size=1, num_cpus=1, memory=256 * 2**20)
    ds = ds.map_batches(Predict, batch_size=batch, compute=ray.data.ActorPoolStrategy(size=1))
    ds.write_parquet(output)
    seconds = time.monotonic() - t0
    import pyarrow.dataset as pads

    n = pads.dataset(output, format="parquet").count_rows()
    with open(result_file, "w") as f:
        json.dump({"samples": n, "seconds": seconds}, f)
    return 0


def run_naive(work: str, shards: list[str], batch: int) -> dict:
    lst = os.path.join(work, "naive-inputs.txt")
    with open(lst, "w") as f:
        f.write("\n".join(shards))
    result = os.path.join(work, "naive.json")
    out = os.path.join(work, "naive-out")
    res = run_job([sys.executable, os.path.abspath(__file__), "naive", lst, out, str(batch), result],
                  os.path.join(work, "naive.log"))
    if res.rc != 0:
        raise SystemExit(f"[bench] the naive script failed; see {work}/naive.log:\n{res.output[-3000:]}")
    with open(result) as f:
        r = json.load(f)
    return {**r, "samples_per_s": r["samples"] / r["seconds"], "wall": round(res.wall, 1),
            "peak_driver_rss": res.tree.peak_driver_rss, "driver_cpu_s": res.tree.cpu_by_role.get("driver", 0.0),
            "cpu_by_role": res.tree.cpu_by_role}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    n, shards, clips = args.images, args.shards, args.audio_clips
    if args.smoke:
        n, shards, clips = 10_000, 10, 40
    per = n // shards
    work = args.workdir or tempfile.mkdtemp(prefix="kdpipe-driver-")
    os.makedirs(work, exist_ok=True)
    results: dict = {"images": n, "shards": shards, "per_shard": per, "cpus": os.cpu_count(),
                     "date": time.strftime("%Y-%m-%d")}
    try:
        t0 = time.perf_counter()
        corpus = write_corpus(os.path.join(work, "images"), png_pool(4096), "png", shards, per, prefix="i")
        print(f"[bench] {corpus.samples:,} 8x8 PNGs in {shards} shards ({mib(corpus.bytes)}, "
              f"{time.perf_counter() - t0:.0f} s to build); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
              flush=True)
        img_flags = ["--image-resize", "8", "--image-crop", "8", "--top-k", "5", "--device", "cpu"]
        tenth = corpus.shards[: max(1, shards // 10)]
        small = run_kdpipe("small", work, tenth, IMAGE_TEACHER, img_flags, args.batch_size)
        print(f"[bench] kdpipe, {small['samples']:,} images: {small['samples_per_s']:,.0f} samples/s, driver peak RSS "
              f"{mib(small['peak_driver_rss'])}, driver got {small['driver_bytes_per_sample']:.3f} B/sample", flush=True)
        big = run_kdpipe("big", work, corpus.shards, IMAGE_TEACHER, img_flags, args.batch_size)
        print(f"[bench] kdpipe, {big['samples']:,} images: {big['samples_per_s']:,.0f} samples/s, driver peak RSS "
              f"{mib(big['peak_driver_rss'])}, driver got {big['driver_bytes_per_sample']:.3f} B/sample", flush=True)
        naive = run_naive(work, corpus.shards, args.batch_size)
        print(f"[bench] naive Ray Data script, {naive['samples']:,} images: {naive['samples_per_s']:,.0f} samples/s",
              flush=True)
        results.update(kdpipe_small=small, kdpipe_big=big, naive=naive)
        audio = None
        if clips:
            pool = audio_pool(32, (10.0, 10.0), seed=1)
            acorpus = write_corpus(os.path.join(work, "audio"), pool, "flac", max(1, clips // 20), min(20, clips),
                                   prefix="a")
            audio = run_kdpipe("audio", work, acorpus.shards, AUDIO_TEACHER, ["--top-k", "10", "--device", "cpu"], 64)
            results["kdpipe_audio"] = audio
            print(f"[bench] kdpipe, {audio['samples']:,} 10 s clips, frame level, 3,000 classes, k=10: "
                  f"{audio['driver_bytes_per_sample']:.3f} B/sample ({audio['driver_bytes_per_frame']:.5f} B/frame) "
                  f"to the driver, {audio['bytes_written'] / audio['frames']:.1f} B/frame written", flush=True)
        rss_growth = big["peak_driver_rss"] / small["peak_driver_rss"] - 1
        ratio = big["samples_per_s"] / naive["samples_per_s"]
        results.update(rss_growth=rss_growth, ratio=ratio, wall_ratio=naive["wall"] / big["wall"])
        print("[bench] summary")
        print(f"  driver bytes per sample   {big['driver_bytes_per_sample']:.3f} (images)"
              + (f", {audio['driver_bytes_per_sample']:.3f} (frame-level audio)" if audio else "") + "   target <= 1")
        print(f"  driver peak RSS           {mib(small['peak_driver_rss'])} at {small['samples']:,}, "
              f"{mib(big['peak_driver_rss'])} at {big['samples']:,}: {rss_growth:+.1%}   target within 10%")
        print(f"  throughput                kdpipe {big['samples_per_s']:,.0f}, naive {naive['samples_per_s']:,.0f} "
              f"samples/s: ratio {ratio:.2f}   target >= 0.9   (end to end, Ray start included: "
              f"{results['wall_ratio']:.2f})")
        print(f"  driver CPU                kdpipe {big['driver_cpu_s']:.1f} s, naive {naive['driver_cpu_s']:.1f} s")
        for name, r in (("kdpipe", big), ("naive", naive)):
            top = ", ".join(f"{role} {sec:.1f}" for role, sec in list(r["cpu_by_role"].items())[:6])
            print(f"  CPU-s by process, {name:<6} {top}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        print(f"ratio={ratio:.3f}")
        print(f"driver_bytes_per_sample={big['driver_bytes_per_sample']:.4f}")
        return 0
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "naive":
        sys.path.insert(0, REPO)
        sys.exit(naive_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
    sys.exit(main())
