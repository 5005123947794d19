"""The commit log of a run directory: which shards are complete, in O(1) requests.

    RUN/_commits/index-00000007.jsonl   every committed record as of a compaction (one JSON object a line)
    RUN/_commits/log-00000008.jsonl     the records one flush committed after it
    RUN/_commits/log-00000009.jsonl     ...

``manifest.json`` names the current index and the log segments after it
(``"commits": {"index": ..., "log": [...], "seq": N}``); rewriting the manifest is the commit
point, so a segment the manifest does not list does not count. A later record of a name
replaces an earlier one (a damaged shard recomputed). Opening a run reads the manifest, the
index and the listed segments: a constant number of requests whatever the number of shards,
because the writer folds the segments into a new index whenever they hold as many records as
the index (amortised O(1) per record) or pass ``MAX_SEGMENTS``, and at the end of every run.
"""

from __future__ import annotations

import json

from pipeline import storage
from pipeline.shards.manifest import COMMITS_DIR, FormatError, ShardRecord

MAX_SEGMENTS = 64


def _read_lines(run_uri: str, rel: str) -> list[ShardRecord]:
    uri = storage.join(run_uri, rel)
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        raise FormatError(f"{uri}: commit file listed in the manifest is missing") from None
    except UnicodeDecodeError:
        raise FormatError(f"{uri}: not UTF-8 text") from None
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{uri}: line {i + 1} is not valid JSON ({e})") from None
        out.append(ShardRecord.from_dict(d, f"{uri}: line {i + 1}"))
    return out


def load_records(run_uri: str, commits: dict) -> dict[str, ShardRecord]:
    """{name: record} of every committed shard: the index, then the log segments in order."""
    records: dict[str, ShardRecord] = {}
    for rel in ([commits["index"]] if commits.get("index") else []) + list(commits["log"]):
        for rec in _read_lines(run_uri, rel):
            records[rec.name] = rec
    return records


def _encode(records) -> bytes:
    return "".join(r.to_json() + "\n" for r in records).encode("utf-8")


def append_segment(run_uri: str, commits: dict, records: list[ShardRecord]) -> dict:
    """Write one log segment of ``records`` (O(len(records))); returns the new pointer, which
    the caller commits by saving the manifest."""
    seq = commits["seq"] + 1
    rel = f"{COMMITS_DIR}/log-{seq:08d}.jsonl"
    storage.atomic_write_bytes(storage.join(run_uri, rel), _encode(records))
    return {"index": commits.get("index"), "log": list(commits["log"]) + [rel], "seq": seq,
            "index_records": commits.get("index_records", 0),
            "log_records": commits.get("log_records", 0) + len(records)}


def needs_compaction(commits: dict) -> bool:
    """True when the segments hold as many records as the index, or are too many to open cheaply."""
    n_log = len(commits["log"])
    return n_log >= MAX_SEGMENTS or (n_log > 1 and commits.get("log_records", 0) >= max(1, commits.get("index_records", 0)))


def write_index(run_uri: str, commits: dict, records: dict[str, ShardRecord]) -> dict:
    """Fold everything into a new index file; returns the pointer (no segments) to commit."""
    seq = commits["seq"] + 1
    rel = f"{COMMITS_DIR}/index-{seq:08d}.jsonl"
    storage.atomic_write_bytes(storage.join(run_uri, rel), _encode(records[n] for n in sorted(records)))
    return {"index": rel, "log": [], "seq": seq, "index_records": len(records), "log_records": 0}


def live_files(commits: dict) -> set[str]:
    """Commit files the pointer names (relative paths); every other file in _commits/ is stale."""
    return set(([commits["index"]] if commits.get("index") else []) + list(commits["log"]))
