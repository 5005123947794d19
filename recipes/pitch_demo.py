"""The pitch recipe (make demo-pitch): distil CREPE into a small frame-level pitch tracker on
unlabeled audio, through the real jobs, and compare it with CREPE tiny, the published small model.

1. the pitch corpus (jobs/make_pitch_corpus.py): an unlabeled pool (eSpeak NG speech and
   synthesised voiced signals), a small labeled set and a test set with exact f0 per 10 ms,
   from f0 bands and timbres the other splits never use;
2. the pool pseudo-labelled by CREPE full (22.2 M parameters, the packaged weights) into the
   soft-target cache: frame level, 360 pitch bins, top-k, sparse frames (one every 80 ms);
3. the same small student (a harmonic-stack CNN with an autocorrelation channel, a fraction
   of CREPE tiny's parameters) trained four ways, each over several seeds: labeled set only;
   the teacher's argmax bin as hard labels; soft targets (all k); soft targets top-k';
4. CREPE full, CREPE tiny and every student evaluated in one pass over the test set: raw
   pitch accuracy (RPA), raw chroma accuracy (RCA), voicing; CPU frames/s in this process;
5. results.json / results.md, rpa.png, contour.png.

Every step is a job's own entry point with the argv printed beside it; every step resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

from pipeline import storage
from recipes.demo import run_step

# CREPE full is the cost on CPU, so the pool is pseudo-labelled on sparse frames (one every
# 80 ms; CREPE's window is 64 ms, so they do not overlap) and the students train on those
# frames (the labeled-only baseline at 40 ms). Every model is evaluated at 40 ms frames: the
# students are frame-independent, their weights run at any hop.
TRAIN_HOP_MS = 80
EVAL_HOP_MS = 40
TEACHER = "pipeline.models.zoo:crepe_full"
TINY = "pipeline.models.zoo:crepe_tiny"
STUDENT_FACTORY = "pipeline.models.zoo:pitch_hcnn"
# acf: the autocorrelation channel (pipeline/models/pitch_zoo.py), chosen on a validation split
# (docs/recipes.md): 95.2 RPA with it, 86.9 without
STUDENT_KWARGS = {"channels": 32, "layers": 3, "acf": True}
SIZES = {
    # clips (1 s each); student optimiser steps, clips per batch; seeds per variant. 200 steps:
    # on the validation split as good as 300 (95.0 +- 1.0 vs 95.2 +- 0.5), and it fits 15 minutes
    "full": {"pool": 300, "labeled": 8, "test": 100, "steps": 200, "batch": 10, "seeds": 3},
    "small": {"pool": 24, "labeled": 4, "test": 12, "steps": 20, "batch": 8, "seeds": 1},
}
# One peak learning rate for every variant, chosen on the validation split (docs/recipes.md):
# soft k=10 T=2 95.0 at 0.002, 97.0 at 0.004, 97.2 at 0.008, 97.1 at 0.016, 97.4 at 0.032 (a
# plateau, inside the seed spread). Hard pseudo-labels gain more (92.1, 93.6, 95.3, 95.7, 95.6):
# at its own best rate that baseline is still 1.5 below soft at 0.008
LR = 0.008


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    argv: tuple[str, ...]
    hop_ms: int  # the student's frames while training


def variants(k: int, kprime: int) -> list[Variant]:
    """The ways the same student is trained (names as in results.json)."""
    soft = ("--confidence-threshold", "0.2")  # unvoiced and unsure frames carry no target (docs/recipes.md)
    return [
        # At 40 ms, twice the frames of the others, so the baseline is not starved: with 8 clips,
        # 80 ms frames would leave it 104 labelled frames. At 10 ms, every label frame, one step
        # costs 10x the 40 ms step (1.3 s vs 0.13 s on one core).
        Variant("labeled_only", f"labeled set only (cross-entropy, {EVAL_HOP_MS} ms frames)", (), EVAL_HOP_MS),
        Variant("hard_pseudo", "teacher argmax bin as a hard label on the pool + labeled set",
                ("--loss", "hard", *soft), TRAIN_HOP_MS),
        # T=2, chosen on a validation split (docs/recipes.md): CREPE's normalised activations
        # are nearly a blurred one-hot, and T=2 lets the student see the rest of them
        Variant(f"soft_k{k}", f"soft targets, all k={k}, T=2 + labeled set", ("--temperature", "2", *soft),
                TRAIN_HOP_MS),
        Variant(f"soft_k{kprime}", f"soft targets, top-{kprime}, T=1 + labeled set", ("--top-k", str(kprime), *soft),
                TRAIN_HOP_MS),
    ]


def student_spec(hop_ms: int, weights: str | None = None) -> str:
    kw = "&".join(f"{k}={json.dumps(v) if isinstance(v, bool) else v}"
                  for k, v in {**STUDENT_KWARGS, "hop_ms": hop_ms}.items())
    return f"{STUDENT_FACTORY}?{kw}" + (f"&weights={weights}" if weights else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demo_pitch.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
        description="Distil CREPE full into a small pitch tracker on unlabeled audio; compare with CREPE tiny.")
    p.add_argument("--size", choices=list(SIZES), default="full", help="corpus and training size (small: CI)")
    p.add_argument("--output", default="runs/demo-pitch", help="run directory")
    p.add_argument("--top-k", type=int, default=10, help="pitch bins the cache keeps per teacher frame")
    p.add_argument("--kprime", type=int, default=3, help="k' of the small-k' soft variant")
    p.add_argument("--seed", type=int, default=0, help="corpus seed; students use seeds SEED, SEED+1, ...")
    p.add_argument("--address", default=None, help="Ray cluster address; default: an embedded local Ray")
    return p


def _step(title: str, job: str, argv: list[str], fn) -> float:
    return run_step(title, job, argv, fn, demo="demo-pitch")


def make_corpus(size: dict, seed: int, data: str) -> dict:
    """Generate (or reuse) the pitch corpus; returns corpus.json."""
    from recipes.corpus import pitch as gen

    cfg = gen.PitchCorpusConfig(pool=size["pool"], labeled=size["labeled"], test=size["test"], seed=seed,
                                shard_size=50, label_hop_ms=10.0)
    print(f"\n=== 1. corpus\n$ python jobs/make_pitch_corpus.py --output {data} --pool {cfg.pool} --labeled "
          f"{cfg.labeled} --test {cfg.test} --seed {seed} --shard-size 50 --label-hop-ms 10", flush=True)
    corpus_json = storage.join(data, "corpus.json")
    if storage.exists(corpus_json):
        corpus = json.loads(storage.read_bytes(corpus_json))
        counts = {k: v["count"] for k, v in corpus["splits"].items()}
        if corpus.get("generator", {}).get("settings", {}).get("seed") == seed and \
                counts == {"pool": cfg.pool, "labeled": cfg.labeled, "test": cfg.test}:
            print(f"reusing the corpus in {data}")
            return corpus
    return gen.generate(cfg, data)


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    size = SIZES[args.size]
    out = args.output
    data = storage.join(out, "data")
    ray_flag = ["--address", args.address] if args.address else []

    from pipeline.cli import init_ray
    from recipes.pitch_report import measure_speed, write_report
    from pipeline.shards import SoftTargetRun
    from pipeline.student.evaluate import run as evaluate
    from pipeline.student.job import run as train
    from pipeline.teacher.job import run as pseudo_label

    t_start = time.monotonic()
    init_ray(args.address)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    corpus = make_corpus(size, args.seed, data)
    timings["corpus"] = time.monotonic() - t0
    lab, pool, test = (storage.join(data, s) for s in ("labeled", "pool", "test"))

    cache = storage.join(out, "softtargets")
    timings["pseudo_label"] = _step(
        "2. pseudo-label the pool with CREPE full into the soft-target cache", "pseudo_label.py",
        ["--input", pool, "--output", cache, "--teacher", f"{TEACHER}?hop_ms={TRAIN_HOP_MS}",
         "--top-k", str(args.top_k), "--batch-size", "32", "--precision", "fp32", *ray_flag], pseudo_label)
    k = SoftTargetRun(cache).manifest.k

    finals: dict[str, str] = {}
    runs: list[dict] = []
    for v in variants(k, args.kprime):
        for s in range(size["seeds"]):
            seed = args.seed + s
            name = f"{v.name}_seed{seed}"
            path = storage.join(out, name)
            common = ["--student", student_spec(v.hop_ms), "--output", path, "--steps", str(size["steps"]),
                      "--batch-size", str(size["batch"]), "--lr", str(LR), "--weight-decay", "0.0001",
                      "--workers", "1", "--seed", str(seed), "--label-frame-shift-ms", "10", "--labeled", lab,
                      *ray_flag]
            if v.name == "labeled_only":  # every step in one epoch: a small set, one dataset start-up
                repeat = max(1, -(-size["steps"] * size["batch"] // size["labeled"]))
                argv = common + ["--labeled-repeat", str(repeat)]
            else:
                argv = common + ["--soft-targets", cache, "--labeled-ratio", "0.2", *v.argv]
            timings[name] = _step(f"3. {name}: {v.what}", "train_student.py", argv, train)
            finals[name] = storage.join(path, "final", "model.safetensors")
            runs.append({"name": name, "variant": v.name, "what": v.what, "seed": seed,
                         "train_seconds": round(timings[name], 1)})

    # Every model at the same frames, in one pass over the test set.
    specs = {"crepe_full": f"{TEACHER}?hop_ms={EVAL_HOP_MS}", "crepe_tiny": f"{TINY}?hop_ms={EVAL_HOP_MS}"}
    specs.update({name: student_spec(EVAL_HOP_MS, w) for name, w in finals.items()})
    eval_file = storage.join(out, "eval", "test.json")
    timings["eval"] = _step("4. evaluate CREPE full, CREPE tiny and every student on the test set", "evaluate.py",
                            ["--checkpoint", *specs.values(), "--input", test, "--output", eval_file,
                             "--task", "pitch", *ray_flag], evaluate)
    evals = {r["checkpoint"]: r for r in json.loads(storage.read_bytes(eval_file))["models"]}
    speed = measure_speed({"crepe_full": specs["crepe_full"], "crepe_tiny": specs["crepe_tiny"],
                           "student": student_spec(EVAL_HOP_MS, next(iter(finals.values())))})
    timings["total"] = time.monotonic() - t_start
    table = write_report(out, specs, evals, runs, speed, corpus, test, timings, EVAL_HOP_MS)
    print("\n" + table)
    print(f"\ndemo-pitch finished in {timings['total'] / 60:.1f} min; report in {out}/results.md", flush=True)
    return 0
