# python bench/student_startup.py
"""Student job start-up: seconds from the job's process start to its first optimizer step.

    python bench/student_startup.py                  # 3 runs, 1 worker, CPU (issue 22: <= 8 s on 2 cores)
    python bench/student_startup.py --runs 5 --workers 2 --json bench/results/student_startup_cpu2.json

Each run is ``jobs/train_student.py`` in a fresh child process with its own embedded Ray,
on a tiny labeled corpus (2 tars x 32 one-second FLAC clips), 1 epoch, so that the time is
start-up, not training. The job's summary splits it (docs/performance.md):
  plan_s         process start -> planning done (imports, the student's probe, the shard list);
  ray_init_s     the embedded Ray's start;
  train_start_s  the rest: Ray Train's controller, worker group and DDP, the model's build,
                 and the first batch through Ray Data (its coordinator actor, a decode worker).
The last line is ``startup_s=S``: the median over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import REPO, audio_pool, run_job, write_corpus  # noqa: E402

STUDENT = "pipeline.models.zoo:audio_cnn?width=8"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="job runs (the median is reported)")
    p.add_argument("--workers", type=int, default=1, help="training workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per training worker")
    p.add_argument("--student", default=STUDENT, help="student spec")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one, removed)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1:
        raise SystemExit("--runs must be >= 1")
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        corpus = os.path.join(work, "labeled")
        write_corpus(corpus, audio_pool(16, (0.8, 1.2)), "flac", shards=2, per_shard=32, num_classes=10)
        runs = []
        for i in range(args.runs):
            out = os.path.join(work, f"student-{i}")
            cmd = [sys.executable, os.path.join(REPO, "jobs", "train_student.py"), "--labeled", corpus,
                   "--student", args.student, "--output", out, "--epochs", "1", "--batch-size", "16",
                   "--workers", str(args.workers), "--cpus-per-worker", str(args.cpus_per_worker),
                   "--device", "cpu"]
            r = run_job(cmd, os.path.join(work, f"run-{i}.log"))
            if r.rc != 0 or not r.summary or r.summary.get("startup_s") is None:
                print(r.output[-4000:], file=sys.stderr)
                raise SystemExit(f"run {i} failed (exit {r.rc})")
            row = {"startup_s": r.summary["startup_s"], **r.summary["startup"], "wall_s": round(r.wall, 2)}
            runs.append(row)
            print(f"[bench] run {i + 1}/{args.runs}: first step {row['startup_s']:.2f} s after start (plan "
                  f"{row['plan_s']:.2f}, Ray {row['ray_init_s']:.2f}, Ray Train to the first batch "
                  f"{row['train_start_s']:.2f}); whole job {row['wall_s']:.1f} s", flush=True)
    median = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    result = {"cpus": os.cpu_count(), "workers": args.workers, "student": args.student, "runs": runs,
              "median": median}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"[bench] median: plan {median['plan_s']} s, Ray {median['ray_init_s']} s, Ray Train to the first batch "
          f"{median['train_start_s']} s")
    print(f"startup_s={median['startup_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
