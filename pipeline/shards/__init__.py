"""The soft-target cache format: schema, manifest, Parquet and WebDataset encodings, run I/O."""

from pipeline.shards.manifest import FormatError, Manifest, ShardRecord, load_manifest
from pipeline.shards.run import FingerprintMismatch, RunWriter, SoftTargetRun, errors_table
from pipeline.shards.schema import (
    FORMAT_VERSION, LEVELS, VALUE_COLUMNS, rows_from_topk, softtarget_schema, table_from_rows, table_to_numpy,
)

__all__ = [
    "FORMAT_VERSION", "LEVELS", "VALUE_COLUMNS", "FingerprintMismatch", "FormatError", "Manifest", "RunWriter",
    "ShardRecord", "SoftTargetRun", "errors_table", "load_manifest", "rows_from_topk", "softtarget_schema",
    "table_from_rows", "table_to_numpy",
]
