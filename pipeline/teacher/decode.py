"""Stage 1 of pseudo-labelling, on CPU tasks: input shard -> decoded, length-bucketed rows.

Every row of the stage's output has the ``stage_schema`` columns and one of three kinds:
a sample (payload: the prepared array, pipeline.modalities.payload), an error (reason,
detail), or the shard's END row (count: rows emitted for the shard before it; key_hash:
their keys' hash, pipeline.teacher.accounting). The driver checks the teacher actors'
parts against the END row, however the rows were spread over actors.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from pipeline.inputs import iter_prepared
from pipeline.modalities import DEFAULT_LIMITS, DecodeError, DecodeLimits, chunk_key
from pipeline.modalities.payload import payload_array, payload_type
from pipeline.teacher.accounting import Row, key_hash


def stage_schema(prep) -> pa.Schema:
    return pa.schema([
        ("shard", pa.string()),
        ("key", pa.string()),
        ("kind", pa.int8()),
        ("length", pa.int64()),  # samples (audio) or 0 (image)
        ("payload", payload_type(prep)),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("count", pa.int64()),  # END: rows emitted for the shard
        ("key_hash", pa.uint64()),  # END: hash of their keys
    ])


class DecodeShards:
    """Ray Data UDF: a batch of shard rows (name, uri) -> generator of decoded row tables.

    Samples are buffered ``bucket_rows`` at a time and sorted by length, so that the
    teacher's batches (consecutive rows) need little padding. Error rows ride along with
    the next block.
    """

    def __init__(self, preprocessing, bucket_rows: int = 1024, parquet_options: dict | None = None,
                 limits: DecodeLimits = DEFAULT_LIMITS):
        self.prep = preprocessing
        self.schema = stage_schema(preprocessing)
        self.bucket_rows = bucket_rows
        self.parquet_options = parquet_options or {}
        self.limits = limits
        self.audio = self.schema.field("payload").type == pa.large_list(pa.float32())

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        for name, uri in zip(batch["name"], batch["uri"]):
            yield from self.shard(str(name), str(uri))

    def _table(self, name: str, samples: list[tuple[str, "object"]], errors: list[tuple[str, DecodeError]],
               end: tuple[int, int] | None) -> pa.Table:
        if self.audio:
            samples.sort(key=lambda s: s[1].shape[0])  # by length: little padding per teacher batch
        n_s, n_e = len(samples), len(errors)
        n = n_s + n_e + (end is not None)
        arrays = [a for _, a in samples]
        payload = pa.concat_arrays([payload_array(arrays, self.prep), pa.nulls(n - n_s, payload_type(self.prep))])
        cols = {
            "shard": pa.array([name] * n, pa.string()),
            "key": pa.array([k for k, _ in samples] + [k for k, _ in errors] + ([""] if end else []), pa.string()),
            "kind": pa.array([Row.SAMPLE] * n_s + [Row.ERROR] * n_e + ([Row.END] if end else []), pa.int8()),
            "length": pa.array([a.shape[0] if self.audio else 0 for a in arrays] + [0] * (n - n_s), pa.int64()),
            "payload": payload,
            "reason": pa.array([None] * n_s + [e.reason for _, e in errors] + ([None] if end else []), pa.string()),
            "detail": pa.array([None] * n_s + [e.detail[:500] for _, e in errors] + ([None] if end else []),
                               pa.string()),
            "count": pa.array([0] * (n - 1) + [end[0]] if end else [0] * n, pa.int64()),
            "key_hash": pa.array([0] * (n - 1) + [end[1]] if end else [0] * n, pa.uint64()),
        }
        return pa.table(cols, schema=self.schema)

    def shard(self, name: str, uri: str) -> Iterator[pa.Table]:
        samples: list[tuple[str, object]] = []
        errors: list[tuple[str, DecodeError]] = []
        count, hashed = 0, 0
        for raw, pieces in iter_prepared(uri, self.prep, self.limits, **self.parquet_options):
            if isinstance(pieces, DecodeError):
                errors.append((raw.key, pieces))
                continue
            samples += [(chunk_key(raw.key, bounds), arr) for bounds, arr in pieces]
            if len(samples) >= self.bucket_rows:
                count += len(samples) + len(errors)
                hashed += key_hash([k for k, _ in samples] + [k for k, _ in errors])
                yield self._table(name, samples, errors, None)
                samples, errors = [], []
        count += len(samples) + len(errors)
        hashed += key_hash([k for k, _ in samples] + [k for k, _ in errors])
        yield self._table(name, samples, errors, (count, hashed & ((1 << 64) - 1)))
