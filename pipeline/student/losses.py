"""Distillation losses against stored top-k soft targets, and hard-label cross-entropy.

Shapes: leading dims ``L`` are (B,) at utterance level and (B, T) at frame level.
Every loss returns the per-position loss (*L,) unreduced, so the caller can mask frames,
drop low-confidence targets and weight labeled against pseudo-labeled rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.softtargets import dense_targets, sparse_targets, topk_logits

LOSSES = ("kl", "mse", "hard")


def kd_kl(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, temperature: float = 1.0,
          k: int | None = None, tail: str = "renormalize") -> torch.Tensor:
    """T^2 * KL(p_T || q_T) per position (Hinton et al. 2015).

    student_logits (*L, C); ids, logprobs (*L, k) stored top-k at T=1.
    p_T is the teacher's distribution at temperature T rebuilt from the top-k' (see
    pipeline.softtargets); q_T = softmax(student_logits / T). The T^2 factor keeps gradient
    magnitudes comparable across temperatures. Returns (*L,).
    """
    T = float(temperature)
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)  # (*L, C)
    if tail == "renormalize":
        p = sparse_targets(logprobs, T, k)  # (*L, k')
        kk = p.shape[-1]
        log_q_k = log_q.gather(-1, ids[..., :kk].long())
        log_p = torch.log(p.clamp_min(1e-30))
        kl = (p * (log_p - log_q_k)).sum(-1)
    else:
        p = dense_targets(ids, logprobs, student_logits.shape[-1], T, k, tail)  # (*L, C)
        kl = (p * (torch.log(p.clamp_min(1e-30)) - log_q)).sum(-1)
    return kl * (T * T)


def kd_mse(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, logsumexp: torch.Tensor,
           k: int | None = None) -> torch.Tensor:
    """Mean squared error between student and teacher logits on the teacher's top-k' classes
    (Tang et al. 2019, distilling BERT into a BiLSTM). Teacher logits = logprob + logsumexp.

    student_logits (*L, C); ids, logprobs (*L, k); logsumexp (*L,). Returns (*L,).
    """
    t = topk_logits(logprobs, logsumexp, k)  # (*L, k')
    s = student_logits.float().gather(-1, ids[..., : t.shape[-1]].long())
    return ((s - t) ** 2).mean(-1)


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor, blur: float = 0.0) -> torch.Tensor:
    """Cross-entropy per position: student_logits (*L, C); labels (*L,) with -1 = no label (loss
    0 there). Returns (*L,).

    blur > 0: for ordered classes (pitch bins), the target is a Gaussian of std ``blur``
    classes centred on the label, normalised over the C classes, instead of a one-hot. CREPE
    blurs its targets so (σ = 25 cents = 1.25 bins; it trains 360 sigmoids against the
    unnormalised Gaussian): a one-hot on a 20-cent grid says a bin 20 cents off is as wrong as
    one an octave off, which the weighted-average decode around the peak does not assume.
    """
    C = student_logits.shape[-1]
    logits = student_logits.float().reshape(-1, C)  # (N, C)
    y = labels.reshape(-1).long().clamp_min(0)  # (N,)
    if blur > 0:
        if y.numel() and int(y.max()) >= C:  # F.cross_entropy rejects these; a Gaussian would only clip them
            raise ValueError(f"label {int(y.max())} out of range for {C} classes")
        c = torch.arange(C, device=logits.device, dtype=torch.float32)
        target = torch.softmax(-0.5 * ((c[None, :] - y[:, None].float()) / blur) ** 2, dim=-1)  # (N, C), rows sum to 1
        flat = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
    else:
        flat = F.cross_entropy(logits, y, reduction="none")
    return flat.reshape(labels.shape) * (labels >= 0)


def distill_loss(kind: str, student_logits, ids, logprobs, logsumexp, temperature=1.0, k=None,
                 tail="renormalize", blur: float = 0.0) -> torch.Tensor:
    """Dispatch: "kl" (default), "mse" (top-k logits) or "hard" (CE on the teacher's top-1,
    blurred like the labels by ``blur``, see hard_ce). (*L,)"""
    if kind == "kl":
        return kd_kl(student_logits, ids, logprobs, temperature, k, tail)
    if kind == "mse":
        return kd_mse(student_logits, ids, logprobs, logsumexp, k)
    if kind == "hard":
        return hard_ce(student_logits, ids[..., 0], blur)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def combine(hard: torch.Tensor, hard_w: torch.Tensor, soft: torch.Tensor, soft_w: torch.Tensor,
            alpha: float) -> torch.Tensor:
    """alpha-weighted mean of the hard-label and distillation terms over the positions that have them.

    hard, soft: (*L,) per-position losses; hard_w, soft_w: (*L,) 0/1 weights (label present,
    frame valid, teacher confident). loss = (alpha * sum(hard * hard_w) + (1 - alpha) *
    sum(soft * soft_w)) / (alpha * sum(hard_w) + (1 - alpha) * sum(soft_w)), so a batch of only
    one kind is that kind's plain mean. Returns a scalar (0 with no weighted position).
    """
    num = alpha * (hard * hard_w).sum() + (1 - alpha) * (soft * soft_w).sum()
    den = alpha * hard_w.sum() + (1 - alpha) * soft_w.sum()
    return num / den.clamp_min(1e-8)
