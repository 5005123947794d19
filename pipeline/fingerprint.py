"""Cache fingerprint: what makes two soft-target runs interchangeable.

It covers the teachers (spec and weights digest of every member, in order), the
preprocessing, k and the level. It deliberately leaves out how the run executes (batch size,
number of actors, precision, output encoding): those do not change which soft targets are
meant, so a rerun on other hardware still reuses the cache.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def file_digest(path_or_uri: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (local or s3://), streamed."""
    from pipeline import storage

    h = hashlib.sha256()
    with storage.open_read(path_or_uri) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(teachers: list[dict[str, Any]], preprocessing: dict[str, Any], k: int, level: str) -> str:
    """sha256 hex of the canonical description of a soft-target run.

    teachers: one identity dict per ensemble member, e.g. {"spec": ..., "kwargs": ..., "weights_sha256": ...}
    """
    body = {"teachers": teachers, "preprocessing": preprocessing, "k": int(k), "level": level}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()
