"""Write with RunWriter, read with SoftTargetRun: both encodings, both levels, any shape, exact values."""

from __future__ import annotations

import tempfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.shards import LEVELS, VALUE_COLUMNS, RunWriter, SoftTargetRun, rows_from_topk, table_from_rows
from pipeline.shards.schema import LOGPROB_FLOOR, id_dtype
from pipeline.softtargets import TopK, topk_from_logits

ENCODINGS = ("parquet", "webdataset")
EXT = {"parquet": ".parquet", "webdataset": ".tar"}
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# class counts on both sides of every id dtype boundary (uint8 | uint16 | uint32)
CLASS_COUNTS = st.one_of(st.integers(1, 40), st.sampled_from([255, 256, 257, 65535, 65536, 65537, 70000]))
STORAGE = {"logprobs": np.float16, "logsumexp": np.float32, "confidence": np.float16, "entropy": np.float16}


def expected_columns(topk: TopK, num_classes: int, num_frames) -> dict[str, np.ndarray]:
    """What a reader must return, computed straight from the TopK (not through the writer's helpers)."""
    a = topk.to_numpy()
    out = {}
    for c in VALUE_COLUMNS:
        v = a[c]
        if num_frames is not None:  # keep each row's real frames, flatten over rows
            v = np.concatenate([v[b, :n] for b, n in enumerate(num_frames)]) if len(num_frames) else v.reshape(
                (0,) + v.shape[2:])
        if c == "logprobs":
            v = np.maximum(v, LOGPROB_FLOOR)
        out[c] = v.astype(STORAGE.get(c, id_dtype(num_classes)))
    return out


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype.kind == "f":  # bit-exact, so -0.0, subnormals and the floor all count
        np.testing.assert_array_equal(got.view(f"u{want.itemsize}"), want.view(f"u{want.itemsize}"), err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def write_and_read(kd, tmp: str, encoding: str, level: str, k: int, num_classes: int, keys, rows, errors=()):
    run = f"{tmp}/{encoding}"
    w = RunWriter(run, kd.make_manifest(level, k, num_classes, encoding))
    table = table_from_rows(keys, rows, level, k, num_classes)
    rec = w.write_shard("shard-000", "/in/shard-000.tar", table, list(errors))
    w.flush()
    return SoftTargetRun(run), rec


def check_run(r: SoftTargetRun, rec, keys, want, level, frames):
    assert r.shard_names == ["shard-000"]
    assert rec.rows == len(keys) and r.manifest.shards["shard-000"].rows == len(keys)
    assert rec.frames == (int(sum(frames)) if level == "frame" else 0)
    got = r.read_numpy("shard-000")
    assert list(got["key"]) == list(keys)
    if level == "frame":
        assert list(got["num_frames"]) == list(frames)
        assert list(got["offsets"]) == [0, *np.cumsum(frames).tolist()]
    for c in VALUE_COLUMNS:
        assert_same(got[c], want[c], c)
    # streaming in small batches gives the same rows
    tables = list(r.iter_tables("shard-000", batch_rows=2))
    assert all(t.num_rows <= 2 for t in tables)
    assert sum(t.num_rows for t in tables) == len(keys)
    if tables:
        assert pa.concat_tables(tables).select(r.schema.names).equals(r.read_table("shard-000").select(r.schema.names))


@st.composite
def logit_batches(draw):
    level = draw(st.sampled_from(LEVELS))
    num_classes = draw(CLASS_COUNTS)
    k = draw(st.integers(1, min(num_classes, 12)))
    n = draw(st.integers(0, 4))
    frames = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)) if level == "frame" else None
    scale = draw(st.sampled_from([0.01, 1.0, 8.0, 1000.0]))
    seed = draw(st.integers(0, 2**16))
    edges = draw(st.booleans())
    return level, num_classes, k, n, frames, scale, seed, edges


@FAST
@given(logit_batches())
def test_roundtrip_from_logits(kd, case):
    level, num_classes, k, n, frames, scale, seed, edges = case
    g = torch.Generator().manual_seed(seed)
    lead = (n, max(frames, default=0)) if level == "frame" else (n,)
    logits = torch.randn(*lead, num_classes, generator=g) * scale
    flat = logits.view(-1, num_classes)
    if edges and flat.shape[0] >= 2:
        # float16 edge values: -60000 (finite in fp16), -70000 and -inf (below fp16 range: the floor),
        # and a near-certain class whose log-prob is a float16 subnormal or -0.0.
        flat[0] = -float("inf")
        flat[0, 0] = 0.0
        if num_classes > 1:
            flat[0, 1] = -60000.0
        if num_classes > 2:
            flat[0, 2] = -70000.0
        flat[1] = -20.0
        flat[1, num_classes - 1] = 0.0
    topk = topk_from_logits(logits, k)
    nf = np.asarray(frames, dtype=np.int64) if level == "frame" else None
    rows = rows_from_topk(topk, num_classes, nf)
    want = expected_columns(topk, num_classes, nf)
    assert np.isfinite(want["logprobs"]).all()
    keys = [f"utt{i:03d}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for enc in ENCODINGS:
            r, rec = write_and_read(kd, tmp, enc, level, k, num_classes, keys, rows)
            check_run(r, rec, keys, want, level, frames)
            results[enc] = r.read_numpy("shard-000")
        for c in VALUE_COLUMNS:  # the two encodings hold the same content
            assert_same(results["parquet"][c], results["webdataset"][c], c)


@st.composite
def raw_topk(draw):
    """A TopK built directly from arbitrary float16 values: every fp16 edge case the format must keep."""
    level = draw(st.sampled_from(LEVELS))
    num_classes = draw(CLASS_COUNTS)
    k = draw(st.integers(1, min(num_classes, 8)))
    n = draw(st.integers(0, 4))
    t = draw(st.integers(0, 4)) if level == "frame" else None
    lead = (n, t) if level == "frame" else (n,)
    f16 = st.floats(width=16, max_value=0.0, allow_nan=False)  # includes -0.0, subnormals, -65504, -inf
    lp = draw(hnp.arrays(np.float16, lead + (k,), elements=f16))
    lp = -np.sort(-lp, axis=-1)  # most probable first
    lse = draw(hnp.arrays(np.float32, lead, elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
    conf = draw(hnp.arrays(np.float16, lead, elements=st.floats(0, 1, width=16)))
    ent = draw(hnp.arrays(np.float16, lead, elements=st.floats(0, 20, width=16)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(num_classes, k, replace=False) for _ in range(int(np.prod(lead)))]) if np.prod(lead) \
        else np.zeros((0, k), np.int64)
    ids = ids.reshape(lead + (k,)).astype(np.int64)
    frames = draw(st.lists(st.integers(0, t), min_size=n, max_size=n)) if level == "frame" else None
    topk = TopK(ids=torch.from_numpy(ids), logprobs=torch.from_numpy(lp), logsumexp=torch.from_numpy(lse),
                argmax=torch.from_numpy(ids[..., 0].copy()), confidence=torch.from_numpy(conf),
                entropy=torch.from_numpy(ent))
    return level, num_classes, k, n, frames, topk


@FAST
@given(raw_topk())
def test_roundtrip_float16_edge_values(kd, case):
    level, num_classes, k, n, frames, topk = case
    nf = np.asarray(frames, dtype=np.int64) if level == "frame" else None
    rows = rows_from_topk(topk, num_classes, nf)
    want = expected_columns(topk, num_classes, nf)
    keys = [f"k-{i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        for enc in ENCODINGS:
            r, rec = write_and_read(kd, tmp, enc, level, k, num_classes, keys, rows)
            check_run(r, rec, keys, want, level, frames)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("level", LEVELS)
def test_neg_inf_logprobs_are_stored_as_the_float16_floor(tmp_path, kd, encoding, level):
    """-inf (masked class, softmax underflow) is stored as -65504: probability exactly 0, never NaN downstream."""
    logits = torch.tensor([[0.0, -float("inf"), -1e5, -5.0]])
    if level == "frame":
        logits = logits.unsqueeze(1)
    topk = topk_from_logits(logits, 4)
    assert torch.isinf(topk.logprobs).any()  # in memory -inf is still -inf
    nf = np.array([1]) if level == "frame" else None
    r, _ = write_and_read(kd, str(tmp_path), encoding, level, 4, 4, ["a"], rows_from_topk(topk, 4, nf))
    lp = r.read_numpy("shard-000")["logprobs"].reshape(-1)
    assert lp.dtype == np.float16
    np.testing.assert_array_equal(lp[2:], np.float16([LOGPROB_FLOOR, LOGPROB_FLOOR]))
    assert np.exp(lp.astype(np.float32))[2:].tolist() == [0.0, 0.0]
    # a KL with log targets stays finite (with -inf it would be 0 * -inf = nan)
    t = torch.from_numpy(lp.astype(np.float32))[None]
    kl = torch.nn.functional.kl_div(torch.log_softmax(torch.zeros(1, 4), -1), t, log_target=True, reduction="sum")
    assert torch.isfinite(kl)


def test_nan_logprobs_are_refused():
    """A NaN teacher output is never cached (the job quarantines the key in the errors table instead)."""
    topk = topk_from_logits(torch.tensor([[float("nan"), 0.0, 1.0]]), 2)
    with pytest.raises(ValueError, match="NaN"):
        rows_from_topk(topk, 3)
    rows = {c: [np.asarray(v)] for c, v in
            {"ids": [0, 1], "logprobs": [0.0, np.nan], "logsumexp": 0.0, "argmax": 0, "confidence": 1.0,
             "entropy": 0.0}.items()}
    with pytest.raises(ValueError, match="NaN"):
        table_from_rows(["a"], rows, "utterance", 2, 3)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("level", LEVELS)
def test_many_shards_errors_and_reopen(tmp_path, kd, encoding, level):
    """Several shards, errors tables, rerun skips finished shards, every key exactly once."""
    run = str(tmp_path / "run")
    shards = {"b-0001": ["x1", "x2", "x3"], "a-0000": ["y1"], "c-0002": []}
    errors = {"a-0000": [{"key": "y2", "input": "/data/in/a-0000.tar", "reason": "decode", "detail": "bad flac"}]}
    _, tables = kd.write_run(run, encoding, level, 3, 20, shards, errors=errors)
    r = SoftTargetRun(run)
    assert r.shard_names == ["a-0000", "b-0001", "c-0002"]
    assert r.manifest.total_rows == 4
    for name, keys in shards.items():
        rec = r.manifest.shards[name]
        assert rec.output == f"shards/{name}.{'parquet' if encoding == 'parquet' else 'tar'}"
        assert rec.errors == f"errors/{name}.parquet"
        assert rec.rows == len(keys) and rec.error_rows == len(errors.get(name, []))
        assert list(r.read_numpy(name)["key"]) == keys
    err = r.errors().to_pylist()
    assert err == [{"key": "y2", "input": "/data/in/a-0000.tar", "reason": "decode", "detail": "bad flac"}]
    # reopen for writing with the same manifest facts: the finished shards are known
    w = RunWriter(run, kd.make_manifest(level, 3, 20, encoding))
    assert w.completed() == set(shards)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_uncommitted_shard_files_do_not_count_and_are_removed(tmp_path, kd, encoding):
    """Files a worker wrote whose record never reached the commit log (a killed run) are never
    read, and the next writer removes them; committed shards are untouched."""
    from pipeline.shards import write_shard_files

    run = str(tmp_path / "run")
    w = RunWriter(run, kd.make_manifest("utterance", 2, 10, encoding), flush_interval_s=3600)
    w.write_shard("s0", "/in/s0", kd.make_table(["a"], 10, 2, "utterance"), [])
    w.flush()
    # a worker writes s1's files, then the job dies before the driver commits them
    write_shard_files(run, w.manifest.facts(), "s1", "/in/s1", kd.make_table(["b", "c"], 10, 2, "utterance"),
                      kd_errors([]))
    (tmp_path / "run" / "_parts" / "s2").mkdir(parents=True)
    (tmp_path / "run" / "_parts" / "s2" / "p.parquet").write_bytes(b"half a part")
    w.abandon()
    assert SoftTargetRun(run).shard_names == ["s0"]
    before = (tmp_path / "run" / "shards" / f"s0{EXT[encoding]}").stat().st_mtime_ns
    w2 = RunWriter(run, kd.make_manifest("utterance", 2, 10, encoding))
    assert w2.cleanup() == 3  # s1's shard and errors files, the part
    w2.close()
    names = sorted(p.name for p in (tmp_path / "run" / "shards").iterdir())
    assert names == [f"s0{EXT[encoding]}"] and not (tmp_path / "run" / "_parts").exists()
    assert (tmp_path / "run" / "shards" / f"s0{EXT[encoding]}").stat().st_mtime_ns == before
    assert list(SoftTargetRun(run).read_numpy("s0")["key"]) == ["a"]


def kd_errors(rows):
    from pipeline.shards import errors_table

    return errors_table(rows)


def test_commit_log_saves_only_what_is_new_and_opens_in_a_few_reads(tmp_path, kd):
    """Each save writes one segment with the records since the last save (not the whole run);
    the log is folded into an index as it grows, so an open reads a bounded number of files."""
    from pipeline.shards import commitlog

    run = str(tmp_path / "run")
    w = RunWriter(run, kd.make_manifest("utterance", 2, 10, "parquet"), flush_interval_s=0)
    table = kd.make_table(["a"], 10, 2, "utterance")
    seen_segments = []
    for i in range(40):
        w.write_shard(f"s{i:03d}", f"/in/s{i:03d}", table, [])  # saved at once (interval 0)
        c = kd.load_json(kd.manifest_path(run))["commits"]
        if c["log"]:
            last = tmp_path / "run" / c["log"][-1]
            seen_segments.append(len(last.read_text().splitlines()))
        assert len(c["log"]) <= commitlog.MAX_SEGMENTS
        assert len(c["log"]) <= 2 + (c.get("index_records") or 0)  # folded as the log outgrows the index
        assert len(SoftTargetRun(run).shard_names) == i + 1
    assert set(seen_segments) == {1}  # every segment held just the one new record
    w.close()
    c = kd.load_json(kd.manifest_path(run))["commits"]
    assert c["index"] and c["log"] == [] and len(kd.records(run)) == 40
    assert sorted(p.name for p in (tmp_path / "run" / "_commits").iterdir()) == [c["index"].split("/")[-1]]


def test_a_second_writer_is_refused_while_the_first_is_alive(tmp_path, kd):
    from pipeline.shards import LeaseHeld

    run = str(tmp_path / "run")
    w = RunWriter(run, kd.make_manifest("utterance", 2, 10, "parquet"))
    with pytest.raises(LeaseHeld, match="being written by"):
        RunWriter(run, kd.make_manifest("utterance", 2, 10, "parquet"))
    w.close()
    RunWriter(run, kd.make_manifest("utterance", 2, 10, "parquet")).close()  # free again


def test_writer_refuses_a_table_that_does_not_match_the_manifest(tmp_path, kd):
    from pipeline.shards import FormatError

    run = str(tmp_path / "run")
    w = RunWriter(run, kd.make_manifest("utterance", 3, 10, "parquet"))
    with pytest.raises(FormatError, match="do not match"):
        w.write_shard("s1", "/in/s1", kd.make_table(["a"], 10, 5, "utterance"), [])
    with pytest.raises(FormatError, match="do not match"):
        w.write_shard("s1", "/in/s1", kd.make_table(["a"], 300, 3, "utterance"), [])
    assert not (tmp_path / "run" / "shards").exists() or not list((tmp_path / "run" / "shards").iterdir())
    assert SoftTargetRun(run).shard_names == []


@pytest.mark.parametrize("level", LEVELS)
def test_table_from_topk_equals_the_per_row_path(kd, level):
    """The teacher actors' vectorised table equals the per-row construction, padding dropped."""
    from pipeline.shards.schema import table_from_topk

    frames = [3, 0, 5, 1] if level == "frame" else None
    topk, nf = kd.make_topk(4, 300, 5, level, frames, seed=9)
    keys = ["a", "b.c", "d", "e"]
    want = table_from_rows(keys, rows_from_topk(topk, 300, nf), level, 5, 300)
    got = table_from_topk(keys, topk, level, 5, 300, nf)
    assert got.equals(want)
