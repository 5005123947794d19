"""A shard's parts -> its one soft-target file and errors file (a Ray task on any worker).

The driver calls this once every key of the input shard is accounted for by PART records.
The parts are read back, checked against what decode announced (row count, key hash,
distinct soft-target keys), sorted by key so that a rerun writes the same bytes, written
with ``write_shard_files``, and removed. Only the resulting commit record goes back.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.shards.files import write_shard_files
from pipeline.shards.manifest import FormatError, RunFacts, ShardRecord
from pipeline.shards.schema import ERRORS_SCHEMA, softtarget_schema
from pipeline.teacher.accounting import Row, key_hash


def compact_shard(run_uri: str, facts: RunFacts, name: str, input_uri: str, parts: list[str], expected: int,
                  expected_hash: int) -> ShardRecord:
    """parts: files relative to the run directory; expected / expected_hash: from decode's END row."""
    tables = []
    for rel in parts:
        uri = storage.join(run_uri, rel)
        try:
            tables.append(pq.read_table(io.BytesIO(storage.read_bytes(uri))))
        except (pa.ArrowInvalid, OSError) as e:
            raise FormatError(f"{uri}: unreadable part ({e})") from None
    rows = pa.concat_tables(tables) if tables else None
    n = rows.num_rows if rows is not None else 0
    got_hash = key_hash(rows.column("key")) if n else 0
    if n != expected or got_hash != expected_hash:
        raise FormatError(f"shard {name}: its parts hold {n} rows (key hash {got_hash:016x}), decode emitted "
                          f"{expected} (key hash {expected_hash:016x}); not committed")
    schema = softtarget_schema(facts.level, facts.k, facts.num_classes)
    if n:
        kinds = rows.column("kind")
        samples = rows.filter(pc.equal(kinds, Row.SAMPLE)).select(schema.names).cast(schema)
        errs = rows.filter(pc.equal(kinds, Row.ERROR))
    else:
        samples, errs = schema.empty_table(), None
    if pc.count_distinct(samples.column("key")).as_py() != samples.num_rows:
        raise FormatError(f"shard {name}: a key has soft targets twice; not committed")
    samples = samples.sort_by("key")  # deterministic bytes: reruns write identical shards
    if errs is not None and errs.num_rows:
        m = errs.num_rows
        errors = pa.table({"key": errs.column("key"), "input": pa.array([input_uri] * m, pa.string()),
                           "reason": errs.column("reason"), "detail": pc.fill_null(errs.column("detail"), "")},
                          schema=ERRORS_SCHEMA).sort_by([("key", "ascending"), ("reason", "ascending"),
                                                         ("detail", "ascending")])
    else:
        errors = ERRORS_SCHEMA.empty_table()
    rec = write_shard_files(run_uri, facts, name, input_uri, samples, errors)
    for rel in parts:  # consumed; a part left by a crash is removed by the next run's cleanup
        storage.remove(storage.join(run_uri, rel))
    return rec


class Compactor:
    """A long-lived Ray actor that compacts shards of one run (``compact_shard``)."""

    def __init__(self, run_uri: str, facts: RunFacts):
        self.run_uri, self.facts = run_uri, facts

    def compact(self, name: str, input_uri: str, parts: list[str], expected: int, expected_hash: int) -> ShardRecord:
        return compact_shard(self.run_uri, self.facts, name, input_uri, parts, expected, expected_hash)
