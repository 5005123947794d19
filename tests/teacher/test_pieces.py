"""The teacher stage's pieces without Ray: decode, the predictor writing parts, the driver's
accounting, compaction. (tests/teacher/test_pseudo_label.py runs them together on Ray.)"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.modalities import preprocessing_from_dict
from pipeline.shards import RunWriter, SoftTargetRun
from pipeline.teacher.accounting import Record, Row, key_hash
from pipeline.teacher.commit import Progress, ShardTracker
from pipeline.teacher.compact import compact_shard
from pipeline.teacher.decode import DecodeShards
from pipeline.teacher.plan import TeacherPlan
from pipeline.teacher.predictor import TeacherPredictor
from tests.helpers import flac_bytes, tone, write_tar

TEACHER = "pipeline.models.zoo:audio_cnn?width=8"


@pytest.fixture
def shard(tmp_path):
    rng = np.random.default_rng(3)
    waves = {f"k{i}": tone(rng, rng.uniform(0.3, 0.9)) for i in range(7)}
    samples = [(k, {"flac": flac_bytes(w)}) for k, w in waves.items()]
    samples.insert(3, ("bad", {"flac": b"not audio"}))
    write_tar(tmp_path / "s.tar", samples)
    return str(tmp_path / "s.tar"), waves


def _plan(tmp_path) -> tuple:
    import argparse

    from pipeline.teacher.job import build_parser
    from pipeline.teacher.plan import plan_teacher

    args = build_parser().parse_args(["--input", "x", "--output", "y", "--teacher", TEACHER, "--top-k", "4"])
    plan: TeacherPlan = plan_teacher(args, "unused")
    assert isinstance(args, argparse.Namespace)
    return plan


def test_decode_end_row_accounts_for_every_key(shard):
    uri, waves = shard
    prep = preprocessing_from_dict({"modality": "audio"})
    tables = list(DecodeShards(prep, bucket_rows=3).shard("s", uri))
    assert len(tables) >= 3  # buckets of 3 samples, the last one carrying END
    rows = pa.concat_tables(tables)
    kinds = rows.column("kind").to_numpy()
    keys = [k for k, kind in zip(rows.column("key").to_pylist(), kinds) if kind != Row.END]
    assert sorted(keys) == sorted([*waves, "bad"])
    (end,) = np.nonzero(kinds == Row.END)[0]
    assert end == len(kinds) - 1
    assert rows.column("count")[int(end)].as_py() == 8
    assert rows.column("key_hash")[int(end)].as_py() == key_hash(keys)
    for t in tables:  # each bucket is sorted by length: little padding per teacher batch
        lengths = [n for n, kind in zip(t.column("length").to_pylist(), t.column("kind").to_pylist()) if kind == Row.SAMPLE]
        assert lengths == sorted(lengths)
    assert [r for r, k in zip(rows.column("reason").to_pylist(), kinds) if k == Row.ERROR] == ["corrupt_audio"]


def test_predictor_parts_tracker_and_compaction(shard, tmp_path):
    """Decode -> predictor (writes parts, returns records) -> tracker (adds up, compacts through a
    synchronous stand-in for the Ray task, commits) -> a shard equal to a direct computation."""
    uri, waves = shard
    plan = _plan(tmp_path)
    run = str(tmp_path / "run")
    writer = RunWriter(run, plan.manifest("parquet"))
    facts = writer.manifest.facts()
    decoded = list(DecodeShards(plan.preprocessing, bucket_rows=3).shard("s", uri))
    predictor = TeacherPredictor(plan.specs, plan.trust, plan.preprocessing, facts, run, precision="fp32", device="cpu")
    # teacher batches that straddle decode blocks, in another order than decoded
    rows = pa.concat_tables(decoded)
    batches = [rows.slice(5, 4), rows.slice(0, 5)]
    records = [predictor(b) for b in batches]
    parts = [r for t in records for r in t.to_pylist() if r["kind"] == Record.PART]
    assert len(parts) == 2 and all((tmp_path / "run" / p["part"]).exists() for p in parts)
    assert sum(p["rows"] + p["errors"] for p in parts) == 8
    assert sum(t.nbytes for t in records) < 2000  # records, not soft targets, go to the driver

    compacted, results = [], {}

    def compact(name, input_uri, part_files, expected, expected_hash):
        compacted.append(name)
        results[len(compacted)] = compact_shard(run, facts, name, input_uri, part_files, expected, expected_hash)
        return len(compacted)

    def wait(handles, timeout):
        return [(h, results[h]) for h in handles], []

    tracker = ShardTracker(writer, {"s": (uri, 100)}, Progress(1, 100, 0, 3600), compact, wait)
    tracker.add(records[1])  # END is in the second batch's records here: not whole yet
    assert not compacted
    tracker.add(records[0])
    tracker.finish()
    assert compacted == ["s"] and tracker.error_reasons == {"corrupt_audio": 1}
    writer.close()
    assert not (tmp_path / "run" / "_parts").exists()  # consumed
    r = SoftTargetRun(run)
    t = r.read_table("s")
    assert t.column("key").to_pylist() == sorted(waves)  # sorted: the same bytes on every rerun
    assert [e["reason"] for e in r.errors().to_pylist()] == ["corrupt_audio"]
    from tests.helpers import assert_topk_matches, direct_logprobs

    cols = r.read_numpy("s")
    refs = direct_logprobs(TEACHER, r.manifest.preprocessing, [waves[k] for k in cols["key"]])
    for i in range(len(refs)):
        assert_topk_matches(cols["ids"][i], cols["logprobs"][i], refs[i])


def test_tracker_refuses_a_shard_whose_parts_do_not_add_up(tmp_path):
    plan = _plan(tmp_path)
    writer = RunWriter(str(tmp_path / "run"), plan.manifest("parquet"))
    from pipeline.teacher.accounting import records_table

    tracker = ShardTracker(writer, {"s": ("/in/s.tar", 1)}, Progress(1, 1, 0, 3600), None, None)
    # a part came twice (a retried task's leftovers): the count may match, the key hash does not
    end = records_table([{"shard": "s", "kind": Record.END, "rows": 4, "key_hash": key_hash(["a", "b", "c", "d"])}])
    part = records_table([{"shard": "s", "kind": Record.PART, "part": "p", "rows": 2, "errors": 0, "frames": 0,
                           "key_hash": key_hash(["a", "b"])}])
    tracker.add(end)
    with pytest.raises(RuntimeError, match="key hash"):
        tracker.add(pa.concat_tables([part, part]))
    writer.close()
    assert SoftTargetRun(str(tmp_path / "run")).shard_names == []


def test_fingerprint_uses_the_effective_k(tmp_path):
    """--top-k above the classes is stored as k = classes, and fingerprinted so: a rerun with
    --top-k 10 is the same run."""
    from pipeline.teacher.job import build_parser
    from pipeline.teacher.plan import plan_teacher

    fps = []
    for k in ("100000", "10"):
        args = build_parser().parse_args(["--input", "x", "--output", "y", "--teacher", TEACHER, "--top-k", k])
        plan = plan_teacher(args, "unused")
        assert plan.k == 10
        fps.append(plan.fingerprint)
    assert fps[0] == fps[1]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_concurrent_calls_record_exactly_their_own_rows(tmp_path, device):
    """The predictor called from 4 threads at once, as Ray Data's actor concurrency calls it,
    with a teacher whose forward sleeps (the GIL released, as on a GPU), so one call's host work
    runs during another's forward: every call's records name exactly its own rows, each part
    holds what its record says, and the compacted shards are byte for byte those of one call
    at a time."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from pipeline.teacher.job import build_parser
    from pipeline.teacher.plan import plan_teacher

    rng = np.random.default_rng(5)
    uris = {}
    for s in range(2):
        samples = [(f"s{s}-{i}", {"flac": flac_bytes(tone(rng, rng.uniform(0.2, 0.6)))}) for i in range(9)]
        samples.insert(4, (f"s{s}-bad", {"flac": b"not audio"}))
        write_tar(tmp_path / f"s{s}.tar", samples)
        uris[f"s{s}"] = str(tmp_path / f"s{s}.tar")
    args = build_parser().parse_args(["--input", "x", "--output", "y", "--teacher",
                                      "tests.teacher_models:slow_audio_cnn?delay=0.05&width=8",
                                      "--trust-module", "tests.teacher_models", "--top-k", "3"])
    plan = plan_teacher(args, "unused")
    dec = DecodeShards(plan.preprocessing, bucket_rows=4)
    rows = pa.concat_tables([t for n, u in uris.items() for t in dec.shard(n, u)])
    order = np.random.default_rng(0).permutation(rows.num_rows)  # rows of both shards interleaved
    rows = rows.take(pa.array(order))
    batches = [rows.slice(i, 3) for i in range(0, rows.num_rows, 3)]

    def run(name: str, concurrency: int):
        out = str(tmp_path / name)
        writer = RunWriter(out, plan.manifest("parquet"))
        facts = writer.manifest.facts()
        pred = TeacherPredictor(plan.specs, plan.trust, plan.preprocessing, facts, out, precision="fp32",
                                device=device, concurrency=concurrency)
        spans = {"forward": [], "write": []}
        lock = threading.Lock()

        def timed(kind, fn):
            def inner(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    with lock:
                        spans[kind].append((t0, time.perf_counter(), threading.get_ident()))
            return inner

        pred.runner.predict = timed("forward", pred.runner.predict)
        pred._write_parts = timed("write", pred._write_parts)
        with ThreadPoolExecutor(concurrency) as pool:
            records = list(pool.map(pred, batches))
        return out, writer, facts, records, spans

    out, writer, facts, records, spans = run("concurrent", 4)
    # the calls did overlap: some call wrote its parts while another's forward ran
    assert any(w0 < f1 and f0 < w1 and wt != ft for f0, f1, ft in spans["forward"] for w0, w1, wt in spans["write"])
    seen: list[str] = []
    parts: dict[str, list[str]] = {}
    for batch, rec in zip(batches, records):
        kinds = batch.column("kind").to_numpy()
        for r in rec.to_pylist():
            mine = [k for k, s, kind in zip(batch.column("key").to_pylist(), batch.column("shard").to_pylist(), kinds)
                    if s == r["shard"] and kind != Row.END]
            if r["kind"] == Record.END:
                end = batch.filter(pa.array((kinds == Row.END) & (np.array(batch.column("shard").to_pylist()) == r["shard"])))
                assert (r["rows"], r["key_hash"]) == (end.column("count")[0].as_py(), end.column("key_hash")[0].as_py())
                continue
            part = pq.read_table(tmp_path / "concurrent" / r["part"])
            assert sorted(part.column("key").to_pylist()) == sorted(mine)  # this call's rows of that shard, no other
            assert r["key_hash"] == key_hash(mine)
            assert (r["rows"], r["errors"]) == (int(pc_count(part, Row.SAMPLE)), int(pc_count(part, Row.ERROR)))
            seen += mine
            parts.setdefault(r["shard"], []).append(r["part"])
    assert sorted(seen) == sorted(k for k, kind in zip(rows.column("key").to_pylist(), rows.column("kind").to_numpy())
                                  if kind != Row.END)  # every key once
    seq_out, seq_writer, seq_facts, seq_records, _ = run("sequential", 1)
    for name, uri in uris.items():
        end = rows.filter(pa.array((rows.column("kind").to_numpy() == Row.END)
                                   & (np.array(rows.column("shard").to_pylist()) == name)))
        count, h = end.column("count")[0].as_py(), end.column("key_hash")[0].as_py()
        compact_shard(out, facts, name, uri, parts[name], count, h)
        seq_parts = [r["part"] for rec in seq_records for r in rec.to_pylist() if r["kind"] == Record.PART and r["shard"] == name]
        compact_shard(seq_out, seq_facts, name, uri, seq_parts, count, h)
        for sub in ("shards", "errors"):
            assert (tmp_path / "concurrent" / sub / f"{name}.parquet").read_bytes() == \
                (tmp_path / "sequential" / sub / f"{name}.parquet").read_bytes()
    writer.abandon()
    seq_writer.abandon()


def pc_count(part: pa.Table, kind: int) -> int:
    return int((part.column("kind").to_numpy() == kind).sum())


def test_small_shards_are_decoded_a_few_per_task():
    from pipeline.teacher.job import DECODE_TASK_BYTES, DECODE_TASK_SHARDS, shards_per_decode_task

    assert shards_per_decode_task([150_000] * 1000, 2) == DECODE_TASK_SHARDS  # 1,000 thumbnail shards, 2 CPUs
    assert shards_per_decode_task([150_000] * 300, 2) == 18  # at least 8 tasks per CPU
    assert shards_per_decode_task([150_000] * 1000, 16) == 7  # at least 8 tasks per CPU
    assert shards_per_decode_task([4_000_000] * 24, 2) == 1  # few shards: one each
    assert shards_per_decode_task([300 << 20] * 10_000, 2) == 1  # large shards are never grouped
    assert shards_per_decode_task([100 << 20] * 10_000, 2) == DECODE_TASK_BYTES // (100 << 20)  # bytes cap
    assert shards_per_decode_task([], 8) == 1 and shards_per_decode_task([0] * 50, 0) == 6  # sizes unknown, no CPUs yet


def test_a_failed_call_gives_its_slot_back(shard, tmp_path):
    """A call that raises (Ray Data then retries the batch) leaves the actor usable: with one
    slot, the next call gets it and completes."""
    uri, _ = shard
    plan = _plan(tmp_path)
    writer = RunWriter(str(tmp_path / "run"), plan.manifest("parquet"))
    pred = TeacherPredictor(plan.specs, plan.trust, plan.preprocessing, writer.manifest.facts(), str(tmp_path / "run"),
                            precision="fp32", device="cpu", concurrency=1)
    batch = pa.concat_tables(list(DecodeShards(plan.preprocessing).shard("s", uri)))
    real = pred.runner.predict
    pred.runner.predict = lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory"):
        pred(batch)
    pred.runner.predict = real
    records = pred(batch).to_pylist()  # would wait forever for a slot that was not given back
    assert sum(r["rows"] + r["errors"] for r in records if r["kind"] == Record.PART) == 8
    writer.abandon()


def test_decode_workers_import_no_torch():
    """What a decode task imports stays torch-free (torch costs each worker ~1.2 s and ~300 MB)."""
    import subprocess
    import sys

    code = ("import sys, pipeline.teacher.decode, pipeline.teacher.compact, pipeline.inputs; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchaudio', 'torchvision')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[:500] + r.stderr[-2000:]
