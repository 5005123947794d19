"""The soft-target math, in one place.

Forward (teacher side): logits (B, C) or (B, T, C) -> compact top-k soft targets.
Backward (student side): stored top-k log-probabilities at T=1 -> the target distribution at
any training temperature T and any k' <= k.

Why log-probabilities at T=1 plus ``logsumexp``: for every stored class i,
``logit_i = logprob_i + logsumexp`` exactly (to storage precision), and because
softmax(z / T)_i is proportional to exp(logprob_i / T) the temperature can be chosen later
by the student without the teacher.

Tail mass (the probability outside the stored top-k', 1 - sum(exp(logprob[:k']))):

- ``tail="renormalize"`` (default): the tail is dropped and the k' kept probabilities are
  renormalised, p_T(i) = exp(lp_i / T) / sum_{j<k'} exp(lp_j / T). Sparse, cheap, and what the
  Alexa recipe does.
- ``tail="spread"``: the tail mass is spread evenly over the C - k' classes that were not
  kept (each gets log(tail / (C - k')) at T=1), then the temperature is applied over all C
  classes. Dense (..., C).

At k' = C both are the exact full softmax at temperature T (the tail is empty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

TAIL_MODES = ("renormalize", "spread")


@dataclass
class TopK:
    """Top-k soft targets for a batch; leading dims ``L`` are (B,) or (B, T).

    ids:        (*L, k) int64, classes sorted by decreasing probability
    logprobs:   (*L, k) float32, log-probabilities at T=1 of those classes
    logsumexp:  (*L,) float32, logsumexp of the logits (0 for an ensemble: see below)
    argmax:     (*L,) int64, top-1 class of the full distribution
    confidence: (*L,) float32, max probability of the full distribution
    entropy:    (*L,) float32, entropy (nats) of the full distribution before truncation
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    logsumexp: torch.Tensor
    argmax: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor

    def to_numpy(self) -> dict[str, np.ndarray]:
        """All fields as CPU numpy arrays (same shapes, float32/int64)."""
        return {name: getattr(self, name).detach().cpu().numpy() for name in self.__dataclass_fields__}


def topk_from_logprobs(logprobs: torch.Tensor, k: int, logsumexp: torch.Tensor | None = None) -> TopK:
    """Top-k soft targets from full log-probabilities.

    logprobs: (*L, C) normalised log-probabilities at T=1 (any float dtype; computed in fp32)
    logsumexp: (*L,) logsumexp of the original logits, or None for a distribution that did not
        come from one set of logits (an ensemble average), in which case 0 is stored so that
        "logit = logprob + logsumexp" still reconstructs log p.
    Returns TopK with k = min(k, C).
    """
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    lp = logprobs.float()
    num_classes = lp.shape[-1]
    k = min(k, num_classes)
    top_lp, top_ids = torch.topk(lp, k, dim=-1)  # (*L, k), sorted descending
    p = lp.exp()
    # 0 * log 0 is 0: where p underflows to 0, lp is -inf and the product is nan, so mask it.
    plogp = torch.where(p > 0, p * lp, torch.zeros_like(lp))
    entropy = -plogp.sum(-1)  # (*L,)
    if logsumexp is None:
        logsumexp = torch.zeros(lp.shape[:-1], dtype=torch.float32, device=lp.device)
    return TopK(
        ids=top_ids,
        logprobs=top_lp,
        logsumexp=logsumexp.float(),
        argmax=top_ids[..., 0],
        confidence=top_lp[..., 0].exp(),
        entropy=entropy,
    )


def topk_from_logits(logits: torch.Tensor, k: int) -> TopK:
    """Top-k soft targets from logits (B, C) or (B, T, C); computed in float32."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)  # (*L,)
    return topk_from_logprobs(z - lse.unsqueeze(-1), k, lse)


def ensemble_logprobs(logits_list: list[torch.Tensor]) -> torch.Tensor:
    """Average several teachers in probability space (Hinton et al. 2015).

    logits_list: M tensors of the same shape (*L, C). Returns log(mean_m softmax(z_m)) (*L, C).
    """
    if not logits_list:
        raise ValueError("an ensemble needs at least one teacher")
    shapes = {tuple(z.shape) for z in logits_list}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members disagree on output shape: {sorted(shapes)}")
    stacked = torch.stack([torch.log_softmax(z.float(), dim=-1) for z in logits_list])  # (M, *L, C)
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits_list))


def _check_kprime(stored_k: int, k: int | None) -> int:
    if k is None:
        return stored_k
    if not 1 <= k <= stored_k:
        raise ValueError(f"k'={k} must be between 1 and the stored k={stored_k}")
    return k


def sparse_targets(logprobs: torch.Tensor, temperature: float = 1.0, k: int | None = None) -> torch.Tensor:
    """Renormalised top-k' target probabilities at temperature T.

    logprobs: (*L, k) stored log-probabilities at T=1, sorted descending.
    Returns probs (*L, k') summing to 1 over the last dim, for ids[..., :k'].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = _check_kprime(logprobs.shape[-1], k)
    return torch.softmax(logprobs[..., :k].float() / temperature, dim=-1)


def dense_targets(
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    num_classes: int,
    temperature: float = 1.0,
    k: int | None = None,
    tail: str = "renormalize",
) -> torch.Tensor:
    """Full target distribution (*L, C) at temperature T from stored top-k.

    ids: (*L, k) class ids; logprobs: (*L, k) log-probabilities at T=1 (sorted descending).
    tail: "renormalize" puts zero mass outside the top-k'; "spread" spreads the T=1 tail mass
    evenly over the other C - k' classes before applying T (see module docstring).
    """
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = _check_kprime(logprobs.shape[-1], k)
    ids = ids[..., :k].long()
    lp = logprobs[..., :k].float()
    if ids.numel() and int(ids.max()) >= num_classes:
        raise ValueError(f"class id {int(ids.max())} out of range for {num_classes} classes")
    if tail == "renormalize" or k == num_classes:
        out = torch.zeros(*lp.shape[:-1], num_classes, dtype=torch.float32, device=lp.device)
        return out.scatter_(-1, ids, torch.softmax(lp / temperature, dim=-1))
    # spread: every class not kept gets log(tail / (C - k')) at T=1
    kept = lp.exp().sum(-1, keepdim=True).clamp(max=1.0)  # (*L, 1)
    tail_mass = (1.0 - kept).clamp(min=1e-12)
    tail_lp = torch.log(tail_mass / (num_classes - k))  # (*L, 1)
    full = tail_lp.expand(*lp.shape[:-1], num_classes).clone()
    full.scatter_(-1, ids, lp)
    return torch.softmax(full / temperature, dim=-1)


def topk_logits(logprobs: torch.Tensor, logsumexp: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The teacher's top-k' logits, exact to storage precision: logprob + logsumexp.

    logprobs (*L, k), logsumexp (*L,) -> (*L, k').
    """
    k = _check_kprime(logprobs.shape[-1], k)
    return logprobs[..., :k].float() + logsumexp.float().unsqueeze(-1)

