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
import time

import numpy as np
import torch

from pipeline import storage
from pipeline.cli import DECODE_TASK_MEMORY, init_ray
from pipeline.config import ConfigError, add_config_flag, parse_args
from pipeline.inputs import SHARD_EXTENSIONS, shard_name
from pipeline.models.base import output_lengths
from pipeline.models.spec import SpecError, parse_spec
from pipeline.shards import FormatError, SoftTargetRun
from pipeline.shards.manifest import MANIFEST_FILE
from pipeline.softtargets import id_dtype
from pipeline.student.data import collate
from pipeline.student.losses import kd_kl

STAT_NAMES = ("correct", "total", "agree", "kl_sum", "t_total")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
        description="Evaluate a checkpoint: accuracy on labeled shards, or agreement/KL against a soft-target run.")
    add_config_flag(p)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint directory (train_student.py's OUTPUT/final or a Ray checkpoint), local or s3://")
    p.add_argument("--input", required=True, nargs="+", metavar="URI",
                   help="labeled shards (.cls / .frames.npy members), or one soft-target run directory")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the result JSON here (local or s3://)")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    p.add_argument("--actors", type=int, default=1, help="model actors")
    p.add_argument("--label-frame-shift-ms", type=float, default=10.0, help="frame shift of .frames.npy labels")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: a GPU when the cluster has one")
    p.add_argument("--address", default=None, help="Ray cluster address; default: $RAY_ADDRESS, else embedded local Ray")
    return p


class EvalPredictor:
    """Ray Data actor: a batch of TRAIN_SCHEMA rows -> one row of summed statistics."""

    def __init__(self, checkpoint: str, cfg: dict, device: str):
        from pipeline.models.spec import build_model
        from pipeline.modalities import make_frontend, preprocessing_from_dict

        self.device = torch.device(device)
        self.model = build_model(parse_spec(checkpoint)).to(self.device).eval()
        self.frontend = make_frontend(preprocessing_from_dict(cfg["preprocessing"])).to(self.device)
        self.cfg = cfg

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        cfg = self.cfg
        b = collate(batch, modality=cfg["modality"], level=cfg["level"], k=cfg["k"], id_dtype=cfg["id_dtype"],
                    crop=cfg["preprocessing"].get("crop"))
        b = {k: v.to(self.device) for k, v in b.items()}
        x, feat_len = self.frontend(b["x"], b.get("lengths"))
        logits = (self.model(x, feat_len) if feat_len is not None else self.model(x)).float()
        stats = dict.fromkeys(STAT_NAMES, 0.0)
        pred = logits.argmax(-1)
        if cfg["level"] == "frame":
            S = logits.shape[1]
            s_len = output_lengths(self.model, feat_len, x.shape[1], S)
            F_ = min(S, b["flabels"].shape[1])
            lab = b["flabels"][:, :F_]
            valid = (lab >= 0) & (torch.arange(F_, device=self.device) < s_len.unsqueeze(1))
            stats["correct"] = float(((pred[:, :F_] == lab) & valid).sum())
            stats["total"] = float(valid.sum())
            T = min(S, b["t_ids"].shape[1])
            tv = (torch.arange(T, device=self.device) < torch.minimum(s_len, b["t_frames"]).unsqueeze(1))
            tv = tv & b["has_t"].unsqueeze(1)
            if T:
                stats["agree"] = float(((pred[:, :T] == b["t_ids"][:, :T, 0]) & tv).sum())
                stats["kl_sum"] = float((kd_kl(logits[:, :T], b["t_ids"][:, :T], b["t_lp"][:, :T]) * tv).sum())
            stats["t_total"] = float(tv.sum())
        else:
            valid = b["label"] >= 0
            stats["correct"] = float(((pred == b["label"]) & valid).sum())
            stats["total"] = float(valid.sum())
            tv = b["has_t"]
            stats["agree"] = float(((pred == b["t_ids"][:, 0]) & tv).sum())
            stats["kl_sum"] = float((kd_kl(logits, b["t_ids"], b["t_lp"]) * tv).sum())
            stats["t_total"] = float(tv.sum())
        return {k: np.array([v]) for k, v in stats.items()}


def run(argv=None) -> int:
    """Entry point of jobs/evaluate.py; returns the exit code."""
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        spec = parse_spec(args.checkpoint)
        if spec.kind != "checkpoint":
            raise ConfigError(f"--checkpoint {args.checkpoint}: not a checkpoint directory (no config.json)")
        ck = spec.config
        soft_run = None
        if len(args.input) == 1 and storage.exists(storage.join(args.input[0], MANIFEST_FILE)):
            soft_run = SoftTargetRun(args.input[0])
            m = soft_run.manifest
            if m.num_classes != ck["num_classes"] or m.level != ck["level"]:
                raise ConfigError(f"--input {args.input[0]}: {m.level}-level run with {m.num_classes} classes does not "
                                  f"match the checkpoint ({ck['level']}, {ck['num_classes']} classes)")
            tasks = [{"kind": "pseudo", "name": n, "input": m.shards[n].input} for n in soft_run.shard_names]
        else:
            tasks = [{"kind": "labeled", "name": shard_name(r.uri), "input": r.uri}
                     for r in storage.expand_shards(args.input, SHARD_EXTENSIONS)]
    except (SpecError, ConfigError, FormatError, FileNotFoundError) as e:
        parser.error(str(e))
    cfg = {"modality": ck["modality"], "level": ck["level"], "preprocessing": ck["preprocessing"],
           "k": soft_run.manifest.k if soft_run else 1,
           "id_dtype": soft_run.manifest.id_dtype if soft_run else str(id_dtype(ck["num_classes"]))}
    t0 = time.monotonic()
    totals = evaluate(args, cfg, tasks, soft_run.uri if soft_run else None, ck.get("frame_shift_ms"))
    unit = "frames" if ck["level"] == "frame" else "samples"
    result = {"checkpoint": args.checkpoint, "input": args.input, "mode": "softtargets" if soft_run else "labeled",
              "level": ck["level"], unit: int(totals["total"] or totals["t_total"]),
              "seconds": round(time.monotonic() - t0, 2)}
    if soft_run:
        n = totals["t_total"]
        result["agreement"] = totals["agree"] / n if n else None
        result["kl"] = totals["kl_sum"] / n if n else None
        if totals["total"]:
            result["accuracy"] = totals["correct"] / totals["total"]
    else:
        result["accuracy"] = totals["correct"] / totals["total"] if totals["total"] else None
    text = json.dumps(result)
    if args.output:
        storage.atomic_write_bytes(args.output, (json.dumps(result, indent=1) + "\n").encode())
    for k in ("accuracy", "agreement", "kl"):
        if result.get(k) is not None:
            print(f"[evaluate] {k:<10} {result[k]:.4f}")
    print(text, flush=True)
    return 0


def evaluate(args, cfg: dict, tasks: list[dict], run_uri: str | None, frame_shift_ms: float | None) -> dict:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.student.data import ShardRows

    init_ray(args.address)
    DataContext.get_current().enable_progress_bars = False
    use_gpu = args.device == "cuda" or (args.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    rows = ShardRows(cfg["preprocessing"], run_uri, cfg["level"], args.label_frame_shift_ms, frame_shift_ms)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(rows, batch_size=1, num_cpus=1, memory=DECODE_TASK_MEMORY)  # unfused
    ds = ds.map_batches(EvalPredictor, batch_size=args.batch_size,
                        fn_constructor_kwargs={"checkpoint": args.checkpoint, "cfg": cfg,
                                               "device": "cuda" if use_gpu else "cpu"},
                        compute=ActorPoolStrategy(size=args.actors), num_gpus=1 if use_gpu else 0)
    totals = dict.fromkeys(STAT_NAMES, 0.0)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in STAT_NAMES:
            totals[k] += float(np.sum(batch[k]))
    return totals
