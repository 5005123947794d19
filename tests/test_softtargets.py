"""Soft-target math against float64 full-softmax references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.shards.schema import id_dtype
from pipeline.softtargets import (
    dense_targets, ensemble_logprobs, sparse_targets, topk_from_logits, topk_from_logprobs, topk_logits,
)

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
FAST = settings(max_examples=40, deadline=None)


# ---- float64 references (numpy only) ------------------------------------------------------------

def log_softmax64(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(z, np.float64) / t
    m = z.max(-1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))


def softmax64(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax64(z, t))


def gather(a: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, ids, -1)


def logits_batch(seed: int, shape: tuple[int, ...], scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * scale


SHAPES = [(4, 2), (3, 10), (2, 1000), (2, 3, 7), (1, 5, 300)]


# ---- forward: logits -> top-k --------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 10_000])
def test_topk_from_logits_matches_full_softmax(shape, k):
    z = logits_batch(1, shape)
    zn = z.double().numpy()
    c = shape[-1]
    t = topk_from_logits(z, k)
    kk = min(k, c)
    assert t.ids.shape == (*shape[:-1], kk) and t.logprobs.shape == (*shape[:-1], kk)
    assert t.logsumexp.shape == shape[:-1] and t.entropy.shape == shape[:-1]
    ref_lp = log_softmax64(zn)
    p = np.exp(ref_lp)
    ids = t.ids.numpy()
    # the stored classes are the k most probable, most probable first, with the reference log-probs
    np.testing.assert_allclose(t.logprobs.numpy(), gather(ref_lp, ids), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gather(ref_lp, ids), -np.sort(-ref_lp, -1)[..., :kk], rtol=1e-6, atol=1e-6)
    assert (np.diff(t.logprobs.numpy(), axis=-1) <= 0).all()
    # logsumexp, and exact logits from logprob + logsumexp
    lse = np.log(np.exp(zn - zn.max(-1, keepdims=True)).sum(-1)) + zn.max(-1)
    np.testing.assert_allclose(t.logsumexp.numpy(), lse, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(topk_logits(t.logprobs, t.logsumexp).numpy(), gather(zn, ids), rtol=1e-5, atol=1e-4)
    # argmax, confidence, entropy are of the full distribution (not the truncated one)
    np.testing.assert_array_equal(t.argmax.numpy(), zn.argmax(-1))
    np.testing.assert_allclose(t.confidence.numpy(), p.max(-1), rtol=1e-5)
    np.testing.assert_allclose(t.entropy.numpy(), -(p * ref_lp).sum(-1), rtol=1e-5, atol=1e-5)


def test_entropy_of_truncated_top1_is_still_the_full_entropy():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    t = topk_from_logits(z, 1)
    p = softmax64(z.numpy())
    assert t.entropy.item() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    assert t.entropy.item() > 0.5  # a top-1 entropy would be 0


def test_masked_classes_and_underflow():
    """-inf logits (masked) and huge gaps (exp underflows) give p = 0 and a finite entropy."""
    z = torch.tensor([[0.0, -float("inf"), 1.0, -float("inf")], [0.0, -1e4, -2e4, 5.0]])
    t = topk_from_logits(z, 4)
    assert torch.isfinite(t.entropy).all() and torch.isfinite(t.logsumexp).all()
    p = softmax64(np.where(np.isinf(z.numpy()), -1e30, z.numpy().astype(np.float64)))
    ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)
    np.testing.assert_allclose(t.entropy.numpy(), ent, rtol=1e-5, atol=1e-6)
    assert t.ids[0, :2].tolist() == [2, 0] and t.argmax.tolist() == [2, 3]
    assert torch.isneginf(t.logprobs[0, 2:]).all()  # in memory; the format stores -65504 (see format.md)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_input_dtype_is_computed_in_float32(dtype):
    z = logits_batch(3, (2, 50)).to(dtype)
    t = topk_from_logits(z, 5)
    assert t.logprobs.dtype == torch.float32 and t.logsumexp.dtype == torch.float32
    ref = log_softmax64(z.double().numpy())
    np.testing.assert_allclose(t.logprobs.numpy(), gather(ref, t.ids.numpy()), rtol=1e-5, atol=1e-5)


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="top-k"):
        topk_from_logits(torch.zeros(1, 3), 0)


# ---- backward: top-k -> targets at T, k' ---------------------------------------------------------

@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tail", ["renormalize", "spread"])
def test_exact_at_k_equals_c(temperature, shape, tail):
    """k = C keeps the whole distribution: both tail modes give the full softmax at T (fp32 precision)."""
    z = logits_batch(7, shape)
    c = shape[-1]
    t = topk_from_logits(z, c)
    want = softmax64(z.double().numpy(), temperature)
    got = dense_targets(t.ids, t.logprobs, c, temperature, tail=tail)
    assert got.dtype == torch.float32 and got.shape == shape
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-7)
    sparse = sparse_targets(t.logprobs, temperature)
    np.testing.assert_allclose(sparse.numpy(), gather(want, t.ids.numpy()), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", [(4, 10), (2, 3, 300)])
def test_exact_at_k_equals_c_after_float16_storage(tmp_path, temperature, shape):
    """Through the cache format (log-probs stored as float16) the reconstruction is exact up to the
    float16 rounding of each log-prob: |dlp| <= 2^-11 |lp|, so p_T is within a factor exp(2 max|dlp| / T)."""
    from pipeline.shards import Manifest, RunWriter, SoftTargetRun, rows_from_topk, table_from_rows

    z = logits_batch(11, shape)
    c = shape[-1]
    level = "frame" if len(shape) == 3 else "utterance"
    t = topk_from_logits(z, c)
    nf = np.full(shape[0], shape[1]) if level == "frame" else None
    keys = [f"k{i}" for i in range(shape[0])]
    for encoding in ("parquet", "webdataset"):
        run = str(tmp_path / encoding)
        w = RunWriter(run, Manifest(fingerprint="f" * 64, teacher={}, modality="audio", level=level,
                                    preprocessing={}, k=c, num_classes=c, encoding=encoding,
                                    id_dtype=id_dtype(c).name, frame_shift_ms=10.0))
        w.write_shard("s", "/in/s", table_from_rows(keys, rows_from_topk(t, c, nf), level, c, c), [])
        w.flush()
        cols = SoftTargetRun(run).read_numpy("s")
        ids = torch.from_numpy(cols["ids"].astype(np.int64))
        lp16 = torch.from_numpy(cols["logprobs"].copy())
        assert lp16.dtype == torch.float16
        lp_true = gather(log_softmax64(z.double().numpy().reshape(-1, c)), cols["ids"].astype(np.int64))
        bound = np.expm1(2 * (2.0**-11 * np.abs(lp_true) + 2.0**-25).max(-1, keepdims=True) / temperature)
        want = softmax64(z.double().numpy().reshape(-1, c), temperature)
        for tail in ("renormalize", "spread"):
            got = dense_targets(ids, lp16, c, temperature, tail=tail).double().numpy()
            assert (np.abs(got - want) <= want * bound + 1e-6).all(), (tail, np.abs(got - want).max())
            np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
        # and the error is really there (the bound is not vacuous), but small
        assert np.abs(got - want).max() < 0.05


@FAST
@given(seed=st.integers(0, 2**16), c=st.integers(2, 400), k=st.integers(1, 40), kp=st.integers(1, 40),
       temperature=st.sampled_from(TEMPERATURES), scale=st.sampled_from([0.3, 3.0, 30.0]))
def test_renormalized_top_kprime(seed, c, k, kp, temperature, scale):
    """tail="renormalize": p_T(i) = exp(lp_i/T) / sum_{j<k'} exp(lp_j/T) over the k' most probable classes."""
    k = min(k, c)
    kp = min(kp, k)
    z = logits_batch(seed, (3, c), scale)
    t = topk_from_logits(z, k)
    ref_lp = log_softmax64(z.double().numpy())
    top = np.argsort(-ref_lp, -1, kind="stable")[:, :kp]
    lp = gather(ref_lp, t.ids.numpy()[:, :kp])
    np.testing.assert_allclose(lp, gather(ref_lp, top), atol=1e-6)  # the same k' classes (up to ties)
    want = np.exp(lp / temperature) / np.exp(lp / temperature).sum(-1, keepdims=True)
    sparse = sparse_targets(t.logprobs, temperature, k=kp)
    assert sparse.shape == (3, kp)
    np.testing.assert_allclose(sparse.numpy(), want, rtol=1e-4, atol=1e-7)
    dense = dense_targets(t.ids, t.logprobs, c, temperature, k=kp).numpy()
    np.testing.assert_allclose(gather(dense, t.ids.numpy()[:, :kp]), want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(dense.sum(-1), 1.0, atol=1e-5)
    assert (np.count_nonzero(dense, -1) <= kp).all()  # nothing outside the top-k'


def spread_reference(ids: np.ndarray, lp: np.ndarray, c: int, temperature: float) -> np.ndarray:
    """The documented "spread" formula in float64: tail = 1 - sum_{j<k'} exp(lp_j); every class not
    kept gets log(tail / (C - k')) at T=1; then softmax(. / T) over all C classes."""
    kp = lp.shape[-1]
    tail = np.clip(1.0 - np.exp(lp).sum(-1, keepdims=True), 1e-12, None)
    full = np.broadcast_to(np.log(tail / (c - kp)), lp.shape[:-1] + (c,)).copy()
    np.put_along_axis(full, ids, lp, -1)
    return softmax64(full, temperature)


@FAST
@given(seed=st.integers(0, 2**16), c=st.integers(3, 400), k=st.integers(1, 40), kp=st.integers(1, 40),
       temperature=st.sampled_from(TEMPERATURES), scale=st.sampled_from([0.3, 3.0, 30.0]))
def test_spread_tail(seed, c, k, kp, temperature, scale):
    k = min(k, c - 1)
    kp = min(kp, k)
    z = logits_batch(seed, (3, c), scale)
    t = topk_from_logits(z, k)
    ids, lp = t.ids.numpy()[:, :kp], t.logprobs.double().numpy()[:, :kp]
    got = dense_targets(t.ids, t.logprobs, c, temperature, k=kp, tail="spread").double().numpy()
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    others = np.ones_like(got, bool)
    np.put_along_axis(others, ids, False, -1)
    spread = got[others].reshape(3, c - kp)
    assert (spread > 0).all() and (spread == spread[:, :1]).all()  # every other class: one equal, nonzero share
    tail = 1.0 - np.exp(lp).sum(-1)
    # 1 - sum(exp(lp)) is computed in float32: it is good to ~(k'+2) * 2^-24 absolute, so a tail
    # much smaller than that is rounding noise (see docs/format.md). Compare where it is not.
    err = (kp + 2) * 2.0**-24
    ok = tail > 1e3 * err
    ref = spread_reference(ids, lp, c, temperature)
    for b in np.flatnonzero(ok):
        np.testing.assert_allclose(got[b], ref[b], rtol=1e-4 + 4 * err / (tail[b] * temperature), atol=1e-7)
    if temperature == 1.0:  # at T=1 the kept classes keep exactly their teacher probabilities
        np.testing.assert_allclose(gather(got, ids), np.exp(lp), rtol=1e-4, atol=2e-6)
        # and the tail is spread evenly over the C - k' others
        np.testing.assert_allclose(got[others].reshape(3, c - kp)[ok], np.broadcast_to(
            (tail / (c - kp))[:, None], (3, c - kp))[ok], rtol=1e-3, atol=1e-7)


def test_spread_keeps_the_tail_on_a_frame_level_batch():
    z = logits_batch(5, (2, 3, 50))
    t = topk_from_logits(z, 5)
    got = dense_targets(t.ids, t.logprobs, 50, 2.0, tail="spread")
    assert got.shape == (2, 3, 50)
    ref = spread_reference(t.ids.numpy(), t.logprobs.double().numpy(), 50, 2.0)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kp", [0, 6, 100])
def test_kprime_out_of_range_raises(kp):
    t = topk_from_logits(logits_batch(0, (2, 20)), 5)
    with pytest.raises(ValueError, match="k'"):
        sparse_targets(t.logprobs, 1.0, k=kp)
    with pytest.raises(ValueError, match="k'"):
        dense_targets(t.ids, t.logprobs, 20, 1.0, k=kp)
    with pytest.raises(ValueError, match="k'"):
        topk_logits(t.logprobs, t.logsumexp, k=kp)


def test_bad_arguments_raise():
    t = topk_from_logits(logits_batch(0, (2, 20)), 5)
    for temp in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            sparse_targets(t.logprobs, temp)
        with pytest.raises(ValueError, match="temperature"):
            dense_targets(t.ids, t.logprobs, 20, temp)
    with pytest.raises(ValueError, match="tail"):
        dense_targets(t.ids, t.logprobs, 20, 1.0, tail="uniform")
    with pytest.raises(ValueError, match="out of range"):
        dense_targets(t.ids, t.logprobs, 10, 1.0)  # ids up to 19 do not fit 10 classes


def test_unsigned_id_tensors_from_storage_are_accepted():
    t = topk_from_logits(logits_batch(2, (3, 300)), 4)
    ids16 = torch.from_numpy(t.ids.numpy().astype(np.uint16))
    np.testing.assert_array_equal(dense_targets(ids16, t.logprobs, 300, 2.0).numpy(),
                                  dense_targets(t.ids, t.logprobs, 300, 2.0).numpy())


# ---- ensembles -----------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("shape", [(3, 10), (2, 4, 30)])
def test_ensemble_is_log_mean_softmax(m, shape):
    members = [logits_batch(100 + i, shape, scale=2.0 + i) for i in range(m)]
    got = ensemble_logprobs(members)
    want = np.log(np.mean([softmax64(z.double().numpy()) for z in members], axis=0))
    assert got.shape == shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.exp().sum(-1).numpy(), 1.0, atol=1e-5)
    # top-k of an ensemble: logsumexp is stored as 0, so "logit = logprob + lse" still gives log p
    t = topk_from_logprobs(got, 4)
    assert (t.logsumexp == 0).all()
    p = np.exp(want)
    np.testing.assert_array_equal(t.argmax.numpy(), want.argmax(-1))
    np.testing.assert_allclose(t.entropy.numpy(), -(p * want).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(topk_logits(t.logprobs, t.logsumexp).numpy(), gather(want, t.ids.numpy()), atol=1e-5)


def test_ensemble_of_one_is_the_teacher():
    z = logits_batch(9, (4, 25))
    np.testing.assert_allclose(ensemble_logprobs([z]).numpy(), torch.log_softmax(z, -1).numpy(), atol=1e-6)


def test_ensemble_errors():
    with pytest.raises(ValueError, match="at least one"):
        ensemble_logprobs([])
    with pytest.raises(ValueError, match="shape"):
        ensemble_logprobs([torch.zeros(2, 5), torch.zeros(2, 6)])


# ---- id dtype --------------------------------------------------------------------------------------

@pytest.mark.parametrize("c, dtype", [(1, np.uint8), (255, np.uint8), (256, np.uint8), (257, np.uint16),
                                      (65535, np.uint16), (65536, np.uint16), (65537, np.uint32),
                                      (2**32, np.uint32), (2**32 + 1, np.uint64)])
def test_id_dtype(c, dtype):
    assert id_dtype(c) == np.dtype(dtype)
    assert np.iinfo(id_dtype(c)).max >= c - 1


def test_id_dtype_needs_a_class():
    with pytest.raises(ValueError):
        id_dtype(0)
