"""The cache fingerprint: changes with what the soft targets mean, stable with everything else."""

from __future__ import annotations

import copy
import hashlib

import pytest

from pipeline.fingerprint import canonical_json, file_digest, fingerprint

TEACHERS = [
    {"spec": "ast-audioset", "kwargs": {"sample_rate": 16000, "heads": {"a": 1, "b": 2}}, "weights_sha256": "a" * 64},
    {"spec": "beats-iter3", "kwargs": {}, "weights_sha256": "b" * 64},
]
PRE = {"sample_rate": 16000, "n_mels": 128, "window": {"type": "hann", "length_ms": 25.0}, "frame_shift_ms": 10.0}


def fp(teachers=None, pre=None, k=20, level="utterance") -> str:
    return fingerprint(TEACHERS if teachers is None else teachers, PRE if pre is None else pre, k, level)


def reversed_dict(d):
    """The same mapping with every dict's key order reversed, recursively."""
    if isinstance(d, dict):
        return {k: reversed_dict(d[k]) for k in reversed(list(d))}
    if isinstance(d, list):
        return [reversed_dict(x) for x in d]
    return d


def test_is_a_sha256_hex():
    f = fp()
    assert len(f) == 64 and int(f, 16) >= 0


def test_stable_for_equal_inputs():
    assert fp() == fp() == fp(copy.deepcopy(TEACHERS), copy.deepcopy(PRE))


def test_stable_under_dict_key_order():
    t, p = reversed_dict(TEACHERS), reversed_dict(PRE)
    assert list(t[0]) != list(TEACHERS[0]) and list(p) != list(PRE)  # really permuted
    assert fp(t, p) == fp()


def test_k_as_numpy_or_python_int():
    np = pytest.importorskip("numpy")
    assert fp(k=np.int64(20)) == fp(k=20)


def test_golden_value():
    """The fingerprint is a cache key: a change to its canonical form silently invalidates every cache,
    so it must be deliberate (update this value and say so in the changelog)."""
    body = {"teachers": TEACHERS, "preprocessing": PRE, "k": 20, "level": "utterance"}
    assert fp() == hashlib.sha256(canonical_json(body).encode()).hexdigest()
    assert canonical_json({"b": 1, "a": [1.5, "x"]}) == '{"a":[1.5,"x"],"b":1}'


def _with(teachers_change=None, pre_change=None):
    t, p = copy.deepcopy(TEACHERS), copy.deepcopy(PRE)
    if teachers_change:
        teachers_change(t)
    if pre_change:
        pre_change(p)
    return fp(t, p)


@pytest.mark.parametrize("change", [
    lambda t: t[0].update(weights_sha256="c" * 64),  # other weights
    lambda t: t[1].update(weights_sha256="a" * 64),
    lambda t: t[0].update(spec="ast-audioset-v2"),  # other teacher spec
    lambda t: t[0]["kwargs"].update(sample_rate=22050),
    lambda t: t[0]["kwargs"]["heads"].update(b=3),  # nested
    lambda t: t.reverse(),  # ensemble order is part of the identity
    lambda t: t.pop(),  # one member fewer
    lambda t: t.append({"spec": "third", "kwargs": {}, "weights_sha256": "d" * 64}),
], ids=["weights0", "weights1", "spec", "kwargs", "nested-kwargs", "member-order", "fewer-members", "more-members"])
def test_changes_with_teacher(change):
    assert _with(teachers_change=change) != fp()


@pytest.mark.parametrize("change", [
    lambda p: p.update(n_mels=64),
    lambda p: p.update(sample_rate=22050),
    lambda p: p["window"].update(type="hamming"),
    lambda p: p.update(extra_flag=True),
    lambda p: p.pop("frame_shift_ms"),
], ids=["n_mels", "sample_rate", "nested", "added", "removed"])
def test_changes_with_preprocessing(change):
    assert _with(pre_change=change) != fp()


def test_changes_with_k_and_level():
    assert len({fp(k=k) for k in (1, 5, 20, 21)}) == 4
    assert fp(level="frame") != fp(level="utterance")


def test_file_digest(tmp_path):
    w = tmp_path / "weights.safetensors"
    data = bytes(range(256)) * 10_000  # 2.5 MB: several 1 MiB chunks
    w.write_bytes(data)
    assert file_digest(str(w)) == hashlib.sha256(data).hexdigest()
    assert file_digest(str(w), chunk=1000) == hashlib.sha256(data).hexdigest()
    # weights changed on disk -> digest -> fingerprint changes
    t = copy.deepcopy(TEACHERS)
    t[0]["weights_sha256"] = file_digest(str(w))
    before = fp(t)
    w.write_bytes(data[:-1] + b"\x00")
    t[0]["weights_sha256"] = file_digest(str(w))
    assert fp(t) != before
