"""Helpers shared by the cache-format tests (the `kd` fixture): build manifests and tables, write runs, edit records."""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.fingerprint import fingerprint
from pipeline.shards import Manifest, RunWriter, rows_from_topk, table_from_rows
from pipeline.shards.schema import id_dtype
from pipeline.softtargets import topk_from_logits


def make_manifest(level: str, k: int, num_classes: int, encoding: str, teacher: str = "teacher-a", **over) -> Manifest:
    teachers = [{"spec": teacher, "weights_sha256": "0" * 64}]
    pre = {"sample_rate": 16000, "n_mels": 64}
    fields = dict(
        fingerprint=fingerprint(teachers, pre, k, level), teacher={"members": teachers}, modality="audio",
        level=level, preprocessing=pre, k=k, num_classes=num_classes, encoding=encoding,
        id_dtype=id_dtype(num_classes).name, frame_shift_ms=10.0 if level == "frame" else None,
    )
    fields.update(over)
    return Manifest(**fields)


def make_topk(n: int, num_classes: int, k: int, level: str, frames: list[int] | None = None, seed: int = 0,
              scale: float = 3.0):
    """(TopK, num_frames or None) from random logits; frame level pads to max(frames)."""
    g = torch.Generator().manual_seed(seed)
    if level == "frame":
        t = max(frames, default=0)
        logits = torch.randn(n, t, num_classes, generator=g) * scale
        return topk_from_logits(logits, k), np.asarray(frames, dtype=np.int64)
    logits = torch.randn(n, num_classes, generator=g) * scale
    return topk_from_logits(logits, k), None


def make_table(keys: list[str], num_classes: int, k: int, level: str, frames: list[int] | None = None,
               seed: int = 0):
    topk, nf = make_topk(len(keys), num_classes, k, level, frames, seed)
    rows = rows_from_topk(topk, num_classes, nf)
    return table_from_rows(keys, rows, level, k, num_classes)


def write_run(path: str, encoding: str, level: str, k: int, num_classes: int, shards: dict[str, list[str]],
              frames: int = 3, errors: dict[str, list[dict]] | None = None):
    """Write a run with one shard per entry of ``shards`` (name -> keys); returns (run path, {name: table})."""
    w = RunWriter(path, make_manifest(level, k, num_classes, encoding))
    tables = {}
    for i, (name, keys) in enumerate(sorted(shards.items())):
        fr = [(j % (frames + 1)) for j in range(len(keys))] if level == "frame" else None
        tables[name] = make_table(keys, num_classes, k, level, fr, seed=i)
        w.write_shard(name, f"/data/in/{name}.tar", tables[name], (errors or {}).get(name, []))
    w.close()
    return path, tables


def manifest_path(run: str) -> str:
    return os.path.join(run, "manifest.json")


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def dump_json(path: str, d) -> None:
    with open(path, "w") as f:
        json.dump(d, f)


def edit_manifest(run: str, **fields) -> None:
    d = load_json(manifest_path(run))
    d.update(fields)
    dump_json(manifest_path(run), d)


def index_path(run: str) -> str:
    """The commit-log index a closed run's manifest names (its records, one JSON line each)."""
    commits = load_json(manifest_path(run))["commits"]
    assert commits["index"] and not commits["log"], "a closed run has one index and no segments"
    return os.path.join(run, commits["index"])


def records(run: str) -> dict[str, dict]:
    with open(index_path(run)) as f:
        return {d["name"]: d for d in map(json.loads, f.read().splitlines())}


def edit_record(run: str, shard: str, drop: tuple[str, ...] = (), **fields) -> None:
    """Change (or drop fields of) a shard's record in the commit log."""
    recs = records(run)
    recs[shard].update(fields)
    for f in drop:
        del recs[shard][f]
    with open(index_path(run), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs.values()))


def replace_shard(run: str, name: str, data: bytes) -> str:
    """Overwrite a shard file and make its record's bytes/sha256 agree with the new bytes."""
    rel = records(run)[name]["output"]
    path = os.path.join(run, rel)
    with open(path, "wb") as f:
        f.write(data)
    edit_record(run, name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return path


@pytest.fixture(scope="session")
def kd():
    """The helpers above, as one namespace."""
    return SimpleNamespace(
        make_manifest=make_manifest, make_topk=make_topk, make_table=make_table, write_run=write_run,
        manifest_path=manifest_path, load_json=load_json, dump_json=dump_json, edit_manifest=edit_manifest,
        edit_record=edit_record, replace_shard=replace_shard, index_path=index_path, records=records,
    )
