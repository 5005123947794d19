"""Distillation losses against float64 references."""

from __future__ import annotations

import pytest
import torch

from pipeline.softtargets import topk_from_logits
from pipeline.student.losses import combine, distill_loss, hard_ce, kd_kl, kd_mse
from pipeline.student.train import StepLoss, lr_lambda


def _ref_kl(teacher_logits, student_logits, T):
    p = torch.softmax(teacher_logits.double() / T, -1)
    log_q = torch.log_softmax(student_logits.double() / T, -1)
    return (p * (p.log() - log_q)).sum(-1)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_kd_at_k_equals_c_is_the_full_distribution_kl_with_t_squared(T):
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(6, 12, generator=g) * 3, torch.randn(6, 12, generator=g) * 3
    tk = topk_from_logits(t, 12)  # k = C, kept in float32 (no storage rounding)
    got = kd_kl(s, tk.ids, tk.logprobs, T).double()
    want = _ref_kl(t, s, T) * T * T
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    # the spread tail is the same thing at k = C
    assert torch.allclose(kd_kl(s, tk.ids, tk.logprobs, T, tail="spread").double(), want, atol=1e-5, rtol=1e-4)


def test_kd_topk_renormalised_reference():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(4, 20, generator=g) * 2, torch.randn(4, 20, generator=g)
    tk = topk_from_logits(t, 5)
    T, k = 2.0, 3
    got = kd_kl(s, tk.ids, tk.logprobs, T, k=k).double()
    ids = tk.ids[:, :k]
    p = torch.softmax(torch.gather(t.double(), 1, ids) / T, -1)  # renormalised over the kept classes
    log_q = torch.log_softmax(s.double() / T, -1).gather(1, ids)
    assert torch.allclose(got, (p * (p.log() - log_q)).sum(-1) * T * T, atol=1e-5)
    assert (got >= -1e-6).all()


def test_mse_on_topk_logits():
    g = torch.Generator().manual_seed(2)
    t, s = torch.randn(5, 9, generator=g) * 4 + 7, torch.randn(5, 9, generator=g)
    tk = topk_from_logits(t, 4)
    got = kd_mse(s, tk.ids, tk.logprobs, tk.logsumexp, k=2).double()
    ids = tk.ids[:, :2]
    want = ((s.double().gather(1, ids) - t.double().gather(1, ids)) ** 2).mean(-1)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(distill_loss("mse", s, tk.ids, tk.logprobs, tk.logsumexp, k=2).double(), got)


def test_hard_ce_ignores_missing_labels_and_hard_pseudo_uses_top1():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 6, generator=g)
    labels = torch.tensor([1, -1, 5, 0])
    got = hard_ce(s, labels)
    ref = -torch.log_softmax(s.double(), -1)[torch.arange(4), labels.clamp_min(0)]
    assert got[1] == 0 and torch.allclose(got[[0, 2, 3]].double(), ref[[0, 2, 3]], atol=1e-6)
    tk = topk_from_logits(torch.randn(4, 6, generator=g), 3)
    assert torch.allclose(distill_loss("hard", s, tk.ids, tk.logprobs, tk.logsumexp), hard_ce(s, tk.ids[:, 0]))


def test_blurred_labels_are_a_gaussian_over_neighbouring_classes():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 40, generator=g)  # frame level: (B, T, C)
    labels = torch.tensor([[0, 17, -1], [39, 20, 21]])
    got = hard_ce(s, labels, blur=1.25).double()
    c = torch.arange(40, dtype=torch.float64)
    ref = torch.zeros(2, 3, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            if labels[i, j] >= 0:
                w = torch.exp(-((c - labels[i, j]) ** 2) / (2 * 1.25 ** 2))
                ref[i, j] = -(w / w.sum() * torch.log_softmax(s[i, j].double(), -1)).sum()
    assert got[0, 2] == 0 and torch.allclose(got, ref, atol=1e-5)
    # the loss is least for logits peaked on the label, and a shifted peak costs more the further it is
    peak = lambda b: -((c.float() - b) ** 2)[None] / 4  # logits (1, C) peaked at bin b
    costs = [float(hard_ce(peak(20 + d), torch.tensor([20]), blur=1.25)) for d in (0, 1, 3)]
    assert costs[0] < costs[1] < costs[2]
    # a tiny blur is the one-hot cross-entropy; "hard" pseudo-labels are blurred the same way
    assert torch.allclose(hard_ce(s, labels, blur=1e-3), hard_ce(s, labels), atol=1e-5)
    tk = topk_from_logits(torch.randn(2, 3, 40, generator=g), 3)
    assert torch.allclose(distill_loss("hard", s, tk.ids, tk.logprobs, tk.logsumexp, blur=1.25),
                          hard_ce(s, tk.ids[..., 0], blur=1.25))


def test_combine_weights_alpha_by_position_counts():
    hard, soft = torch.tensor([2.0, 4.0, 0.0]), torch.tensor([0.0, 1.0, 3.0])
    hw, sw = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    got = combine(hard, hw, soft, sw, alpha=0.25)
    assert got.item() == pytest.approx((0.25 * 6 + 0.75 * 4) / (0.25 * 2 + 0.75 * 2))
    assert combine(hard, hw, soft, torch.zeros(3), 0.25).item() == pytest.approx(3.0)  # labels only: plain CE mean


def test_frame_loss_is_masked_by_lengths_and_confidence():
    from dataclasses import replace

    from pipeline.student.plan import LossPlan

    g = torch.Generator().manual_seed(4)
    B, T, C, k = 2, 7, 5, 3
    teacher = torch.randn(B, T, C, generator=g) * 2
    tk = topk_from_logits(teacher, k)
    logits = torch.randn(B, T, C, generator=g)
    b = {"t_ids": tk.ids, "t_lp": tk.logprobs, "t_lse": tk.logsumexp, "t_conf": tk.confidence,
         "t_frames": torch.tensor([7, 4]), "has_t": torch.tensor([True, True]),
         "flabels": torch.full((B, 0), -1)}
    plan = LossPlan(loss="kl", temperature=2.0, k=None, tail="renormalize", alpha=0.5, confidence_threshold=0.0)
    s_len = torch.tensor([7, 5])  # the student's valid output frames per row
    loss, stats = StepLoss(plan)(logits, s_len, b)
    per = kd_kl(logits, tk.ids, tk.logprobs, 2.0)  # (B, T)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)  # min(student 5, teacher 4) for row 2
    assert stats.soft_n == 11
    assert loss.item() == pytest.approx(per[mask].mean().item(), rel=1e-5)
    # Garbage in masked frames changes nothing.
    logits2 = logits.clone()
    logits2[1, 4:] = 1e4
    assert StepLoss(plan)(logits2, s_len, b)[0].item() == pytest.approx(loss.item(), rel=1e-5)
    # A confidence threshold drops the frames below it.
    thr = float(tk.confidence.median())
    _, stats = StepLoss(replace(plan, confidence_threshold=thr))(logits, s_len, b)
    assert stats.soft_n == int(((tk.confidence >= thr) & mask).sum())
    # --loss hard with --label-blur: the blurred teacher top-1 and blurred labels, through the same step
    b["flabels"] = torch.tensor([[0, 2, -1, 4, 1, 3, 3], [1, 1, 1, -1, 0, -1, -1]])
    hp = replace(plan, loss="hard", label_blur=1.25)
    loss, stats = StepLoss(hp)(logits, s_len, b)
    lab_mask = (b["flabels"] >= 0) & torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)
    want = (hard_ce(logits, b["flabels"], 1.25)[lab_mask].sum() + hard_ce(logits, tk.ids[..., 0], 1.25)[mask].sum()) \
        / (lab_mask.sum() + mask.sum())
    assert stats.hard_n == int(lab_mask.sum()) and loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert StepLoss(replace(hp, label_blur=0.0))(logits, s_len, b)[0].item() != pytest.approx(loss.item(), rel=1e-3)
    with pytest.raises(ValueError, match="out of range"):
        hard_ce(logits, torch.full((B, T), C), blur=1.25)


def test_warmup_then_cosine():
    assert lr_lambda(0, 10, 100) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100) == pytest.approx(0.5)
    assert lr_lambda(100, 10, 100) == pytest.approx(0.0)
    assert lr_lambda(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)


def test_sparse_teacher_frames_meet_every_kth_student_frame():
    """A teacher at 40 ms over a student at 10 ms: teacher frame j is student frame 4 j."""
    from pipeline.student.metrics import target_positions

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 9, 6, generator=g)  # (B, S, C): student frames 0..8
    b = {"t_ids": torch.zeros(2, 3, 2, dtype=torch.long), "t_frames": torch.tensor([3, 2]),
         "has_t": torch.tensor([True, True])}
    at_t, T, valid = target_positions(logits, torch.tensor([9, 5]), b, stride=4)
    assert T == 3 and torch.equal(at_t, logits[:, [0, 4, 8]])
    # row 2: 5 valid student frames cover teacher frames 0 and 1 (student 0, 4); it has 2 teacher frames
    assert valid.tolist() == [[True, True, True], [True, True, False]]


def test_epoch_stats_add_up_on_the_device_and_are_read_once():
    from pipeline.student.stats import PHASES, EpochStats, StepStats

    s = EpochStats(torch.device("cpu"))
    s.add(torch.tensor(2.0), StepStats(*map(torch.tensor, (3.0, 2.0, 5.0, 4.0))), 8)
    s.add(torch.tensor(4.0), StepStats(*map(torch.tensor, (1.0, 2.0, 0.0, 0.0))), 4)
    assert list(s.timed(iter([1, 2, 3]), "shuffle")) == [1, 2, 3] and s.call(lambda a: a + 1, "collate")(1) == 2
    s.seconds.update(shuffle=3.0, block_wait=1.0, collate=0.5, h2d=0.25, step=2.0)
    s.data_wait = 1.5
    r = s.reduce()
    assert {k: r[k] for k in ("loss", "ce", "kd", "samples", "data_wait")} == {
        "loss": 3.0, "ce": 1.0, "kd": 1.25, "samples": 12, "data_wait": 1.5}
    # the input thread's shuffle time, less the block waits made inside it
    assert r["phases"] == dict(zip(PHASES, (1.0, 2.0, 0.5, 1.5, 0.25, 2.0)))
    empty = EpochStats(torch.device("cpu")).reduce()
    assert empty["ce"] is None and empty["kd"] is None and empty["loss"] == 0.0
