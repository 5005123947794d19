"""The main job: the million-hour recipe in miniature (make demo / make demo-images).

1. a small labeled set, a much larger unlabeled pool and a held-out test set (spoken digits
   from eSpeak NG, or scikit-learn's handwritten digits for --modality image);
2. a larger teacher trained on the labeled set;
3. the pool pseudo-labelled into the soft-target cache;
4. the same small student trained several ways (labeled only; hard pseudo-labels; soft
   targets with the full k and with k=3; at T=1 and T=4);
5. every model evaluated on the test set; results.json / results.md / PNG plots.

Each step runs a job's own entry point (pipeline.*.job.run) with the argv printed beside
it, on one embedded Ray, so every command can be rerun by hand. Every step resumes: a rerun
reuses the corpus, the cache and finished checkpoints.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import dataclass

from pipeline import storage

SIZES = {
    # split sizes; teacher epochs (each = --labeled-repeat 10 passes); pool students' epochs, batch
    # per worker and lr (a small pool needs smaller batches to take as many optimizer steps)
    "full": {"labeled": 300, "unlabeled": 4000, "test": 1000, "teacher_epochs": 6, "student_epochs": 6,
             "student_batch": 64, "student_lr": 0.01},
    "small": {"labeled": 300, "unlabeled": 1200, "test": 1000, "teacher_epochs": 6, "student_epochs": 10,
              "student_batch": 16, "student_lr": 0.005},
}
MODELS = {
    "audio": {"teacher": "pipeline.models.zoo:audio_cnn?width=32&depth=4&time_stride=4",
              "student": "pipeline.models.zoo:audio_cnn?width=8&depth=4&time_stride=4",
              "prep": ["--crop-seconds", "1.0"]},
    "image": {"teacher": "pipeline.models.zoo:image_resnet?width=32&blocks=[2,2,2]",
              "student": "pipeline.models.zoo:image_cnn?width=8&depth=2",
              "prep": ["--image-resize", "32", "--image-crop", "32"]},
}


@dataclass
class Student:
    name: str
    what: str
    argv: list[str]


def students(k: int, size: str = "full") -> list[Student]:
    """The ways the same student is trained (names as in results.json); the small size (the
    test suite's) trains the three the ordering is checked on."""
    every = [
        Student("student_labeled_only", "labeled set only (cross-entropy)", []),
        Student("student_hard_pseudo", "teacher top-1 as hard labels on the pool + labeled set", ["--loss", "hard"]),
        Student(f"student_soft_k{k}_T1", f"soft targets, all k={k}, T=1 + labeled set", ["--temperature", "1"]),
        Student("student_soft_k3_T1", "soft targets, top-3, T=1 + labeled set", ["--top-k", "3", "--temperature", "1"]),
        Student(f"student_soft_k{k}_T4", f"soft targets, all k={k}, T=4 + labeled set", ["--temperature", "4"]),
    ]
    if size == "small":
        return [s for s in every if s.name in ("student_labeled_only", "student_hard_pseudo", f"student_soft_k{k}_T1")]
    return every


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demo.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
        description="Distillation end to end on a laptop: corpus, teacher, soft-target cache, students, evaluation, "
                    "report.")
    p.add_argument("--modality", choices=["audio", "image"], default="audio",
                   help="audio: spoken digits (eSpeak NG); image: scikit-learn's handwritten digits")
    p.add_argument("--size", choices=list(SIZES), default="full", help="corpus and training size (small: CI)")
    p.add_argument("--output", default=None, help="run directory (default runs/demo, runs/demo-images)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per training job")
    p.add_argument("--seed", type=int, default=0, help="corpus and training seed")
    p.add_argument("--address", default=None, help="Ray cluster address; default: an embedded local Ray")
    return p


def run_step(title: str, job: str, argv: list[str], fn, demo: str = "demo") -> float:
    """Run one job entry point (any demo's); prints the equivalent command. Returns seconds."""
    print(f"\n=== {title}\n$ python jobs/{job} {shlex.join(argv)}", flush=True)
    t0 = time.monotonic()
    rc = fn(argv)
    if rc != 0:
        raise SystemExit(f"{demo}: jobs/{job} failed with exit code {rc}")
    return time.monotonic() - t0


def make_corpus(modality: str, size: dict, seed: int, data: str) -> dict:
    """Generate (or reuse) the corpus; returns corpus.json."""
    if modality == "audio":
        from recipes.corpus import spoken_digits as gen

        cfg = gen.SpokenDigitsConfig(labeled=size["labeled"], unlabeled=size["unlabeled"], test=size["test"],
                                     seed=seed, shard_size=500)
        job = (f"make_spoken_digits.py --output {data} --labeled {cfg.labeled} --unlabeled {cfg.unlabeled} "
               f"--test {cfg.test} --seed {seed} --shard-size 500")
    else:
        from recipes.corpus import image_digits as gen

        cfg = gen.ImageDigitsConfig(labeled=min(size["labeled"], 150), unlabeled=size["unlabeled"] * 2, seed=seed,
                                    shard_size=1000)
        job = (f"make_image_digits.py --output {data} --labeled {cfg.labeled} --unlabeled {cfg.unlabeled} "
               f"--seed {seed} --shard-size 1000")
    print(f"\n=== 1. corpus\n$ python jobs/{job}", flush=True)
    corpus_json = storage.join(data, "corpus.json")
    if storage.exists(corpus_json):
        corpus = json.loads(storage.read_bytes(corpus_json))
        if corpus.get("generator", {}).get("settings", {}).get("seed") == seed and \
                corpus["splits"]["unlabeled"]["count"] == cfg.unlabeled:
            print(f"reusing the corpus in {data}")
            return corpus
    return gen.generate(cfg, data)


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    size = SIZES[args.size]
    out = args.output or ("runs/demo" if args.modality == "audio" else "runs/demo-images")
    data = storage.join(out, "data")
    m = MODELS[args.modality]
    common = ["--workers", str(args.workers), "--cpus-per-worker", "0.5", "--seed", str(args.seed)]
    if args.address:
        common += ["--address", args.address]

    from pipeline.cli import init_ray
    from recipes.report import write_report
    from pipeline.student.evaluate import run as evaluate
    from pipeline.student.job import run as train
    from pipeline.teacher.job import run as pseudo_label

    t_start = time.monotonic()
    init_ray(args.address)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    corpus = make_corpus(args.modality, size, args.seed, data)
    timings["corpus"] = time.monotonic() - t0
    lab, pool, test = (storage.join(data, s) for s in ("labeled", "unlabeled", "test"))
    ckpt = {"teacher": storage.join(out, "teacher")}

    timings["teacher"] = run_step(
        "2. teacher on the labeled set", "train_student.py",
        ["--labeled", lab, "--student", m["teacher"], "--output", ckpt["teacher"], "--epochs", str(size["teacher_epochs"]),
         "--labeled-repeat", "10", "--batch-size", "32", "--lr", "0.005", *m["prep"], *common], train)
    cache = storage.join(out, "softtargets")
    timings["pseudo_label"] = run_step(
        "3. pseudo-label the pool into the soft-target cache", "pseudo_label.py",
        ["--input", pool, "--output", cache, "--teacher", storage.join(ckpt["teacher"], "final"), "--top-k", "10",
         "--batch-size", "128"] + (["--address", args.address] if args.address else []), pseudo_label)

    from pipeline.shards import SoftTargetRun

    k = SoftTargetRun(cache).manifest.k
    for st in students(k, args.size):
        ckpt[st.name] = storage.join(out, st.name)
        if st.name == "student_labeled_only":  # the teacher's own recipe, on the small model
            argv = ["--labeled", lab, "--epochs", str(size["teacher_epochs"]), "--labeled-repeat", "10",
                    "--batch-size", "32", "--lr", "0.005"]
        else:
            argv = ["--soft-targets", cache, "--labeled", lab, "--labeled-ratio", "0.2",
                    "--epochs", str(size["student_epochs"]), "--batch-size", str(size["student_batch"]),
                    "--lr", str(size["student_lr"]), *st.argv]
        timings[st.name] = run_step(f"4. {st.name}: {st.what}", "train_student.py",
                                 argv + ["--student", m["student"], "--output", ckpt[st.name], *m["prep"], *common],
                                 train)

    results = []
    finals = {name: storage.join(path, "final") for name, path in ckpt.items()}
    all_file = storage.join(out, "eval", "all.json")
    # every model in one pass over the test set: decoded once, each model's forward on the batch
    timings["eval"] = run_step("5. evaluate every model on the test set", "evaluate.py",
                            ["--checkpoint", *finals.values(), "--input", test, "--output", all_file]
                            + (["--address", args.address] if args.address else []), evaluate)
    evals = {r["checkpoint"]: r for r in json.loads(storage.read_bytes(all_file))["models"]}
    for name, final in finals.items():
        ev = evals[final]
        storage.atomic_write_bytes(storage.join(out, "eval", f"{name}.json"), (json.dumps(ev, indent=1) + "\n").encode())
        what = "teacher trained on the labeled set" if name == "teacher" else \
            next(s.what for s in students(k, args.size) if s.name == name)
        results.append({"name": name, "description": what, "test_accuracy": ev["accuracy"], "checkpoint": final,
                        "spec": m["teacher"] if name == "teacher" else m["student"],
                        "train_seconds": round(timings[name], 1)})
    timings["total"] = time.monotonic() - t_start
    table = write_report(out, results, cache, ckpt, corpus, timings)
    print("\n" + table)
    print(f"\ndemo finished in {timings['total'] / 60:.1f} min; report in {out}/results.md", flush=True)
    return 0

