"""The teacher stage's pieces without Ray: decode, the predictor writing parts, the driver's
accounting, compaction. (tests/teacher/test_pseudo_label.py runs them together on Ray.)"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.modalities import preprocessing_from_dict
from pipeline.shards import RunWriter, SoftTargetRun
from pipeline.teacher.accounting import END, PART, key_hash
from pipeline.teacher.commit import Progress, ShardTracker
from pipeline.teacher.compact import compact_shard
from pipeline.teacher.decode import DecodeShards, ERROR, SAMPLE
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
    keys = [k for k, kind in zip(rows.column("key").to_pylist(), kinds) if kind != 2]
    assert sorted(keys) == sorted([*waves, "bad"])
    (end,) = np.nonzero(kinds == 2)[0]
    assert end == len(kinds) - 1
    assert rows.column("count")[int(end)].as_py() == 8
    assert rows.column("key_hash")[int(end)].as_py() == key_hash(keys)
    for t in tables:  # each bucket is sorted by length: little padding per teacher batch
        lengths = [n for n, kind in zip(t.column("length").to_pylist(), t.column("kind").to_pylist()) if kind == SAMPLE]
        assert lengths == sorted(lengths)
    assert [r for r, k in zip(rows.column("reason").to_pylist(), kinds) if k == ERROR] == ["corrupt_audio"]


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
    parts = [r for t in records for r in t.to_pylist() if r["kind"] == PART]
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
    end = records_table([{"shard": "s", "kind": END, "rows": 4, "key_hash": key_hash(["a", "b", "c", "d"])}])
    part = records_table([{"shard": "s", "kind": PART, "part": "p", "rows": 2, "errors": 0, "frames": 0,
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
