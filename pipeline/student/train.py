"""The per-worker training loop (Ray Train TorchTrainer, data-parallel DDP).

Each worker streams its share of the training dataset (``get_dataset_shard("train")``),
computes the features on its device, and optimises alpha * CE(labels) + (1 - alpha) * KD.
Rank 0 writes a checkpoint (model, optimizer, scheduler, config, cache fingerprint, metrics
history) at the end of every epoch; a rerun or a restarted worker group resumes from it.
"""

from __future__ import annotations

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
from pipeline.models.runner import ModelRunner, unwrap
from pipeline.models.spec import CHECKPOINT_WEIGHTS, build_model, parse_spec, save_checkpoint
from pipeline.softtargets import topk_from_logits
from pipeline.student.collate import Collate
from pipeline.student.errors import DataError, data_error
from pipeline.student.losses import combine, distill_loss, hard_ce
from pipeline.student.metrics import accuracy_counts, label_positions, target_positions
from pipeline.student.plan import LossPlan, OptimPlan, StudentPlan
from pipeline.student.shuffle import Background, in_background, shuffled_batches
from pipeline.student.stats import EpochStats, StepStats

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


def make_optimizer(params, optim: OptimPlan) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def _all_reduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class StepLoss:
    """Loss of one batch: the student's logits against labels and teacher targets.

    Frame level aligns the student's S frames, the teacher's T frames and the labels' F
    frames (all at the same frame rate) on their common prefix, masked by each row's lengths
    (pipeline.student.metrics).
    """

    def __init__(self, loss: LossPlan, teacher_stride: int = 1):
        """teacher_stride: student frames per teacher frame (frame level; 1: the same rate)."""
        self.plan = loss
        self.stride = teacher_stride

    def __call__(self, logits: torch.Tensor, s_len: torch.Tensor | None, b: dict) -> tuple[torch.Tensor, StepStats]:
        """logits (B, C) or (B, S, C); s_len (B,) valid student frames (frame level) -> (loss (0-d),
        its StepStats, on the device: nothing here waits for the GPU)."""
        p = self.plan
        at_t, T, soft_w = target_positions(logits, s_len, b, self.stride)
        if T is None:
            soft_w = soft_w & (b["t_conf"] >= p.confidence_threshold)
            soft = distill_loss(p.loss, at_t, b["t_ids"], b["t_lp"], b["t_lse"], p.temperature, p.k, p.tail,
                                p.label_blur)
        else:
            soft_w = soft_w & (b["t_conf"][:, :T] >= p.confidence_threshold)
            soft = distill_loss(p.loss, at_t[:, :T], b["t_ids"][:, :T], b["t_lp"][:, :T], b["t_lse"][:, :T],
                                p.temperature, p.k, p.tail, p.label_blur) if T else logits.new_zeros(logits.shape[0], 0)
        lab_logits, labels, hard_w = label_positions(logits, s_len, b["label"] if logits.dim() == 2 else b["flabels"])
        hard = hard_ce(lab_logits, labels, p.label_blur) if labels.numel() else logits.new_zeros(labels.shape)
        hard_w, soft_w = hard_w.float(), soft_w.float()
        soft = torch.where(soft_w > 0, soft, torch.zeros_like(soft))  # masked positions may hold padding garbage
        loss = combine(hard.flatten(), hard_w.flatten(), soft.flatten(), soft_w.flatten(), p.alpha)
        with torch.no_grad():
            stats = StepStats((hard * hard_w).sum(), hard_w.sum(), (soft * soft_w).sum(), soft_w.sum())
        return loss, stats


def train_step(runner: ModelRunner, step_loss: StepLoss, opt, sched, scaler, b: dict, grad_clip: float
               ) -> tuple[torch.Tensor, StepStats]:
    """One optimizer step on batch ``b`` (tensors on the runner's device): forward under the
    precision policy, loss, backward (scaled for fp16), gradient clipping, step, schedule."""
    out = runner.forward(b["x"], b.get("lengths"))
    loss, stats = step_loss(out.logits[0], out.frames, b)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for m in runner.models for p in m.parameters()], grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    return loss, stats


def _to_device(b: dict, device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in b.items()}


def evaluate_shard(runner: ModelRunner, it, plan: StudentPlan, device, collate_fn) -> tuple[float, float]:
    """(correct, total) over this worker's share of the eval dataset (frames at frame level)."""
    correct = total = 0.0
    for m in runner.models:
        m.eval()
    for b in it.iter_torch_batches(batch_size=plan.optim.batch_size, collate_fn=collate_fn):
        b = _to_device(b, device)
        out = runner.predict(b["x"], b.get("lengths"))
        labels = b["flabels"] if plan.data.level == "frame" else b["label"]
        c, n = accuracy_counts(out.logits[0], out.frames, labels)
        correct, total = correct + c, total + n
    for m in runner.models:
        m.train()
    return correct, total


def initial_model(plan: StudentPlan) -> torch.nn.Module:
    """The student before training: drawn under --seed (the same on every rank; DDP also
    broadcasts rank 0's), or the weights of the student checkpoint it starts from."""
    return build_model(parse_spec(plan.student, plan.trust), seed=plan.optim.seed)


def train_loop(config: dict) -> None:
    """Ray Train entry point; ``config["plan"]`` is the job's StudentPlan, ``config["started"]``
    the wall-clock time its driver process started (or None)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    plan: StudentPlan = config["plan"]
    optim = plan.optim
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(optim.seed + rank)  # dropout and augmentation differ per rank

    resumed = _checkpoint_state(rank, plan.output)  # before the input starts: its epoch seeds the shuffle
    step, epoch = (resumed[1]["step"], resumed[1]["epoch"]) if resumed else (0, 0)
    history = json.loads(resumed[1]["history"]) if resumed else []
    collate_fn = Collate(plan.data, pin=device.type == "cuda")
    train_it = ray.train.get_dataset_shard("train")
    eval_it = ray.train.get_dataset_shard("eval") if plan.has_eval else None
    max_steps = optim.max_steps

    def running() -> bool:
        return epoch < optim.epochs and not (max_steps and step >= max_steps)

    # The first epoch's input starts before the model is built and DDP is set up: a worker's
    # Ray Data pipeline takes seconds to start (its coordinator actor, the decode workers'
    # processes), and both go on meanwhile. That epoch's seconds include the model's setup.
    upcoming = _epoch_input(train_it, collate_fn, optim, epoch, rank, device) if running() else None

    model = initial_model(plan).to(device)
    opt = make_optimizer(model.parameters(), optim)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, optim.warmup_steps, optim.total_steps, optim.min_lr_ratio))
    if resumed:
        _restore(resumed, model, opt, sched)
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    runner = ModelRunner([model], plan.data.preprocessing, device, optim.precision)
    online = None
    if plan.online_teacher:
        online = ModelRunner.from_specs([plan.online_teacher], plan.trust, plan.data.preprocessing, device,
                                        optim.precision)
    step_loss = StepLoss(plan.loss, plan.data.teacher_stride)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and optim.precision == "fp16")

    model.train()
    started, first_step = config.get("started"), None
    while running():
        t0, stats, batches = upcoming or _epoch_input(train_it, collate_fn, optim, epoch, rank, device)
        upcoming = None
        while True:
            b = stats.call(_next_batch, "input_wait")(batches)
            if b is None:
                break
            b = stats.call(_to_device, "h2d")(b, device)
            t_step = time.monotonic()  # the step (with online distillation, the teacher's forward too)
            if online is not None:  # online distillation: the teacher runs in the loop
                _online_targets(b, online, plan.data.stored_k)
            loss, st = train_step(runner, step_loss, opt, sched, scaler, b, optim.grad_clip)
            step += 1
            stats.add(loss, st, int(b["x"].shape[0]))
            stats.seconds["step"] += time.monotonic() - t_step
            if first_step is None and started is not None:  # queued: the device runs it right after
                first_step = time.time() - started
            if max_steps and step >= max_steps:
                break
        batches.close()  # stops its thread when --steps ends the epoch early
        epoch += 1
        metrics = _epoch_metrics(epoch, step, stats.reduce(), sched.get_last_lr()[0], time.monotonic() - t0, world)
        if first_step is not None:  # this process's first epoch: from the driver's start to its first step
            metrics["startup_s"] = round(first_step, 2)
            started = first_step = None
        if eval_it is not None:
            c, n = _all_reduce(list(evaluate_shard(runner, eval_it, plan, device, collate_fn)), device)
            metrics["eval_accuracy"] = c / n if n else None
        history.append(metrics)
        last = epoch >= optim.epochs or bool(max_steps and step >= max_steps)
        save = last or epoch % optim.checkpoint_every == 0
        _checkpoint_and_report(plan, model, opt, sched, step, epoch, history, metrics, rank, Checkpoint, save)


def _epoch_input(train_it, collate_fn: Collate, optim: OptimPlan, epoch: int, rank: int, device
                 ) -> tuple[float, EpochStats, Background]:
    """(start time, stats, batches) of an epoch whose input is already on its way. Whole blocks
    in (4 prefetched: they smooth over the gaps between blocks of the input), shuffled and
    collated up to two batches ahead in a thread (pipeline.student.shuffle says why not Ray's
    local shuffle buffer)."""
    t0, stats = time.monotonic(), EpochStats(device)
    blocks = stats.timed(train_it.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4),
                         "block_wait")
    collate = stats.call(collate_fn, "collate")
    return t0, stats, in_background(collate(t) for t in stats.timed(shuffled_batches(
        blocks, optim.batch_size, optim.shuffle_buffer, seed=optim.seed + 1000 * epoch + rank), "shuffle"))


def _checkpoint_state(rank: int, output: str) -> tuple[dict, dict] | None:
    """(model weights, train state: optimizer, scheduler, step, epoch, history) of the latest
    checkpoint Ray Train hands this worker, on the CPU; None for a fresh run. Rank 0 rewrites
    OUTPUT/metrics.jsonl from its history: committed by definition, and a kill between the
    commit and the file's write would otherwise leave the file behind (for good, if it was the
    last epoch's)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        from safetensors.torch import load_file

        weights = load_file(os.path.join(d, CHECKPOINT_WEIGHTS))
        state = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=True)
    if rank == 0:
        log.info(f"[train] resumed from {ckpt.path} at epoch {state['epoch']}, step {state['step']}")
        write_metrics(output, json.loads(state["history"]))
    return weights, state


def _restore(resumed: tuple[dict, dict], model, opt, sched) -> None:
    """Load ``_checkpoint_state``'s weights and optimizer / schedule into the fresh objects."""
    weights, state = resumed
    model.load_state_dict(weights)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])


def _next_batch(batches) -> dict | None:
    """The input thread's next batch (None at the epoch's end); a data error as its one line
    (DataError), not Ray Data's whole stack."""
    try:
        return next(batches, None)
    except Exception as e:
        message = data_error(e)
        if message is None:
            raise
        raise DataError(message) from None


def _online_targets(b: dict, online: ModelRunner, k: int) -> None:
    """Online distillation: the teacher's top-k of batch ``b`` (on the device) into its target columns."""
    t_out = online.predict(b["x"], b.get("lengths"))
    tk = topk_from_logits(t_out.logits[0], k)
    b.update(t_ids=tk.ids, t_lp=tk.logprobs, t_lse=tk.logsumexp, t_conf=tk.confidence,
             has_t=torch.ones_like(b["has_t"]))
    if t_out.frames is not None:
        b["t_frames"] = t_out.frames


def _epoch_metrics(epoch: int, step: int, red: dict, lr: float, seconds: float, world: int) -> dict:
    """An epoch's metrics.jsonl record from its EpochStats totals (summed over ``world`` workers)."""
    return {
        "epoch": epoch, "step": step, "loss": red["loss"], "ce": red["ce"], "kd": red["kd"],
        "lr": lr, "samples": red["samples"], "seconds": round(seconds, 3),
        "samples_per_s": round(red["samples"] / seconds, 2) if seconds > 0 else None,
        # mean over workers of the share of the epoch spent waiting for input
        "data_wait_share": round(red["data_wait"] / world / seconds, 3) if seconds > 0 else None,
        # where the epoch went, mean seconds per worker (stats.PHASES)
        "phases": {p: round(s / world, 3) for p, s in red["phases"].items()},
    }


def _checkpoint_and_report(plan: StudentPlan, model, opt, sched, step, epoch, history, metrics, rank, Checkpoint,
                           save: bool) -> None:
    """Report the epoch's metrics; with ``save``, rank 0 also writes and reports a checkpoint
    and rewrites OUTPUT/metrics.jsonl (the history a resumed run continues from)."""
    import ray.train

    lines = None
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0 and save:
            save_checkpoint(d, unwrap(model), plan.factory, plan.kwargs, {
                **plan.checkpoint_config(), "epoch": epoch, "step": step, "metrics": metrics,
            })
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "epoch": epoch,
                        "history": json.dumps(history)}, os.path.join(d, TRAIN_STATE))
            checkpoint = Checkpoint.from_directory(d)
            lines = history
        if rank == 0:
            ce = f"{metrics['ce']:.4f}" if metrics["ce"] is not None else "-"
            kd = f"{metrics['kd']:.4f}" if metrics["kd"] is not None else "-"
            acc = f" eval_acc {metrics['eval_accuracy']:.4f}" if metrics.get("eval_accuracy") is not None else ""
            wait = f"{metrics['data_wait_share']:.0%}" if metrics.get("data_wait_share") is not None else "-"
            log.info(f"[train] epoch {epoch}/{plan.optim.epochs} step {step} loss {metrics['loss']:.4f} ce {ce} "
                     f"kd {kd} lr {metrics['lr']:.2e} {metrics['samples_per_s']} samples/s, input wait {wait}{acc}"
                     + (f"; first step {metrics['startup_s']} s after the job started" if "startup_s" in metrics
                        else ""))
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)
    if lines is not None:
        # metrics.jsonl never runs ahead of the checkpoint a rerun resumes from: report() has
        # uploaded it, but a kill before the controller commits it replays the epoch. Written
        # once the controller has committed it (and saved its state to the output); not if the
        # report was rolled back (a worker-group reset) and this epoch's checkpoint is not there.
        committed = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if any((c.metrics or {}).get("epoch") == epoch for c in committed):
            write_metrics(plan.output, lines)


def write_metrics(output: str, history: list[dict]) -> None:
    """OUTPUT/metrics.jsonl: one JSON line per epoch of ``history`` (replaces the file)."""
    storage.atomic_write_bytes(storage.join(output, METRICS_FILE),
                               "".join(json.dumps(h) + "\n" for h in history).encode())


def read_metrics(output: str) -> list[dict]:
    """The metrics history (one dict per epoch) written to OUTPUT/metrics.jsonl."""
    uri = storage.join(output, METRICS_FILE)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in io.StringIO(storage.read_bytes(uri).decode()) if line.strip()]
