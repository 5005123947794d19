"""Stage 1 of pseudo-labelling, on CPU tasks: input shard -> decoded, length-bucketed rows.

Every row of the stage's output has the ``STAGE_SCHEMA`` columns and one of three kinds:
a sample (payload = float32 waveform bytes or uint8 image bytes), an error (reason, detail),
or the shard's end marker (count = rows emitted for the shard before it). The driver uses the
marker to know when a shard is complete, however the rows were spread over teacher actors.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from pipeline.inputs import iter_shard
from pipeline.modalities import DecodeError, chunk_key, media_extensions, prepare, preprocessing_from_dict

SAMPLE, ERROR, END = 0, 1, 2
STAGE_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("key", pa.string()),
    ("kind", pa.int8()),
    ("length", pa.int64()),  # samples (audio) or 0 (image)
    ("payload", pa.large_binary()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("count", pa.int64()),
])


def _table(rows: list[dict]) -> pa.Table:
    cols = {name: [r.get(name) for r in rows] for name in STAGE_SCHEMA.names}
    return pa.Table.from_pydict(cols, schema=STAGE_SCHEMA)


class DecodeShards:
    """Ray Data UDF: a batch of shard rows (name, uri) -> generator of decoded row tables.

    Samples are buffered ``bucket_rows`` at a time and sorted by length, so that the
    teacher's batches (consecutive rows) need little padding.
    """

    def __init__(self, preprocessing: dict, bucket_rows: int = 1024, parquet_options: dict | None = None):
        self.prep = preprocessing_from_dict(preprocessing)
        self.modality = preprocessing["modality"]
        self.exts = media_extensions(self.modality)
        self.bucket_rows = bucket_rows
        self.parquet_options = parquet_options or {}

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        for name, uri in zip(batch["name"], batch["uri"]):
            yield from self.shard(str(name), str(uri))

    def shard(self, name: str, uri: str) -> Iterator[pa.Table]:
        seen: set[str] = set()
        bucket: list[dict] = []
        pending: list[dict] = []  # error rows ride along with the next block
        count = 0

        def flush(final: bool) -> Iterator[pa.Table]:
            nonlocal bucket, pending, count
            bucket.sort(key=lambda r: r["length"])
            rows = pending + bucket
            count += len(rows)
            if final:
                rows.append({"shard": name, "key": "", "kind": END, "length": 0, "count": count})
            bucket, pending = [], []
            if rows:
                yield _table(rows)

        for raw in iter_shard(uri, self.exts, **self.parquet_options):
            if raw.key in seen:
                pending.append(self._error(name, raw.key, DecodeError(
                    "duplicate_key", f"key appears more than once in {uri}; the first occurrence is used")))
                continue
            seen.add(raw.key)
            if raw.error is not None:
                pending.append(self._error(name, raw.key, raw.error))
                continue
            try:
                pieces = prepare(raw.data, self.prep)
            except DecodeError as e:
                pending.append(self._error(name, raw.key, e))
                continue
            for bounds, arr in pieces:
                bucket.append({
                    "shard": name, "key": chunk_key(raw.key, bounds), "kind": SAMPLE,
                    "length": int(arr.shape[0]) if self.modality == "audio" else 0,
                    "payload": arr.tobytes(), "count": 0,
                })
            if len(bucket) >= self.bucket_rows:
                yield from flush(final=False)
        yield from flush(final=True)

    @staticmethod
    def _error(shard: str, key: str, err: DecodeError) -> dict:
        return {"shard": shard, "key": key, "kind": ERROR, "length": 0, "reason": err.reason,
                "detail": err.detail[:500], "count": 0}
