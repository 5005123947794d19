"""Frame masks and accuracy counts, one implementation for training, evaluation and the loss.

Frame level aligns the student's S output frames with labels (F) or teacher targets (T)
on their common prefix, each row masked by its own valid length.
"""

from __future__ import annotations

import torch


def valid_frames(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) valid lengths -> (B, width) bool mask of the valid positions."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def label_positions(logits: torch.Tensor, s_len: torch.Tensor | None, labels: torch.Tensor):
    """(logits, labels, valid) over the positions that have a label.

    Utterance: logits (B, C), labels (B,) with -1 = none. Frame: logits (B, S, C), s_len (B,)
    valid student frames, labels (B, F) padded with -1; returns the first min(S, F) frames.
    """
    if logits.dim() == 2:
        return logits, labels, labels >= 0
    n = min(logits.shape[1], labels.shape[1])
    labels = labels[:, :n]
    return logits[:, :n], labels, (labels >= 0) & valid_frames(s_len, n)


def accuracy_counts(logits: torch.Tensor, s_len: torch.Tensor | None, labels: torch.Tensor) -> tuple[float, float]:
    """(correct, total) over labeled positions (utterances, or frames at frame level)."""
    logits, labels, valid = label_positions(logits, s_len, labels)
    if valid.numel() == 0:
        return 0.0, 0.0
    return float(((logits.argmax(-1) == labels) & valid).sum()), float(valid.sum())


def target_positions(logits: torch.Tensor, s_len: torch.Tensor | None, b: dict, stride: int = 1
                     ) -> tuple[torch.Tensor, int | None, torch.Tensor]:
    """(the student's logits at the teacher's frames, T, valid) where batch ``b``'s teacher
    targets apply.

    Utterance: (logits, None, has_t (B,)). Frame: the teacher's frames are every ``stride``-th
    student frame (a teacher frame shift that is a whole multiple of the student's: frame j of
    the teacher is centred where frame j * stride of the student is); T = min(those frames,
    teacher frames in the batch) and valid (B, T): inside both the student's and the teacher's
    frames of the row, on rows with targets.
    """
    if logits.dim() == 2:
        return logits, None, b["has_t"]
    if stride > 1:
        logits = logits[:, ::stride]
        s_len = torch.div(s_len + stride - 1, stride, rounding_mode="floor")
    T = min(logits.shape[1], b["t_ids"].shape[1])
    valid = valid_frames(torch.minimum(s_len, b["t_frames"]), T) & b["has_t"].unsqueeze(1)
    return logits, T, valid
