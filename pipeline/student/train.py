"""The per-worker training loop (Ray Train TorchTrainer, data-parallel DDP).

Each worker streams its share of the training dataset (``get_dataset_shard("train")``),
computes the features on its device, and optimises alpha * CE(labels) + (1 - alpha) * KD.
Rank 0 writes a checkpoint (model, optimizer, scheduler, config, cache fingerprint, metrics
history) at the end of every epoch; a rerun or a restarted worker group resumes from it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.models.base import output_lengths
from pipeline.models.spec import CHECKPOINT_WEIGHTS, build_model, parse_spec, save_checkpoint
from pipeline.modalities import make_frontend, preprocessing_from_dict
from pipeline.softtargets import topk_from_logits
from pipeline.student.data import Collate
from pipeline.student.losses import combine, distill_loss, hard_ce

# Ray Train tees print() on workers (it would show twice); its logging goes out once.
log = logging.getLogger("kdpipe.train")
TRAIN_STATE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to min_ratio at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                               nesterov=True)
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def _all_reduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class StepLoss:
    """Loss of one batch: the student's logits against labels and teacher targets.

    Frame level aligns the student's S frames, the teacher's T frames and the labels' F
    frames (all at the same frame rate) on their common prefix, masked by each row's lengths.
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.level = cfg["level"]

    def __call__(self, model, logits: torch.Tensor, feat_len, b: dict) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        thr = cfg["confidence_threshold"]
        if self.level == "frame":
            S = logits.shape[1]
            s_len = output_lengths(model, feat_len, b["feat_frames"], S)
            T = min(S, b["t_ids"].shape[1])
            t = torch.arange(T, device=logits.device)
            soft_w = (t < torch.minimum(s_len, b["t_frames"]).unsqueeze(1)) & b["has_t"].unsqueeze(1)
            soft_w = soft_w & (b["t_conf"][:, :T] >= thr)
            soft = distill_loss(cfg["loss"], logits[:, :T], b["t_ids"][:, :T], b["t_lp"][:, :T], b["t_lse"][:, :T],
                                cfg["temperature"], cfg["k"], cfg["tail"]) if T else logits.new_zeros(logits.shape[0], 0)
            F_ = min(S, b["flabels"].shape[1])
            f = torch.arange(F_, device=logits.device)
            labels = b["flabels"][:, :F_]
            hard_w = (labels >= 0) & (f < s_len.unsqueeze(1))
            hard = hard_ce(logits[:, :F_], labels) if F_ else logits.new_zeros(logits.shape[0], 0)
        else:
            soft_w = b["has_t"] & (b["t_conf"] >= thr)
            soft = distill_loss(cfg["loss"], logits, b["t_ids"], b["t_lp"], b["t_lse"], cfg["temperature"], cfg["k"],
                                cfg["tail"])
            hard_w = b["label"] >= 0
            hard = hard_ce(logits, b["label"])
        hard_w, soft_w = hard_w.float(), soft_w.float()
        soft = torch.where(soft_w > 0, soft, torch.zeros_like(soft))  # masked positions may hold padding garbage
        loss = combine(hard.flatten(), hard_w.flatten(), soft.flatten(), soft_w.flatten(), cfg["alpha"])
        with torch.no_grad():
            stats = {"hard_sum": float((hard * hard_w).sum()), "hard_n": float(hard_w.sum()),
                     "soft_sum": float((soft * soft_w).sum()), "soft_n": float(soft_w.sum())}
        return loss, stats


def _to_device(b: dict, device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in b.items()}


def evaluate_shard(model, frontend, it, cfg: dict, device, collate_fn) -> tuple[float, float]:
    """(correct, total) over this worker's share of the eval dataset (frames at frame level)."""
    correct = total = 0.0
    model.eval()
    with torch.inference_mode():
        for b in it.iter_torch_batches(batch_size=cfg["batch_size"], collate_fn=collate_fn):
            b = _to_device(b, device)
            x, feat_len = frontend(b["x"], b.get("lengths"))
            logits = model(x, feat_len) if feat_len is not None else model(x)
            if cfg["level"] == "frame":
                S = logits.shape[1]
                s_len = output_lengths(model, feat_len, x.shape[1], S)
                F_ = min(S, b["flabels"].shape[1])
                labels = b["flabels"][:, :F_]
                valid = (labels >= 0) & (torch.arange(F_, device=device) < s_len.unsqueeze(1))
                correct += float(((logits[:, :F_].argmax(-1) == labels) & valid).sum())
                total += float(valid.sum())
            else:
                valid = b["label"] >= 0
                correct += float(((logits.argmax(-1) == b["label"]) & valid).sum())
                total += float(valid.sum())
    model.train()
    return correct, total


def train_loop(cfg: dict) -> None:
    """Ray Train entry point; ``cfg`` is the JSON-able config built by the job."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"] + rank)

    student = parse_spec(cfg["student"])
    model = build_model(student)  # seeded init (or the student checkpoint's weights)
    frontend = make_frontend(preprocessing_from_dict(cfg["preprocessing"])).to(device)
    model = model.to(device)
    opt = make_optimizer(model.parameters(), cfg)
    total_steps = cfg["total_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, cfg["warmup_steps"], total_steps, cfg["min_lr_ratio"]))
    step, epoch, history = 0, 0, []

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(os.path.join(d, CHECKPOINT_WEIGHTS)))
            state = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, history = state["step"], state["epoch"], json.loads(state["history"])
        if rank == 0:
            log.info(f"[train] resumed from {ckpt.path} at epoch {epoch}, step {step}")

    model = ray.train.torch.prepare_model(model, move_to_device=False)
    online = None
    if cfg.get("online_teacher"):
        from pipeline.teacher.predictor import Teacher

        online = Teacher([cfg["online_teacher"]], cfg["preprocessing"], cfg["precision"], str(device))
    step_loss = StepLoss(cfg)
    collate_fn = Collate(modality=cfg["modality"], level=cfg["level"], k=cfg["stored_k"],
                         id_dtype=cfg["id_dtype"], crop=cfg.get("crop"))
    train_it = ray.train.get_dataset_shard("train")
    eval_it = ray.train.get_dataset_shard("eval") if cfg.get("has_eval") else None
    use_amp = device.type == "cuda" and cfg["precision"] != "fp32"
    amp_dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    max_steps = cfg.get("max_steps")

    model.train()
    while epoch < cfg["epochs"] and not (max_steps and step >= max_steps):
        t0 = time.monotonic()
        sums = [0.0] * 6  # loss*n, n_batches, hard_sum, hard_n, soft_sum, soft_n
        samples = 0
        # prefetch 4: a few batches in hand smooth over the gaps between blocks of the input
        batches = iter(train_it.iter_torch_batches(batch_size=cfg["batch_size"], collate_fn=collate_fn,
                                                   local_shuffle_buffer_size=cfg["shuffle_buffer"] or None,
                                                   local_shuffle_seed=cfg["seed"] + 1000 * epoch + rank,
                                                   prefetch_batches=4))
        data_wait = 0.0  # seconds this worker waited for its next batch: high means input-bound
        while True:
            t_wait = time.monotonic()
            b = next(batches, None)
            data_wait += time.monotonic() - t_wait
            if b is None:
                break
            b = _to_device(b, device)
            amp = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
            with amp:
                x, feat_len = frontend(b["x"], b.get("lengths"))
                if online is not None:  # online distillation: the teacher runs in the loop
                    outs, t_frames = online.forward(b["x"], b.get("lengths"))
                    tk = topk_from_logits(outs[0], cfg["stored_k"])
                    b.update(t_ids=tk.ids, t_lp=tk.logprobs, t_lse=tk.logsumexp, t_conf=tk.confidence,
                             has_t=torch.ones_like(b["has_t"]))
                    if t_frames is not None:
                        b["t_frames"] = t_frames
                logits = model(x, feat_len) if feat_len is not None else model(x)
                b["feat_frames"] = x.shape[1]
                loss, st = step_loss(model.module if hasattr(model, "module") else model, logits, feat_len, b)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg["grad_clip"] > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            samples += int(b["x"].shape[0])
            sums[0] += float(loss.detach())
            sums[1] += 1
            sums[2] += st["hard_sum"]
            sums[3] += st["hard_n"]
            sums[4] += st["soft_sum"]
            sums[5] += st["soft_n"]
            if max_steps and step >= max_steps:
                break
        epoch += 1
        seconds = time.monotonic() - t0
        red = _all_reduce(sums + [samples, data_wait], device)
        metrics = {
            "epoch": epoch, "step": step, "loss": red[0] / max(red[1], 1),
            "ce": red[2] / red[3] if red[3] else None, "kd": red[4] / red[5] if red[5] else None,
            "lr": sched.get_last_lr()[0], "samples": int(red[6]), "seconds": round(seconds, 3),
            "samples_per_s": round(red[6] / seconds, 2) if seconds > 0 else None,
            # mean over workers of the share of the epoch spent waiting for input
            "data_wait_share": round(red[7] / world / seconds, 3) if seconds > 0 else None,
        }
        if eval_it is not None:
            mod = model.module if hasattr(model, "module") else model
            c, n = _all_reduce(list(evaluate_shard(mod, frontend, eval_it, cfg, device, collate_fn)), device)
            metrics["eval_accuracy"] = c / n if n else None
        history.append(metrics)
        last = epoch >= cfg["epochs"] or bool(max_steps and step >= max_steps)
        save = last or epoch % cfg["checkpoint_every"] == 0
        _checkpoint_and_report(cfg, model, opt, sched, step, epoch, history, metrics, rank, Checkpoint, save)


def _checkpoint_and_report(cfg, model, opt, sched, step, epoch, history, metrics, rank, Checkpoint,
                           save: bool) -> None:
    """Report the epoch's metrics; with ``save``, rank 0 also writes and reports a checkpoint
    and rewrites OUTPUT/metrics.jsonl (the history a resumed run continues from)."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0 and save:
            mod = model.module if hasattr(model, "module") else model
            save_checkpoint(d, mod, cfg["student_factory"], cfg["student_kwargs"], {
                **cfg["checkpoint_config"], "epoch": epoch, "step": step, "metrics": metrics,
            })
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "epoch": epoch,
                        "history": json.dumps(history)}, os.path.join(d, TRAIN_STATE))
            checkpoint = Checkpoint.from_directory(d)
            lines = "".join(json.dumps(h) + "\n" for h in history)
            storage.atomic_write_bytes(storage.join(cfg["output"], METRICS_FILE), lines.encode())
        if rank == 0:
            ce = f"{metrics['ce']:.4f}" if metrics["ce"] is not None else "-"
            kd = f"{metrics['kd']:.4f}" if metrics["kd"] is not None else "-"
            acc = f" eval_acc {metrics['eval_accuracy']:.4f}" if metrics.get("eval_accuracy") is not None else ""
            wait = f"{metrics['data_wait_share']:.0%}" if metrics.get("data_wait_share") is not None else "-"
            log.info(f"[train] epoch {epoch}/{cfg['epochs']} step {step} loss {metrics['loss']:.4f} ce {ce} kd {kd} "
                     f"lr {metrics['lr']:.2e} {metrics['samples_per_s']} samples/s, input wait "
                     f"{wait}{acc}")
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)


def read_metrics(output: str) -> list[dict]:
    """The metrics history (one dict per epoch) written to OUTPUT/metrics.jsonl."""
    uri = storage.join(output, METRICS_FILE)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in io.StringIO(storage.read_bytes(uri).decode()) if line.strip()]
