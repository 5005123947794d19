"""Clients that know nothing about kdpipe read what RunWriter writes: pyarrow, pandas, DuckDB, webdataset."""

from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import webdataset

from pipeline.shards import LEVELS, SoftTargetRun

C, K = 300, 5  # 300 classes: ids are uint16
SHARDS = {"shard-0000": ["a0", "a1", "a2", "a3"], "shard-0001": ["b0", "b1", "b2"]}


@pytest.fixture(scope="module", params=LEVELS)
def parquet_run(request, tmp_path_factory, kd):
    run = str(tmp_path_factory.mktemp("pq") / "run")
    kd.write_run(run, "parquet", request.param, K, C, SHARDS, frames=3)
    return run, SoftTargetRun(run)


@pytest.fixture(scope="module", params=LEVELS)
def tar_run(request, tmp_path_factory, kd):
    run = str(tmp_path_factory.mktemp("wds") / "run")
    kd.write_run(run, "webdataset", request.param, K, C, SHARDS, frames=3)
    return run, SoftTargetRun(run)


def rows_of(ours: dict, i: int, level: str) -> dict:
    """Row i of our read_numpy() output, per-frame arrays for frame level."""
    if level == "utterance":
        return {c: ours[c][i] for c in ours if c != "key"}
    lo, hi = ours["offsets"][i], ours["offsets"][i + 1]
    out = {c: ours[c][lo:hi] for c in ("ids", "logprobs", "logsumexp", "argmax", "confidence", "entropy")}
    out["num_frames"] = ours["num_frames"][i]
    return out


def test_pyarrow_and_pandas(parquet_run):
    run, r = parquet_run
    level = r.manifest.level
    for name, keys in SHARDS.items():
        path = os.path.join(run, "shards", f"{name}.parquet")
        table = pq.read_table(path)
        facts = json.loads(table.schema.metadata[b"kdpipe"])
        assert facts["k"] == K and facts["num_classes"] == C and facts["level"] == level
        assert facts["fingerprint"] == r.manifest.fingerprint and facts["input"] == f"/data/in/{name}.tar"
        expected_cols = ["key", "ids", "logprobs", "logsumexp", "argmax", "confidence", "entropy"]
        if level == "frame":
            expected_cols.insert(1, "num_frames")
        assert table.column_names == expected_cols
        df = table.to_pandas()
        assert df["key"].tolist() == keys
        ours = r.read_numpy(name)
        for i in range(len(keys)):
            want = rows_of(ours, i, level)
            if level == "utterance":
                ids, lp = np.asarray(df["ids"][i]), np.asarray(df["logprobs"][i])
                assert ids.dtype == np.uint16 and lp.dtype == np.float16
                assert df["logsumexp"][i] == want["logsumexp"] and df["argmax"][i] == want["argmax"]
            else:
                assert df["num_frames"][i] == want["num_frames"]
                ids = np.stack(df["ids"][i]) if want["num_frames"] else np.zeros((0, K), np.uint16)
                lp = np.stack(df["logprobs"][i]) if want["num_frames"] else np.zeros((0, K), np.float16)
                np.testing.assert_array_equal(np.asarray(df["logsumexp"][i], np.float32), want["logsumexp"])
            np.testing.assert_array_equal(ids.astype(np.int64), want["ids"].astype(np.int64))
            np.testing.assert_array_equal(lp.astype(np.float16), want["logprobs"])


def test_pyarrow_dataset_reads_the_whole_run(parquet_run):
    run, r = parquet_run
    ds = pads.dataset(os.path.join(run, "shards"), format="parquet")
    assert ds.count_rows() == sum(len(v) for v in SHARDS.values()) == r.manifest.total_rows
    assert sorted(ds.to_table(columns=["key"]).column("key").to_pylist()) == sorted(sum(SHARDS.values(), []))


def test_duckdb(parquet_run):
    run, r = parquet_run
    level = r.manifest.level
    glob = os.path.join(run, "shards", "*.parquet")
    con = duckdb.connect()
    assert con.execute("SELECT count(*) FROM read_parquet(?)", [glob]).fetchone()[0] == 7
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet(?))",
                             [glob]).fetchall())
    assert types["argmax"] == ("USMALLINT[]" if level == "frame" else "USMALLINT")
    for name, keys in SHARDS.items():
        ours = r.read_numpy(name)
        path = os.path.join(run, "shards", f"{name}.parquet")
        for i, key in enumerate(keys):
            want = rows_of(ours, i, level)
            ids, lp, lse, am = con.execute(
                "SELECT ids, logprobs, logsumexp, argmax FROM read_parquet(?) WHERE key = ?", [path, key]
            ).fetchone()
            if level == "utterance":
                assert ids == want["ids"].tolist()  # uint16 -> Python ints
                assert lp == want["logprobs"].astype(np.float64).tolist()  # float16 is exact in float32/64
                assert lse == float(want["logsumexp"]) and am == int(want["argmax"])
                # a computation in SQL: probability mass kept by the top-k (sum of exp(logprob))
                kept = con.execute("SELECT sum(exp(lp)) FROM (SELECT unnest(logprobs) AS lp FROM read_parquet(?) "
                                   "WHERE key = ?)", [path, key]).fetchone()[0]
                assert kept == pytest.approx(np.exp(want["logprobs"].astype(np.float64)).sum(), rel=1e-6)
                assert kept <= 1.0 + 1e-3
            else:
                assert ids == want["ids"].tolist() and lp == want["logprobs"].astype(np.float64).tolist()
                assert lse == want["logsumexp"].tolist() and am == want["argmax"].tolist()
                nf = con.execute("SELECT num_frames, len(ids) FROM read_parquet(?) WHERE key = ?", [path, key]).fetchone()
                assert nf == (want["num_frames"], want["num_frames"])


def test_webdataset(tar_run):
    run, r = tar_run
    level = r.manifest.level
    for name, keys in SHARDS.items():
        url = os.path.join(run, "shards", f"{name}.tar")
        samples = list(webdataset.WebDataset(url, shardshuffle=False).decode())
        assert [s["__key__"] for s in samples] == keys
        ours = r.read_numpy(name)
        members = {"ids.npy", "logprobs.npy", "logsumexp.npy", "argmax.npy", "confidence.npy", "entropy.npy"}
        if level == "frame":
            members.add("num_frames.npy")
        for i, s in enumerate(samples):
            assert set(s) - {"__key__", "__url__", "__local_path__"} == members
            want = rows_of(ours, i, level)
            assert s["ids.npy"].dtype == np.uint16 and s["logprobs.npy"].dtype == np.float16
            assert s["logsumexp.npy"].dtype == np.float32 and s["argmax.npy"].dtype == np.uint16
            shape = (want["num_frames"], K) if level == "frame" else (K,)
            assert s["ids.npy"].shape == shape and s["logprobs.npy"].shape == shape
            for c in ("ids", "logprobs", "logsumexp", "argmax", "confidence", "entropy"):
                np.testing.assert_array_equal(s[f"{c}.npy"], want[c], err_msg=c)
            if level == "frame":
                assert s["num_frames.npy"].dtype == np.int32 and int(s["num_frames.npy"]) == want["num_frames"]


# ---- the snippets in docs/format.md work as written --------------------------------------------

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "format.md")


def doc_blocks(lang: str) -> list[str]:
    with open(DOC) as f:
        text = f.read()
    parts = text.split(f"```{lang}\n")[1:]
    return [p.split("```", 1)[0] for p in parts]


def python_block(containing: str) -> str:
    (block,) = [b for b in doc_blocks("python") if containing in b]
    return block


def test_doc_targets_function_matches_kdpipe():
    import torch

    from pipeline.softtargets import dense_targets, topk_from_logits

    ns: dict = {}
    exec(python_block("def targets("), ns)  # noqa: S102
    z = torch.randn(4, 3, 40, generator=torch.Generator().manual_seed(0)) * 3
    t = topk_from_logits(z, 10)
    for temperature in (0.5, 1.0, 4.0):
        for kp in (1, 4, 10):
            for tail in ("renormalize", "spread"):
                ours = dense_targets(t.ids, t.logprobs, 40, temperature, k=kp, tail=tail).numpy()
                theirs = ns["targets"](t.ids.numpy(), t.logprobs.numpy(), 40, T=temperature, kprime=kp, tail=tail)
                np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-7)
    exact = ns["targets"](topk_from_logits(z, 40).ids.numpy(), topk_from_logits(z, 40).logprobs.numpy(), 40, T=2.0)
    np.testing.assert_allclose(exact, torch.softmax(z.double() / 2, -1).numpy(), rtol=1e-5, atol=1e-8)


def test_doc_parquet_snippets(parquet_run):
    run, r = parquet_run
    ns = {"run": run, "os": os}
    exec(python_block("def targets("), ns)  # noqa: S102
    exec(python_block("records = {}"), ns)  # noqa: S102  (which shards are complete, checksums)
    assert sorted(ns["records"]) == sorted(SHARDS)
    exec(python_block("pq.read_table"), ns)  # noqa: S102
    ours = r.read_numpy("shard-0000")
    np.testing.assert_array_equal(ns["ids"], ours["ids"])
    np.testing.assert_array_equal(ns["lp"], ours["logprobs"])
    assert list(ns["df"]["key"]) == SHARDS["shard-0000"]
    if r.manifest.level == "frame":
        np.testing.assert_array_equal(ns["offsets"], ours["offsets"])
    assert ns["p_T2"].shape == (len(ours["ids"]), C)
    con = duckdb.connect()
    (sql,) = doc_blocks("sql")
    statements = [s for s in sql.replace("RUN/shards", os.path.join(run, "shards")).split(";") if s.strip()]
    assert len(statements) == 3
    runs_at_level = {0: r.manifest.level == "utterance", 1: r.manifest.level == "utterance", 2: r.manifest.level == "frame"}
    for i, stmt in enumerate(statements):
        if not runs_at_level[i]:
            continue
        rows = con.execute(stmt.replace("'utt-0001'", "'a1'")).fetchall()
        assert rows, stmt
        if i == 1:  # renormalised targets at T=2 sum to 1 per key
            sums = {}
            for key, _, p in rows:
                sums[key] = sums.get(key, 0) + p
            assert len(sums) == 7 and all(abs(v - 1) < 1e-9 for v in sums.values())


def test_doc_tar_snippets(tar_run):
    run, r = tar_run
    ours = r.read_numpy("shard-0000")
    ns = {"run": run, "os": os}
    exec(python_block("wds.WebDataset"), ns)  # noqa: S102
    assert ns["key"] == SHARDS["shard-0000"][-1]
    exec(python_block("tarfile.open"), ns)  # noqa: S102
    samples = ns["samples"]
    assert list(samples) == SHARDS["shard-0000"]
    for i, key in enumerate(samples):
        want = rows_of(ours, i, r.manifest.level)
        np.testing.assert_array_equal(samples[key]["ids"], want["ids"])
        np.testing.assert_array_equal(samples[key]["logprobs"], want["logprobs"])
