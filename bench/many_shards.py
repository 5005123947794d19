# python bench/many_shards.py                  (20,000 and 100,000 tiny shards; ~15 min on 2 cores)
# python bench/many_shards.py --smoke          (1,000 and 3,000 shards: checks that it runs, ~2 min)
"""What kdpipe's bookkeeping costs per shard, at 20,000 and 100,000 shards (issue 23 item 5).

    python bench/many_shards.py [--shards 20000 100000] [--per-shard 2] [--smoke] [--json FILE]

For each N (local disk, one fresh local Ray per job, in a child process sampled by psutil):
1. writes N WebDataset tars of ``--per-shard`` 8x8 PNGs each (distinct keys);
2. runs jobs/pseudo_label.py over them (``pipeline.models.zoo:image_cnn?width=4``, top-5):
   its planning time (the summary's ``plan_seconds``: listing, opening the run, matching),
   the driver's peak RSS, the driver's and the compactor's CPU per shard (the bookkeeping:
   commit records, the commit log, shard files), and the whole run's time per shard;
3. the sizes of what the bookkeeping left: manifest.json, the commit log (files, bytes);
4. runs the same command again (a full cache hit): its wall time, process start to exit;
5. opens the run as the student does before Ray starts (``SoftTargetRun`` + ``verify``, in a
   child process) and counts, with a Python audit hook, every file open and directory
   listing it makes under the run directory.

Prints one table and the growth from the first N to the last; ``--json`` writes all numbers.
Targets (issue 23): driver RSS and per-shard bookkeeping grow at most linearly with a small
constant; a full-cache-hit rerun of 100,000 shards <= 60 s; opening the run for a student
costs O(1) requests plus the shards read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import REPO, mib, run_job, write_corpus  # noqa: E402
from teacher_driver import png_pool  # noqa: E402

TEACHER = "pipeline.models.zoo:image_cnn?width=4"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[20_000, 100_000], help="shard counts to measure")
    p.add_argument("--per-shard", type=int, default=2, help="images per shard")
    p.add_argument("--smoke", action="store_true", help="1,000 and 3,000 shards: checks that it runs")
    p.add_argument("--workdir", default=None, help="where corpora and outputs go (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json", default=None, metavar="FILE", help="also write all numbers to this JSON file")
    return p


def job_cmd(inputs: str, output: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "jobs", "pseudo_label.py"), "--input", inputs, "--output", output,
            "--teacher", TEACHER, "--image-resize", "8", "--image-crop", "8", "--top-k", "5",
            "--batch-size", "256", "--progress-interval", "60"]


def dir_bytes(path: str) -> tuple[int, int]:
    """(files, bytes) directly under path."""
    names = os.listdir(path)
    return len(names), sum(os.path.getsize(os.path.join(path, n)) for n in names)


def open_child(run_dir: str) -> int:
    """Child mode: open the run as the student's planning does; print what it cost as JSON."""
    counts = {"open": 0, "listdir": 0}
    prefix = os.path.realpath(run_dir)

    def hook(event: str, args: tuple) -> None:
        # The same events a real open raises; counted only under the run directory.
        if event == "open" and isinstance(args[0], str) and os.path.realpath(args[0]).startswith(prefix):
            counts["open"] += 1
        elif event in ("os.listdir", "os.scandir") and args and isinstance(args[0], str) and \
                os.path.realpath(args[0]).startswith(prefix):
            counts["listdir"] += 1

    from pipeline.shards import SoftTargetRun

    sys.addaudithook(hook)
    t0 = time.monotonic()
    run = SoftTargetRun(run_dir)  # manifest + commit log
    opened = dict(counts)
    t_open = time.monotonic() - t0
    damaged = run.verify()  # the student's pre-flight check: listings of shards/ and errors/
    t_verify = time.monotonic() - t0 - t_open
    print(json.dumps({"shards": len(run.shard_names), "open_s": round(t_open, 3), "open_files": opened["open"],
                      "open_listings": opened["listdir"], "verify_s": round(t_verify, 3),
                      "verify_files": counts["open"] - opened["open"],
                      "verify_listings": counts["listdir"] - opened["listdir"], "damaged": len(damaged)}))
    return 0


def measure(n: int, per_shard: int, work: str) -> dict:
    root = os.path.join(work, f"in-{n}")
    out = os.path.join(work, f"st-{n}")
    t0 = time.monotonic()
    write_corpus(root, png_pool(256), "png", n, per_shard, prefix=f"n{n}-")
    print(f"[bench] {n:,} shards written in {time.monotonic() - t0:.0f} s", flush=True)
    first = run_job(job_cmd(root, out), os.path.join(work, f"first-{n}.log"), sample_interval=0.5)
    if first.rc != 0 or first.summary is None:
        raise SystemExit(f"[bench] first run over {n} shards failed (rc {first.rc}):\n{first.output[-3000:]}")
    again = run_job(job_cmd(root, out), os.path.join(work, f"again-{n}.log"), sample_interval=0.5)
    if again.rc != 0 or not again.summary or not again.summary["cache_hit"]:
        raise SystemExit(f"[bench] rerun over {n} shards was not a cache hit (rc {again.rc}):\n{again.output[-3000:]}")
    opened = subprocess.run([sys.executable, os.path.abspath(__file__), "open-child", out], capture_output=True,
                            text=True, cwd=REPO, check=True)
    student_open = json.loads(opened.stdout.strip().splitlines()[-1])
    s, cpu = first.summary, first.tree.work_cpu_by_role
    commit_files, commit_bytes = dir_bytes(os.path.join(out, "_commits"))
    driver_cpu = cpu.get("driver", 0.0)
    compactor_cpu = sum(v for r, v in cpu.items() if "Compactor" in r)
    row = {
        "shards": n, "samples": s["samples"], "first_run_wall_s": round(first.wall, 1),
        "first_run_seconds": s["seconds"], "plan_seconds": s["plan_seconds"],
        "run_ms_per_shard": round(1000 * s["seconds"] / n, 3),
        "driver_peak_rss": first.tree.peak_driver_rss, "driver_cpu_s": round(driver_cpu, 1),
        "driver_cpu_ms_per_shard": round(1000 * driver_cpu / n, 3),
        "compactor_cpu_ms_per_shard": round(1000 * compactor_cpu / n, 3),
        "manifest_bytes": os.path.getsize(os.path.join(out, "manifest.json")),
        "commit_files": commit_files, "commit_bytes": commit_bytes,
        "rerun_wall_s": round(again.wall, 1), "rerun_plan_seconds": again.summary["plan_seconds"],
        "rerun_driver_peak_rss": again.tree.peak_driver_rss, "student_open": student_open,
        "cpu_by_role": first.tree.work_cpu_by_role,
    }
    print(f"[bench] {n:,} shards: run {s['seconds']:.0f} s ({row['run_ms_per_shard']:.2f} ms/shard), planning "
          f"{s['plan_seconds']:.1f} s, driver RSS {mib(row['driver_peak_rss'])}, rerun {again.wall:.1f} s", flush=True)
    shutil.rmtree(root, ignore_errors=True)  # 10 KB per tar: 1 GB at 100,000
    return row


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sizes = [1000, 3000] if args.smoke else sorted(args.shards)
    work = args.workdir or tempfile.mkdtemp(prefix="kdpipe-many-shards-")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        for n in sizes:
            rows.append(measure(n, args.per_shard, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\nshards | run s (ms/shard) | planning s | driver peak RSS | driver CPU ms/shard | compactor CPU ms/shard | "
          "manifest B | commit log (files, B) | full-hit rerun s | student open: files, listings, s")
    for r in rows:
        so = r["student_open"]
        print(f"{r['shards']:,} | {r['first_run_seconds']:.0f} ({r['run_ms_per_shard']:.2f}) | {r['plan_seconds']:.2f} | "
              f"{mib(r['driver_peak_rss'])} | {r['driver_cpu_ms_per_shard']:.2f} | {r['compactor_cpu_ms_per_shard']:.2f} | "
              f"{r['manifest_bytes']:,} | {r['commit_files']}, {r['commit_bytes']:,} | {r['rerun_wall_s']:.1f} | "
              f"{so['open_files']} + {so['verify_files']}, {so['open_listings']} + {so['verify_listings']}, "
              f"{so['open_s'] + so['verify_s']:.2f}")
    a, b = rows[0], rows[-1]
    growth = {
        "driver_rss_bytes_per_extra_shard": round((b["driver_peak_rss"] - a["driver_peak_rss"]) / (b["shards"] - a["shards"]), 1),
        "commit_bytes_per_shard": round(b["commit_bytes"] / b["shards"], 1),
        "driver_cpu_ms_per_shard_ratio": round(b["driver_cpu_ms_per_shard"] / max(a["driver_cpu_ms_per_shard"], 1e-9), 2),
        "run_ms_per_shard_ratio": round(b["run_ms_per_shard"] / a["run_ms_per_shard"], 2),
    }
    print(f"\n{a['shards']:,} -> {b['shards']:,} shards: driver RSS +{growth['driver_rss_bytes_per_extra_shard']:,.0f} "
          f"B per extra shard; commit log {growth['commit_bytes_per_shard']:.0f} B per shard; per-shard driver CPU "
          f"x{growth['driver_cpu_ms_per_shard_ratio']}, per-shard run time x{growth['run_ms_per_shard_ratio']}")
    print(f"full-cache-hit rerun of {b['shards']:,} shards: {b['rerun_wall_s']:.1f} s (target <= 60 s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "per_shard": args.per_shard,
                       "rows": rows, "growth": growth}, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "open-child":
        sys.exit(open_child(sys.argv[2]))
    sys.exit(main())
