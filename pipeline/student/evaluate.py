"""The evaluate job: a checkpoint against labeled shards (accuracy) or a soft-target run
(agreement with the teacher's top-1, KL to the teacher).

    python jobs/evaluate.py --checkpoint runs/student/final --input data/digits/test [--output eval.json]

Accuracy is per utterance/image, or per frame at frame level. KL is KL(p_teacher || q_student)
at T=1 with the teacher's stored top-k renormalised (docs/format.md), averaged over samples
(frames). The result is one JSON object: the last line of stdout, and --output if given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import pyarrow as pa

# Everything the driver and its actors use is imported now, not first mid-run: the driver's
# copy of pipeline/ may be rewritten under it (see pipeline.teacher.job).
from pipeline import pitch as pitch_math
from pipeline import storage
from pipeline.cli import (DECODE_TASK_MEMORY, add_limit_flags, add_preprocessing_flags, add_ray_flags, add_trust_flag, init_ray,
                          limits_from_args, resolve_preprocessing, use_gpu)
from pipeline.config import ConfigError, JobParser, add_config_flag, parse_args
from pipeline.inputs import SHARD_EXTENSIONS, shard_name
from pipeline.modalities import preprocessing_from_dict
from pipeline.models.facts import declare, frame_stride, resolve
from pipeline.models.runner import ModelRunner
from pipeline.models.spec import SpecError, check_trust_modules, parse_spec
from pipeline.shards import FormatError, SoftTargetRun
from pipeline.shards.manifest import MANIFEST_FILE
from pipeline.storage import StorageError
from pipeline.student.collate import collate
from pipeline.student.data import F0_FRAME_MS, ShardRows
from pipeline.student.errors import data_error
from pipeline.student.losses import kd_kl
from pipeline.student.metrics import accuracy_counts, target_positions
from pipeline.student.plan import DataPlan
from pipeline.student.tasks import LABELED, PSEUDO, ShardTask

STAT_NAMES = ("correct", "total", "agree", "kl_sum", "t_total")
PITCH_STATS = ("voiced", "unvoiced", "pitch_ok", "chroma_ok", "voiced_hit", "false_alarm", "abs_cents_sum")


def build_parser() -> argparse.ArgumentParser:
    p = JobParser(
        prog="evaluate.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
        description="Evaluate a checkpoint: accuracy on labeled shards, or agreement/KL against a soft-target run.")
    add_config_flag(p)
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="SPEC",
                   help="checkpoint directory (train_student.py's OUTPUT/final or a Ray checkpoint), local or s3://, "
                        "or any model SPEC (module:factory?kw=v, hf:DIR, ...: e.g. a teacher as it is); several are "
                        "evaluated in one pass over the data (same input preprocessing, level, classes, frame shift)")
    add_trust_flag(p)
    p.add_argument("--input", required=True, nargs="+", metavar="URI",
                   help="labeled shards (.cls / .frames.npy members), or one soft-target run directory")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the result JSON here (local or s3://)")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    p.add_argument("--actors", type=int, default=1, help="model actors")
    p.add_argument("--label-frame-shift-ms", type=float, default=10.0, help="frame shift of .frames.npy labels (.f0.npy references are per 10 ms)")
    p.add_argument("--task", choices=["auto", "classes", "pitch"], default="auto",
                   help="classes: accuracy; pitch: raw pitch / chroma accuracy and voicing against .f0.npy references "
                        "(CREPE's 360 bins); auto: pitch for frame-level models with 360 classes")
    p.add_argument("--voicing-threshold", type=float, default=0.5,
                   help="pitch: a frame counts as voiced when the model's confidence reaches this (CREPE: its largest "
                        "activation; a softmax model: its top probability)")
    p.add_argument("--key-column", default=None, help="Parquet labeled inputs: column of sample keys (default 'key')")
    p.add_argument("--data-column", default=None, help="Parquet labeled inputs: media column (default: the first)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: a GPU when the cluster has one")
    add_ray_flags(p)
    add_preprocessing_flags(p, "the checkpoint's, or what the model declares")
    add_limit_flags(p)
    return p


class EvalPredictor:
    """Ray Data actor: a batch of training rows (Arrow) -> one row of summed statistics per model
    (columns ``"{i}.{stat}"`` for model i)."""

    def __init__(self, checkpoints: list[str], trust: tuple, data: DataPlan, device: str, pitch: bool = False,
                 voicing_threshold: float = 0.5):
        runner = ModelRunner.from_specs(checkpoints, trust, data.preprocessing, device)
        self.runner, self.data = runner, data
        self.pitch, self.threshold = pitch, voicing_threshold
        # how each model's logits say "voiced": CREPE's largest activation, or a softmax's top probability
        self.confidence_kind = [getattr(m, "confidence_kind", "softmax") for m in runner.models]

    def __call__(self, batch: pa.Table) -> dict:
        b = {k: v.to(self.runner.device) for k, v in collate(batch, self.data).items()}
        o = self.runner.predict(b["x"], b.get("lengths"))  # decoded and featurised once for all models
        out = {}
        for i, (logits, frames) in enumerate(zip(o.logits, o.all_frames)):
            for k, v in self._stats(logits, frames, b, i).items():
                out[f"{i}.{k}"] = np.array([v])
        return out

    def _stats(self, logits, frames, b, i: int) -> dict:
        data = self.data
        stats = dict.fromkeys(STAT_NAMES, 0.0)
        stats["correct"], stats["total"] = accuracy_counts(logits, frames, b["flabels"] if data.level == "frame"
                                                           else b["label"])
        at_t, T, tv = target_positions(logits, frames, b, data.teacher_stride)
        if T is None:
            stats["agree"] = float(((at_t.argmax(-1) == b["t_ids"][:, 0]) & tv).sum())
            stats["kl_sum"] = float((kd_kl(at_t, b["t_ids"], b["t_lp"]) * tv).sum())
        elif T:
            stats["agree"] = float(((at_t[:, :T].argmax(-1) == b["t_ids"][:, :T, 0]) & tv).sum())
            stats["kl_sum"] = float((kd_kl(at_t[:, :T], b["t_ids"][:, :T], b["t_lp"][:, :T]) * tv).sum())
        stats["t_total"] = float(tv.sum())
        if self.pitch:
            stats.update(self._pitch(logits, frames, b, self.confidence_kind[i]))
        return stats

    def _pitch(self, logits, frames, b, kind: str) -> dict:
        """Pitch counts of the rows that have a reference contour (.f0.npy)."""
        total = pitch_math.PitchCounts()
        cents = pitch_math.decode(logits).cpu().numpy()  # (B, T)
        conf = pitch_math.confidence(logits, kind).cpu().numpy()
        f0, f0_len, T = b["f0"].cpu().numpy(), b["f0_len"].cpu().numpy(), frames.cpu().numpy()
        for i in np.nonzero(f0_len)[0]:
            ref = pitch_math.align_reference(f0[i, : f0_len[i]], self.data.frame_shift_ms, int(T[i]), F0_FRAME_MS)
            total = total + pitch_math.pitch_counts(cents[i, : T[i]], ref, conf[i, : T[i]], self.threshold)
        return {k: float(getattr(total, k)) for k in PITCH_STATS}


def model_facts(args, checkpoint: str, trust: tuple) -> dict:
    """modality, level, num_classes, frame_shift_ms, preprocessing of a --checkpoint: from a
    checkpoint's config.json, else from the model itself (what it declares, flags on top, and
    a forward pass for the output shape)."""
    try:
        spec = parse_spec(checkpoint, trust)
    except (SpecError, FileNotFoundError) as e:
        raise ConfigError(f"--checkpoint {checkpoint}: {e}") from None
    if spec.kind == "checkpoint":  # its config.json says it all, without building the model
        return dict(spec.config)
    d = declare(checkpoint, trust, "--checkpoint")
    modality = d.modality or (d.preprocessing or {}).get("modality")
    if modality is None:
        raise ConfigError(f"--checkpoint {checkpoint}: the model does not say its modality; give a checkpoint "
                          "or a model that declares it")
    f = resolve(d, modality, resolve_preprocessing(modality, d.preprocessing, args), "--checkpoint")
    return {"modality": f.modality, "level": f.level, "num_classes": f.num_classes,
            "frame_shift_ms": d.frame_shift_ms, "preprocessing": f.preprocessing}


def run(argv=None) -> int:
    """Entry point of jobs/evaluate.py; returns the exit code."""
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        trust = check_trust_modules(args.trust_module)
        facts = [model_facts(args, c, trust) for c in args.checkpoint]
        ck = facts[0]
        for c, f in zip(args.checkpoint[1:], facts[1:]):
            for key in ("modality", "level", "num_classes", "frame_shift_ms", "preprocessing"):
                if f.get(key) != ck.get(key):
                    raise ConfigError(f"--checkpoint {c}: its {key} {f.get(key)!r} differs from {args.checkpoint[0]}'s "
                                      f"{ck.get(key)!r}; models evaluated in one pass must see the same input")
        soft_run = None
        if len(args.input) == 1 and storage.exists(storage.join(args.input[0], MANIFEST_FILE)):
            soft_run = SoftTargetRun(args.input[0])
            m = soft_run.manifest
            if m.num_classes != ck["num_classes"] or m.level != ck["level"]:
                raise ConfigError(f"--input {args.input[0]}: {m.level}-level run with {m.num_classes} classes does not "
                                  f"match the checkpoint ({ck['level']}, {ck['num_classes']} classes)")
            damaged = soft_run.verify()
            if damaged:
                name, why = sorted(damaged.items())[0]
                raise ConfigError(f"--input {args.input[0]}: {len(damaged)} shard(s) damaged, e.g. {name}: {why}")
            tasks = [ShardTask(PSEUDO, n, m.shards[n].input, m.shards[n]) for n in soft_run.shard_names]
        else:
            tasks = [ShardTask(LABELED, shard_name(r.uri), r.uri) for r in storage.expand_shards(args.input, SHARD_EXTENSIONS)]
        pitch = args.task == "pitch" or (args.task == "auto" and ck["level"] == "frame" and ck["num_classes"] == 360)
        if pitch and (ck["level"] != "frame" or ck["num_classes"] != 360):
            raise ConfigError(f"--task pitch: needs a frame-level model over CREPE's 360 pitch bins, not "
                              f"{ck['level']} level with {ck['num_classes']} classes")
        stride = 1
        if soft_run and ck["level"] == "frame":
            stride = frame_stride(soft_run.manifest.frame_shift_ms, ck["frame_shift_ms"], f"--input {args.input[0]}")
        data = DataPlan(modality=ck["modality"], level=ck["level"],
                        preprocessing=preprocessing_from_dict(ck["preprocessing"]), num_classes=ck["num_classes"],
                        stored_k=soft_run.manifest.k if soft_run else 1,
                        label_frame_shift_ms=args.label_frame_shift_ms, frame_shift_ms=ck.get("frame_shift_ms"),
                        teacher_stride=stride,
                        limits=limits_from_args(args))
    except (SpecError, ConfigError, FormatError, FileNotFoundError, StorageError) as e:
        parser.error(str(e))
    t0 = time.monotonic()
    try:
        totals = evaluate(args, trust, data, tasks, soft_run, pitch)
    except Exception as e:
        message = data_error(e)
        if message is None:
            raise
        print(f"[evaluate] error: {message}", file=sys.stderr, flush=True)
        return 1
    seconds = time.monotonic() - t0
    results = [model_result(args, c, i, ck, totals, soft_run, pitch, seconds) for i, c in enumerate(args.checkpoint)]
    result = results[0] if len(results) == 1 else {"input": args.input, "seconds": round(seconds, 2),
                                                   "models": results}
    if args.output:
        storage.atomic_write_bytes(args.output, (json.dumps(result, indent=1) + "\n").encode())
    for r in results:
        if len(results) > 1:
            print(f"[evaluate] {r['checkpoint']}")
        for k in ("accuracy", "agreement", "kl"):
            if r.get(k) is not None:
                print(f"[evaluate] {k:<10} {r[k]:.4f}")
        for k in ("rpa", "rca", "voicing_recall", "voicing_false_alarm"):
            if r.get("pitch", {}).get(k) is not None:
                print(f"[evaluate] {k:<10} {r['pitch'][k]:.4f}")
    print(json.dumps(result), flush=True)
    return 0


def model_result(args, checkpoint: str, i: int, ck: dict, totals: dict, soft_run, pitch: bool, seconds: float) -> dict:
    """The result object of model i from the summed statistics."""
    t = {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith(f"{i}.")}
    unit = "frames" if ck["level"] == "frame" else "samples"
    result = {"checkpoint": checkpoint, "input": args.input, "mode": "softtargets" if soft_run else "labeled",
              "level": ck["level"], unit: int(t["total"] or t["t_total"]), "seconds": round(seconds, 2)}
    if soft_run:
        n = t["t_total"]
        result["agreement"] = t["agree"] / n if n else None
        result["kl"] = t["kl_sum"] / n if n else None
        if t["total"]:
            result["accuracy"] = t["correct"] / t["total"]
    else:
        result["accuracy"] = t["correct"] / t["total"] if t["total"] else None
    if pitch:
        counts = pitch_math.PitchCounts(**{k: type(getattr(pitch_math.PitchCounts(), k))(t[k]) for k in PITCH_STATS})
        result["pitch"] = {k: (None if isinstance(v, float) and v != v else v) for k, v in counts.metrics().items()}
        result["pitch"]["voicing_threshold"] = args.voicing_threshold
    return result


def evaluate(args, trust: tuple, data: DataPlan, tasks: list[ShardTask], soft_run: SoftTargetRun | None,
             pitch: bool = False) -> dict:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    init_ray(args.address, args.dashboard)
    DataContext.get_current().enable_progress_bars = False
    gpu = use_gpu(args.device)
    rows = ShardRows(data, soft_run.uri if soft_run else None, soft_run.facts if soft_run else None,
                     {"key_column": args.key_column, "data_column": args.data_column},
                     soft_run.manifest.input_options if soft_run else None)
    ds = ray.data.from_items([t.to_row() for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(rows, batch_size=1, num_cpus=1, memory=DECODE_TASK_MEMORY)  # unfused
    ds = ds.map_batches(EvalPredictor, batch_size=args.batch_size, batch_format="pyarrow",
                        fn_constructor_kwargs={"checkpoints": list(args.checkpoint), "trust": trust, "data": data,
                                               "device": "cuda" if gpu else "cpu", "pitch": pitch,
                                               "voicing_threshold": args.voicing_threshold},
                        compute=ActorPoolStrategy(size=args.actors), num_gpus=1 if gpu else 0)
    names = [f"{i}.{k}" for i in range(len(args.checkpoint)) for k in STAT_NAMES + (PITCH_STATS if pitch else ())]
    totals = dict.fromkeys(names, 0.0)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in names:
            totals[k] += float(np.sum(batch[k]))
    return totals
