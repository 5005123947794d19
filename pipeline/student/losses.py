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


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position; labels (*L,) with -1 = no label (loss 0 there). Returns (*L,)."""
    flat = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]),
                           labels.reshape(-1).long().clamp_min(0), reduction="none")
    return flat.reshape(labels.shape) * (labels >= 0)


def distill_loss(kind: str, student_logits, ids, logprobs, logsumexp, temperature=1.0, k=None,
                 tail="renormalize") -> torch.Tensor:
    """Dispatch: "kl" (default), "mse" (top-k logits) or "hard" (CE on the teacher's top-1). (*L,)"""
    if kind == "kl":
        return kd_kl(student_logits, ids, logprobs, temperature, k, tail)
    if kind == "mse":
        return kd_mse(student_logits, ids, logprobs, logsumexp, k)
    if kind == "hard":
        return hard_ce(student_logits, ids[..., 0])
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
