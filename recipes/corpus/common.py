"""Shared plumbing for the synthetic corpora: shard plans, per-item RNG, deterministic tar
bytes, the Ray Data generation job and ``corpus.json``.

Layout written by every generator (local path or ``s3://``):

    ROOT/corpus.json
    ROOT/SPLIT/shard-000000.tar, shard-000001.tar, ...   (WebDataset: KEY.<member>, keys without dots)

Every item's randomness comes from ``item_rng(seed, split, index)`` alone, so the bytes of
every shard are the same however the work is split over tasks, workers or machines.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline import storage

CORPUS_FORMAT = "kdpipe-corpus"
CORPUS_VERSION = 1
SHARD_PATTERN = re.compile(r"^shard-\d{6,}\.tar$")


def item_rng(seed: int, split: str, index: int, stream: str = "") -> np.random.Generator:
    """A generator that depends only on (seed, split, index, stream)."""
    words = [int(seed) & 0xFFFFFFFF, zlib.crc32(split.encode()), int(index), zlib.crc32(stream.encode())]
    return np.random.default_rng(np.random.SeedSequence(words))


def partition_rng(seed: int, what: str) -> np.random.Generator:
    """A generator for corpus-wide decisions (which voices / source images go to test)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(what.encode())]))


def key_for(split: str, index: int, count: int) -> str:
    """``labeled-000123``: split name and zero-padded index (at least 6 digits), no dots."""
    width = max(6, len(str(max(count - 1, 0))))
    key = f"{split}-{index:0{width}d}"
    if "." in key:
        raise ValueError(f"split name {split!r} gives a key with a dot, which WebDataset cannot represent")
    return key


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: items [start, start + count) of ``split`` go to shard ``shard``."""

    split: str
    shard: int
    start: int
    count: int
    split_count: int  # total items in the split (fixes the key width)

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.shard:06d}.tar"


def plan_shards(split_counts: dict[str, int], shard_size: int) -> list[ShardSpec]:
    """Cut each split into shards of ``shard_size`` items (the last one may be smaller)."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    specs = []
    for split, n in split_counts.items():
        if n < 0:
            raise ValueError(f"split {split!r}: count must be >= 0, got {n}")
        for s, start in enumerate(range(0, n, shard_size)):
            specs.append(ShardSpec(split, s, start, min(shard_size, n - start), n))
    return specs


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """Members -> uncompressed tar bytes; mtime 0, no owner, mode 0644, so equal input gives equal bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_shard(output: str, spec: ShardSpec, members: list[tuple[str, bytes]]) -> dict:
    """Atomically write one shard under ``output``; returns its corpus.json entry."""
    data = tar_bytes(members)
    uri = storage.join(output, spec.split, f"shard-{spec.shard:06d}.tar")
    storage.atomic_write_bytes(uri, data)
    return {
        "split": spec.split,
        "shard": spec.shard,
        "path": spec.name,
        "count": spec.count,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def run_generation(
    specs: list[ShardSpec],
    make_shard: Callable[[ShardSpec, dict, str], dict],
    settings: dict,
    output: str,
    progress: Callable[[str], None] | None = print,
    num_cpus_per_shard: float = 1.0,
) -> list[dict]:
    """Run ``make_shard(spec, settings, output)`` for every spec as one Ray Data job.

    One block per spec (``from_items(..., override_num_blocks=len(specs))``), so every shard
    is its own task and Ray spreads them over all the CPUs of the cluster. Ray must already
    be initialised (the jobs call ``ray.init``). Returns the shard entries sorted by (split, shard).
    """
    import ray

    if not specs:
        return []
    rows = [dict(split=s.split, shard=s.shard, start=s.start, count=s.count, split_count=s.split_count) for s in specs]

    def _task(row: dict) -> dict:
        spec = ShardSpec(row["split"], int(row["shard"]), int(row["start"]), int(row["count"]), int(row["split_count"]))
        t0, c0 = time.perf_counter(), time.process_time()
        entry = make_shard(spec, settings, output)
        entry["seconds"] = time.perf_counter() - t0
        entry["cpu_seconds"] = time.process_time() - c0  # this task's CPU time, unaffected by other load
        return entry

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(_task, num_cpus=num_cpus_per_shard)
    done, items, total = [], 0, sum(s.count for s in specs)
    t0 = time.perf_counter()
    for row in ds.iter_rows():
        entry = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        done.append(entry)
        items += int(entry["count"])
        if progress:
            el = time.perf_counter() - t0
            progress(
                f"[{len(done)}/{len(specs)} shards] {entry['path']}: {entry['count']} items, "
                f"{entry['bytes'] / 1e6:.1f} MB, {entry['seconds']:.1f}s | {items}/{total} items, {el:.0f}s elapsed"
            )
    done.sort(key=lambda e: ([s.split for s in specs].index(e["split"]), e["shard"]))
    return done


def run_stats(entries: list[dict]) -> dict:
    """Timing of a generation run (kept out of corpus.json, which depends only on the settings)."""
    return {
        "shards": len(entries),
        "items": sum(int(e["count"]) for e in entries),
        "task_seconds": round(sum(float(e.get("seconds", 0.0)) for e in entries), 2),
        "cpu_seconds": round(sum(float(e.get("cpu_seconds", 0.0)) for e in entries), 2),
    }


def remove_stale_shards(output: str, split: str, keep: set[str]) -> list[str]:
    """Delete ``shard-NNNNNN.tar`` files in ``output/split`` that this run did not write
    (left by an earlier, larger run), so a directory glob sees exactly this corpus."""
    removed = []
    for uri in storage.listdir(storage.join(output, split)):
        name = storage.basename(uri)
        if SHARD_PATTERN.match(name) and f"{split}/{name}" not in keep:
            storage.remove(uri)
            removed.append(uri)
    return removed


def splits_summary(entries: list[dict], split_names: list[str]) -> dict[str, dict]:
    """{split: {count, shards: [relative paths], shard_counts, shard_sha256, bytes}} from shard entries."""
    out = {}
    for split in split_names:
        es = sorted((e for e in entries if e["split"] == split), key=lambda e: e["shard"])
        out[split] = {
            "count": sum(int(e["count"]) for e in es),
            "shards": [e["path"] for e in es],
            "shard_counts": [int(e["count"]) for e in es],
            "shard_sha256": [e["sha256"] for e in es],
            "bytes": sum(int(e["bytes"]) for e in es),
        }
    return out


def write_corpus_json(output: str, corpus: dict) -> str:
    """Write ``ROOT/corpus.json`` atomically (written last, so it marks a finished corpus)."""
    uri = storage.join(output, "corpus.json")
    storage.atomic_write_bytes(uri, (json.dumps(corpus, indent=2, sort_keys=False) + "\n").encode())
    return uri


def read_corpus_json(output: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(output, "corpus.json")))


def software_versions(*packages: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out
