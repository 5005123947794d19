"""The soft-target cache format: schema, manifest + commit log, Parquet and WebDataset
encodings, shard files, run I/O."""

from pipeline.shards.files import errors_table, read_errors, read_shard_table, write_shard_files
from pipeline.shards.lease import LeaseHeld
from pipeline.shards.manifest import FormatError, Manifest, RunFacts, ShardRecord, read_manifest
from pipeline.shards.run import FingerprintMismatch, InputPlan, RunWriter, SoftTargetRun, open_run, verify_records
from pipeline.shards.schema import (
    FORMAT_VERSION, LEVELS, VALUE_COLUMNS, rows_from_topk, softtarget_schema, table_from_rows, table_to_numpy,
)

__all__ = [
    "FORMAT_VERSION", "LEVELS", "VALUE_COLUMNS", "FingerprintMismatch", "FormatError", "InputPlan", "LeaseHeld",
    "Manifest", "RunFacts", "RunWriter", "ShardRecord", "SoftTargetRun", "errors_table", "open_run", "read_errors",
    "read_manifest", "read_shard_table", "rows_from_topk", "softtarget_schema", "table_from_rows", "table_to_numpy",
    "verify_records", "write_shard_files",
]
