"""The student's input path without Ray: collate, the shard join, what opening a run costs,
and seeds that seed."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.modalities import preprocessing_from_dict
from pipeline.shards import RunWriter, SoftTargetRun, rows_from_topk, table_from_rows
from pipeline.softtargets import topk_from_logits
from pipeline.student.collate import collate
from pipeline.student.data import LP_PAD, PairingError, ShardRows, train_schema
from pipeline.student.plan import DataPlan
from tests.helpers import image_bytes, write_tar

IMG = {"modality": "image", "resize": 4, "crop": 4}


def _data(level="utterance", modality="image", k=3, num_classes=7, **over) -> DataPlan:
    prep = preprocessing_from_dict(IMG if modality == "image" else {"modality": "audio"})
    return DataPlan(modality=modality, level=level, preprocessing=prep, num_classes=num_classes, stored_k=k, **over)


def _targets(keys, level, k, C, frames=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if level == "frame":
        logits = torch.randn(len(keys), max(frames), C, generator=g)
        rows = rows_from_topk(topk_from_logits(logits, k), C, np.asarray(frames))
    else:
        rows = rows_from_topk(topk_from_logits(torch.randn(len(keys), C, generator=g), k), C)
    return table_from_rows(keys, rows, level, k, C)


def test_collate_utterance_rows_with_and_without_targets():
    data = _data()
    rows = ShardRows(data)
    from pipeline.student.data import _Block

    imgs = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    st = _targets(["a", "b"], "utterance", 3, 7)
    pseudo, labeled = _Block(), _Block()
    pseudo.keys, pseudo.arrays, pseudo.labels = ["a", "b"], imgs[:2], [-1, -1]
    labeled.keys, labeled.arrays, labeled.labels = ["c"], imgs[2:], [5]
    table = pa.concat_tables([rows._table(pseudo, 0, st), rows._table(labeled, 1)])
    assert table.schema == train_schema(data)
    b = collate(table, data)
    assert b["x"].shape == (3, 4, 4, 3) and b["x"][:, 0, 0, 0].tolist() == [0, 1, 2]
    assert b["has_t"].tolist() == [True, True, False] and b["label"].tolist() == [-1, -1, 5]
    cols = {c: st.column(c).combine_chunks() for c in st.column_names}
    ids = cols["ids"].flatten().to_numpy().reshape(2, 3)
    lp = cols["logprobs"].flatten().to_numpy().reshape(2, 3)
    assert torch.equal(b["t_ids"][:2], torch.from_numpy(ids.astype(np.int64)))
    assert torch.equal(b["t_lp"][:2], torch.from_numpy(lp.astype(np.float32)))
    assert (b["t_lp"][2] == LP_PAD).all() and (b["t_ids"][2] == 0).all()
    assert b["t_lse"][:2].tolist() == cols["logsumexp"].to_numpy().tolist()
    assert b["flabels"].shape == (3, 0)


def test_collate_frame_rows_pads_every_ragged_column():
    data = _data("frame", "audio", k=2, num_classes=5)
    rows = ShardRows(data)
    from pipeline.student.data import _Block

    waves = [np.arange(n, dtype=np.float32) + 1 for n in (5, 3)]
    st = _targets(["a", "b"], "frame", 2, 5, frames=[4, 2])
    pseudo = _Block()
    pseudo.keys, pseudo.arrays, pseudo.labels = ["a", "b"], waves, [-1, -1]
    lab = _Block()
    lab.keys, lab.arrays, lab.labels, lab.flabels = ["c"], [np.ones(2, np.float32)], [-1], [np.array([1, 0, 1], np.int16)]
    pseudo.flabels = [np.zeros(0, np.int16)] * 2
    b = collate(pa.concat_tables([rows._table(pseudo, 0, st), rows._table(lab, 1)]), data)
    assert b["x"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 0, 0], [1, 1, 0, 0, 0]]
    assert b["lengths"].tolist() == [5, 3, 2] and b["t_frames"].tolist() == [4, 2, 0]
    assert b["t_ids"].shape == (3, 4, 2) and b["t_lp"].shape == (3, 4, 2) and b["t_conf"].shape == (3, 4)
    assert (b["t_lp"][1, 2:] == LP_PAD).all() and (b["t_lp"][2] == LP_PAD).all()
    got = st.column("logprobs").combine_chunks().flatten().flatten().to_numpy().reshape(-1, 2)
    assert torch.equal(b["t_lp"][0], torch.from_numpy(got[:4].astype(np.float32)))
    assert torch.equal(b["t_lp"][1, :2], torch.from_numpy(got[4:6].astype(np.float32)))
    assert b["flabels"].tolist() == [[-1, -1, -1], [-1, -1, -1], [1, 0, 1]]
    assert b["has_t"].tolist() == [True, True, False]
    # --pad-ms: the width rounds up to the pad multiple; values, lengths and targets do not change
    b4 = collate(pa.concat_tables([rows._table(pseudo, 0, st), rows._table(lab, 1)]), replace(data, pad_samples=4))
    assert b4["x"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [1, 2, 3, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert b4["lengths"].tolist() == [5, 3, 2] and torch.equal(b4["t_lp"], b["t_lp"])


def _image_run(tmp_path, keys_in_run, errors=(), seed=0):
    """A soft-target run with one shard 's' of the given keys (+ error keys) and its input tar."""
    from pipeline.fingerprint import fingerprint
    from pipeline.shards import Manifest

    rng = np.random.default_rng(seed)
    prep = preprocessing_from_dict(IMG).to_dict()
    m = Manifest(fingerprint=fingerprint([{"t": 1}], prep, 3, "utterance"), teacher={}, modality="image",
                 level="utterance", preprocessing=prep, k=3, num_classes=7, encoding="parquet", id_dtype="uint8")
    w = RunWriter(str(tmp_path / "run"), m)
    st = _targets(sorted(keys_in_run), "utterance", 3, 7, seed=seed)
    w.write_shard("s", str(tmp_path / "s.tar"), st, [{"key": k, "input": "x", "reason": "r", "detail": ""}
                                                    for k in errors])
    w.close()
    return SoftTargetRun(str(tmp_path / "run")), st, rng


def test_the_shard_join_pairs_by_key_and_checks_both_sides(tmp_path):
    run, st, rng = _image_run(tmp_path, ["a", "b", "c"], errors=["d"])
    imgs = {k: rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for k in "cbad"}
    samples = [(k, {"png": image_bytes(imgs[k])}) for k in "cba"] + [("d", {"png": b"corrupt"})]
    write_tar(tmp_path / "s.tar", samples)
    data = _data()
    rows = ShardRows(data, run.uri, run.facts)
    rec = run.record("s")
    (table,) = rows.pseudo("s", str(tmp_path / "s.tar"), rec)
    assert table.column("key").to_pylist() == ["c", "b", "a"]  # input order, each with its own targets
    b = collate(table, data)
    for i, key in enumerate("cba"):
        j = st.column("key").to_pylist().index(key)
        assert b["t_ids"][i].tolist() == st.column("ids")[j].as_py()
        assert np.array_equal(b["x"][i].numpy(), imgs[key])
    # an input key the teacher never saw, that is not in the errors table
    write_tar(tmp_path / "s.tar", samples + [("e", {"png": image_bytes(imgs["a"])})])
    with pytest.raises(PairingError, match="'e'.*no soft target"):
        list(rows.pseudo("s", str(tmp_path / "s.tar"), rec))
    # a soft-target key missing from the input
    write_tar(tmp_path / "s.tar", samples[1:])
    with pytest.raises(PairingError, match="1 soft-target key.*'c'"):
        list(rows.pseudo("s", str(tmp_path / "s.tar"), rec))


def test_opening_a_500_shard_run_for_training_reads_each_shard_once(tmp_path):
    """The driver opens the run in a constant number of reads; every shard task reads its own
    two files and nothing of the run besides: reads = 2 x shards + a constant, not shards^2."""
    from pipeline.fingerprint import fingerprint
    from pipeline.shards import Manifest
    from pipeline.student.job import build_parser, plan

    n = 500
    prep = preprocessing_from_dict(IMG).to_dict()
    m = Manifest(fingerprint=fingerprint([{"t": 1}], prep, 3, "utterance"), teacher={}, modality="image",
                 level="utterance", preprocessing=prep, k=3, num_classes=7, encoding="parquet", id_dtype="uint8")
    run = tmp_path / "run"
    w = RunWriter(str(run), m, flush_interval_s=3600)
    png = image_bytes(np.zeros((4, 4, 3), np.uint8))
    for i in range(n):
        write_tar(tmp_path / f"in-{i:04d}.tar", [(f"k{i}", {"png": png})])
        w.write_shard(f"in-{i:04d}", str(tmp_path / f"in-{i:04d}.tar"), _targets([f"k{i}"], "utterance", 3, 7), [])
    w.close()

    opened = []

    def hook(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].startswith(str(run)):
            opened.append(args[0])

    sys.addaudithook(hook)  # (audit hooks cannot be removed: it only ever appends to a list)
    args = build_parser().parse_args(["--soft-targets", str(run), "--student",
                                      "pipeline.models.zoo:image_cnn?width=2&num_classes=7", "--output",
                                      str(tmp_path / "o")])
    setup = plan(args)
    sp, tasks, cache = setup.plan, setup.tasks, setup.cache
    driver_opens = len(opened)
    assert driver_opens <= 3, opened  # manifest.json + the index (the listing for sizes opens nothing)
    rows = ShardRows(sp.data, cache.uri, cache.facts)
    for t in tasks:
        batch = {c: [v] for c, v in t.to_row().items()}
        assert sum(tb.num_rows for tb in rows(batch)) == 1
    task_opens = opened[driver_opens:]
    assert len(task_opens) == 2 * n  # each shard's soft targets and errors file, once
    assert not [p for p in task_opens if p.endswith(".json") or p.endswith(".jsonl")]
    opened.clear()
    opened.append("done")  # later tests' opens are no longer of this run


def test_the_seed_chooses_the_initial_weights(tmp_path):
    """--seed seeds the student: two seeds give two initialisations, one seed the same one
    (through the plan the workers get)."""
    from pipeline.student.job import build_parser, plan
    from pipeline.student.train import initial_model
    from tests.helpers import audio_corpus

    audio_corpus(tmp_path / "lab", shards=1, per_shard=2)

    def weights(seed: int) -> dict:
        args = build_parser().parse_args(["--labeled", str(tmp_path / "lab"), "--student",
                                          "pipeline.models.zoo:audio_cnn?width=4", "--output", str(tmp_path / "o"),
                                          "--seed", str(seed)])
        sp = plan(args).plan
        assert sp.optim.seed == seed
        return {k: v.clone() for k, v in initial_model(sp).state_dict().items()}

    a, a2, b = weights(1), weights(1), weights(2)
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    json.dumps(asdict(plan(build_parser().parse_args(
        ["--labeled", str(tmp_path / "lab"), "--student", "pipeline.models.zoo:audio_cnn?width=4", "--output",
         str(tmp_path / "o")])).plan.optim))  # the plan is plain data
