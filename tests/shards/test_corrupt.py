"""Corrupt, foreign or inconsistent input: a FormatError that names the file and the problem."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.shards import FingerprintMismatch, FormatError, LEVELS, RunWriter, SoftTargetRun, softtarget_schema
from pipeline.shards.schema import arrow_id_type

ENCODINGS = ("parquet", "webdataset")
EXT = {"parquet": "parquet", "webdataset": "tar"}
KEYS = [f"utt-{i}" for i in range(6)]


def read_all(run: str, name: str = "s0"):
    return SoftTargetRun(run).read_numpy(name)


def expect_error(run: str, path: str, *words: str, name: str = "s0", exc=FormatError):
    """Reading the run fails with ``exc`` whose message names ``path`` and contains one of ``words``."""
    with pytest.raises(exc) as info:
        read_all(run, name)
    msg = str(info.value)
    assert path in msg, f"error does not name the file {path}: {msg}"
    problem = msg.replace(os.path.dirname(path), "<dir>")  # the tmp dir holds the test's name: skip it
    assert any(w in problem for w in words), f"error does not say {words}: {msg}"
    return msg


def _make_run(tmp_path, kd, encoding, level):
    path = str(tmp_path / "run")
    kd.write_run(path, encoding, level, 5, 300, {"s0": KEYS}, frames=3)
    assert len(read_all(path)["key"]) == len(KEYS)  # intact before we break it
    return path, encoding, level


@pytest.fixture(params=[(e, lv) for e in ENCODINGS for lv in LEVELS], ids=lambda p: f"{p[0]}-{p[1]}")
def run(request, tmp_path, kd):
    """A run of one shard, for each encoding and level."""
    return _make_run(tmp_path, kd, *request.param)


@pytest.fixture(params=[("webdataset", "frame")], ids=lambda p: f"{p[0]}-{p[1]}")
def one_run(request, tmp_path, kd):
    """One run (the manifest checks do not depend on the encoding or level)."""
    return _make_run(tmp_path, kd, *request.param)


def shard_path(run: str, encoding: str) -> str:
    return os.path.join(run, "shards", f"s0.{EXT[encoding]}")


def tar_cut_points(data: bytes) -> list[int]:
    """Offsets inside a tar's content: mid-header, mid-data, member boundaries inside a sample, sample
    boundaries (where every sample before the cut is whole), and just before the end-of-archive marker."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    keys = [m.name.split(".", 1)[0] for m in members]
    content_end = members[-1].offset_data + -(-members[-1].size // 512) * 512
    cuts = {1, 511, 512, 513, content_end, content_end - 1}
    for i, m in enumerate(members[: 2 * (len(members) // len(set(keys))) + 1]):  # two samples and a bit
        cuts |= {m.offset, m.offset + 200, m.offset_data + m.size // 2}
    cuts |= {m.offset for i, m in enumerate(members) if i and keys[i] != keys[i - 1]}  # every sample boundary
    return sorted(c for c in cuts if 0 < c <= content_end)


# --- truncation ---------------------------------------------------------------------------------

def test_truncated_shard_is_caught_by_the_checksum(run, kd):
    path, encoding, _ = run
    sp = shard_path(path, encoding)
    with open(sp, "rb") as f:
        data = f.read()
    with open(sp, "wb") as f:
        f.write(data[: len(data) // 2])
    expect_error(path, sp, "truncated")


def test_changed_bytes_are_caught_by_the_checksum(run):
    path, encoding, _ = run
    sp = shard_path(path, encoding)
    with open(sp, "r+b") as f:
        f.seek(600)
        b = f.read(1)
        f.seek(600)
        f.write(bytes([b[0] ^ 0xFF]))
    expect_error(path, sp, "checksum")


def test_truncated_shard_is_caught_by_the_decoder(run, kd):
    """Manifest bytes/sha256 rewritten to match the cut file: the decoder itself must notice."""
    path, encoding, _ = run
    sp = shard_path(path, encoding)
    with open(sp, "rb") as f:
        data = f.read()
    if encoding == "parquet":
        cuts = [1, 4, 100, len(data) // 2, len(data) - 9, len(data) - 1]
    else:
        cuts = tar_cut_points(data)
    assert len(cuts) > 5
    for cut in cuts:
        kd.replace_shard(path, "s0", data[:cut])
        expect_error(path, sp, "truncated", "corrupt")
    kd.replace_shard(path, "s0", data)  # and the original still reads
    assert list(read_all(path)["key"]) == KEYS


def test_missing_shard_file(run):
    path, encoding, _ = run
    sp = shard_path(path, encoding)
    os.remove(sp)
    expect_error(path, sp, "missing")


# --- manifest -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"format_version": 3}, ("format_version",)),
    ({"format_version": 1}, ("format_version", "version 1 run")),
    ({"format_version": "2"}, ("format_version",)),
    ({"level": "sentence"}, ("level",)),
    ({"encoding": "csv"}, ("encoding",)),
    ({"k": 0}, ("k must be",)),
    ({"k": 301}, ("exceeds",)),
    ({"id_dtype": "uint8"}, ("id_dtype",)),
    ({"commits": []}, ("commits",)),
    ({"commits": {"index": "../../etc/passwd", "log": [], "seq": 1}}, ("not a file under _commits",)),
])
def test_manifest_with_bad_values(one_run, kd, change, words):
    path, _, _ = one_run
    kd.edit_manifest(path, **change)
    expect_error(path, kd.manifest_path(path), *words)


@pytest.mark.parametrize("field", ["format_version", "fingerprint", "k", "num_classes", "level", "commits"])
def test_manifest_with_a_missing_field(one_run, kd, field):
    path, _, _ = one_run
    d = kd.load_json(kd.manifest_path(path))
    del d[field]
    kd.dump_json(kd.manifest_path(path), d)
    msg = expect_error(path, kd.manifest_path(path), "missing")
    assert field in msg


def test_shard_record_with_a_missing_field(one_run, kd):
    path, _, _ = one_run
    kd.edit_record(path, "s0", drop=("sha256",))
    msg = expect_error(path, kd.index_path(path), "missing")
    assert "sha256" in msg and "s0" in msg


@pytest.mark.parametrize("change, words", [
    ({"output": "../../etc/passwd"}, ("output",)),
    ({"errors": "/etc/passwd"}, ("errors",)),
    ({"name": "../x"}, ("bad shard name",)),
    ({"rows": -1}, ("rows",)),
])
def test_shard_record_pointing_outside_the_run(one_run, kd, change, words):
    """A record can only name files inside its run directory."""
    path, _, _ = one_run
    kd.edit_record(path, "s0", **change)
    expect_error(path, kd.index_path(path), *words)


@pytest.mark.parametrize("text, words", [
    ("", ("not valid JSON",)),
    ('{"format": "kdpipe.softtargets", "k": ', ("not valid JSON",)),
    ("\x00\x01binary", ("not valid JSON",)),
    ('["a", "list"]', ("expected a JSON object",)),
    ('{"name": "librispeech", "version": "1.0", "files": []}', ("not a kdpipe soft-target manifest",)),
    ('{"format": "kdpipe.features", "format_version": 1}', ("not a kdpipe soft-target manifest",)),
])
def test_manifest_not_json_or_foreign(one_run, kd, text, words):
    path, _, _ = one_run
    with open(kd.manifest_path(path), "w") as f:
        f.write(text)
    expect_error(path, kd.manifest_path(path), *words)
    with pytest.raises(FormatError):  # a writer refuses it too, rather than overwriting it
        RunWriter(path, kd.make_manifest("utterance", 5, 300, "parquet"))


def test_no_manifest(tmp_path):
    with pytest.raises(FormatError, match="no manifest") as info:
        SoftTargetRun(str(tmp_path))
    assert str(tmp_path / "manifest.json") in str(info.value)


def test_unreadable_commit_file(one_run, kd):
    path, _, _ = one_run
    index = kd.index_path(path)
    with open(index, "w") as f:
        f.write('{"name": "s0", "rows": ')
    expect_error(path, index, "not valid JSON")
    with open(index, "w") as f:
        f.write('["not", "a", "record"]\n')
    expect_error(path, index, "must be an object")
    os.remove(index)
    expect_error(path, index, "missing")


# --- shard vs manifest ----------------------------------------------------------------------------

def test_shard_schema_does_not_match_manifest_k(run, kd):
    """Written with k=5; the manifest is edited to say k=3."""
    path, encoding, _ = run
    kd.edit_manifest(path, k=3)
    msg = expect_error(path, shard_path(path, encoding), "manifest")
    assert "k=3" in msg or "k=5" in msg or "[3]" in msg


def test_shard_schema_does_not_match_manifest_num_classes(run, kd):
    """Written with 300 classes (uint16 ids); the manifest is edited to 200 classes (uint8 ids)."""
    path, encoding, _ = run
    kd.edit_manifest(path, num_classes=200, id_dtype="uint8")
    msg = expect_error(path, shard_path(path, encoding), "manifest")
    assert "num_classes" in msg or "uint8" in msg


def test_shard_schema_does_not_match_manifest_level(run, kd):
    path, encoding, level = run
    other = "frame" if level == "utterance" else "utterance"
    kd.edit_manifest(path, level=other, frame_shift_ms=10.0)
    expect_error(path, shard_path(path, encoding), "manifest")


def test_parquet_shard_from_another_run(tmp_path, kd):
    """A shard copied in from a run with another fingerprint is caught by its schema metadata."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    kd.write_run(a, "parquet", "utterance", 5, 300, {"s0": KEYS})
    w = RunWriter(b, kd.make_manifest("utterance", 5, 300, "parquet", teacher="teacher-b"))
    w.write_shard("s0", "/in", kd.make_table(KEYS, 300, 5, "utterance"), [])
    w.close()
    with open(os.path.join(b, "shards", "s0.parquet"), "rb") as f:
        kd.replace_shard(a, "s0", f.read())
    expect_error(a, shard_path(a, "parquet"), "fingerprint")


def foreign_parquet_with_ids(level: str, k: int, num_classes: int, ids_value: int, facts: dict | None) -> bytes:
    """A Parquet file written with plain pyarrow: the canonical schema, but class ids set to ``ids_value``."""
    schema = softtarget_schema(level, k, num_classes)
    n = 2
    id_type = arrow_id_type(num_classes)
    ids = pa.array(np.full(n * k, ids_value, dtype=id_type.to_pandas_dtype()))
    ids_col = pa.FixedSizeListArray.from_arrays(ids, k)
    lp = pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * k, -1.0, np.float16)), k)
    lse = pa.array(np.zeros(n, np.float32))
    am = pa.array(np.full(n, ids_value, dtype=ids.type.to_pandas_dtype()))
    h = pa.array(np.full(n, 0.5, np.float16))
    cols = [pa.array(["x", "y"]), ids_col, lp, lse, am, h, h]
    if level == "frame":  # one frame per key
        off = pa.array(np.arange(n + 1, dtype=np.int32))
        cols = [cols[0], pa.array(np.ones(n, np.int32))] + [pa.ListArray.from_arrays(off, c) for c in cols[1:]]
    table = pa.Table.from_arrays(cols, schema=schema)
    if facts is not None:
        table = table.replace_schema_metadata({b"kdpipe": json.dumps(facts).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


def foreign_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_sample(key: str, level: str, k: int, ids_value: int, id_dtype=np.uint8, **override) -> list[tuple[str, bytes]]:
    lead = (1,) if level == "frame" else ()
    arrays = {
        "ids": np.full(lead + (k,), ids_value, id_dtype), "logprobs": np.full(lead + (k,), -1.0, np.float16),
        "logsumexp": np.zeros(lead, np.float32), "argmax": np.full(lead, ids_value, id_dtype),
        "confidence": np.full(lead, 0.5, np.float16), "entropy": np.full(lead, 0.5, np.float16),
    }
    if level == "frame":
        arrays["num_frames"] = np.int32(1)
    arrays.update(override)
    return [(f"{key}.{c}.npy", npy(a)) for c, a in arrays.items()]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_class_ids_out_of_range(tmp_path, kd, encoding, level):
    """A run of 10 classes (uint8 ids) whose shard holds class id 200: fits the dtype, not the manifest."""
    path = str(tmp_path / "run")
    kd.write_run(path, encoding, level, 3, 10, {"s0": ["x", "y"]})
    m = SoftTargetRun(path).manifest
    if encoding == "parquet":
        data = foreign_parquet_with_ids(level, 3, 10, 200, {**m.key_facts(), "input": "/in"})
    else:
        data = foreign_tar(tar_sample("x", level, 3, 200) + tar_sample("y", level, 3, 200))
    kd.replace_shard(path, "s0", data)
    msg = expect_error(path, shard_path(path, encoding), "out of range")
    assert "200" in msg and "10" in msg


def test_writer_refuses_class_ids_out_of_range(tmp_path, kd):
    path = str(tmp_path / "run")
    w = RunWriter(path, kd.make_manifest("utterance", 3, 10, "parquet"))
    bad = pq.read_table(io.BytesIO(foreign_parquet_with_ids("utterance", 3, 10, 200, None)))
    with pytest.raises(FormatError, match="out of range"):
        w.write_shard("s0", "/in", bad, [])
    assert not os.path.exists(os.path.join(path, "shards", "s0.parquet"))


def test_parquet_without_kdpipe_metadata(tmp_path, kd):
    path = str(tmp_path / "run")
    kd.write_run(path, "parquet", "utterance", 3, 10, {"s0": ["x", "y"]})
    kd.replace_shard(path, "s0", foreign_parquet_with_ids("utterance", 3, 10, 1, facts=None))
    expect_error(path, shard_path(path, "parquet"), "kdpipe metadata")


def test_not_a_parquet_file(tmp_path, kd):
    path = str(tmp_path / "run")
    kd.write_run(path, "parquet", "utterance", 3, 10, {"s0": ["x", "y"]})
    kd.replace_shard(path, "s0", foreign_tar(tar_sample("x", "utterance", 3, 1)))
    expect_error(path, shard_path(path, "parquet"), "corrupt")


@pytest.mark.parametrize("members, words", [
    (tar_sample("x", "utterance", 3, 1) + [("x.txt", b"hello")], ("not a .npy",)),
    (tar_sample("x", "utterance", 3, 1) + [("README", b"hello")], ("no extension",)),
    ([m for m in tar_sample("x", "utterance", 3, 1) if "entropy" not in m[0]], ("lacks", "entropy")),
    (tar_sample("x", "utterance", 3, 1, logprobs=np.zeros(3, np.float32)), ("float32", "manifest")),
    (tar_sample("x", "utterance", 3, 1, ids=np.ones(3, np.int64)), ("int64", "manifest")),
    (tar_sample("x", "utterance", 3, 1, logsumexp=np.zeros(2, np.float32)), ("logsumexp", "manifest")),
    ([("x.ids.npy", b"\x93NUMPY garbage")], ("not a valid .npy",)),
])
def test_foreign_tar_members(tmp_path, kd, members, words):
    path = str(tmp_path / "run")
    kd.write_run(path, "webdataset", "utterance", 3, 10, {"s0": ["x"]})
    kd.replace_shard(path, "s0", foreign_tar(members))
    msg = expect_error(path, shard_path(path, "webdataset"), *words)
    assert "x" in msg


def test_row_count_mismatch_is_reported(tmp_path, kd):
    """A shard with more rows than its manifest record is not silently accepted either."""
    path = str(tmp_path / "run")
    kd.write_run(path, "webdataset", "utterance", 3, 10, {"s0": ["x"]})
    kd.replace_shard(path, "s0", foreign_tar(tar_sample("x", "utterance", 3, 1) + tar_sample("y", "utterance", 3, 1)))
    expect_error(path, shard_path(path, "webdataset"), "row count")


# --- reopening for writing ------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"teacher": "teacher-b"},  # another teacher spec -> another fingerprint
    {"k": 4},
])
def test_fingerprint_mismatch_when_reopening(tmp_path, kd, change):
    path = str(tmp_path / "run")
    kd.write_run(path, "parquet", "utterance", 5, 300, {"s0": KEYS})
    args = {"level": "utterance", "k": 5, "num_classes": 300, "encoding": "parquet", **change}
    with pytest.raises(FingerprintMismatch) as info:
        RunWriter(path, kd.make_manifest(**args))
    msg = str(info.value)
    assert kd.manifest_path(path) in msg and "fingerprint" in msg
    assert isinstance(info.value, FormatError)
    # nothing was touched: the run still reads
    assert list(read_all(path)["key"]) == KEYS


def test_encoding_mismatch_when_reopening(tmp_path, kd):
    path = str(tmp_path / "run")
    kd.write_run(path, "parquet", "utterance", 5, 300, {"s0": KEYS})
    with pytest.raises(FormatError, match="encoded as parquet") as info:
        RunWriter(path, kd.make_manifest("utterance", 5, 300, "webdataset"))
    assert kd.manifest_path(path) in str(info.value)
    assert not isinstance(info.value, FingerprintMismatch)


def test_checksum_helper_matches_manifest(tmp_path, kd):
    """The manifest's sha256/bytes are of the shard file's bytes (a reader without kdpipe can verify)."""
    path = str(tmp_path / "run")
    kd.write_run(path, "webdataset", "frame", 2, 7, {"s0": KEYS})
    rec = kd.records(path)["s0"]
    with open(os.path.join(path, rec["output"]), "rb") as f:
        data = f.read()
    assert rec["bytes"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("change, words", [
    ({"id_dtype": "uint8"}, ("id_dtype",)),  # 300 classes need uint16
    ({"level": "frame", "frame_shift_ms": None}, ("frame_shift_ms",)),
    ({"k": 301}, ("exceeds",)),
])
def test_writer_refuses_a_manifest_a_reader_would_refuse(tmp_path, kd, change, words):
    path = str(tmp_path / "run")
    with pytest.raises(FormatError) as info:
        RunWriter(path, kd.make_manifest(**{"level": "utterance", "k": 5, "num_classes": 300, "encoding": "parquet",
                                            **change}))
    assert "manifest.json" in str(info.value) and any(w in str(info.value) for w in words)
    assert not os.path.exists(os.path.join(path, "manifest.json"))
