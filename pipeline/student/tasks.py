"""The student stage's unit of input work, as it crosses into Ray Data tasks.

The driver plans a list of ``ShardTask``s; Ray Data carries each as a row of plain columns
(``to_row``), and the decode task (student.data.ShardRows) turns its rows back into tasks
(``from_batch``). Nothing else crosses: no dicts with kind strings built in one place and
parsed in another.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterator

from pipeline.shards.manifest import ShardRecord

PSEUDO = "pseudo"  # an input shard paired with its soft-target shard (``record``: its commit record)
LABELED = "labeled"  # an input shard decoded with its labels (.cls / .frames.npy members)
RAW = "raw"  # an input shard decoded, labels where present (online distillation)
KINDS = (PSEUDO, LABELED, RAW)
COLUMNS = ("kind", "name", "input", "record")


@dataclass(frozen=True)
class ShardTask:
    """kind: PSEUDO, LABELED or RAW; name: the shard's name (unique in the dataset; a repeated
    labeled shard is NAME#i); input: the input shard's URI; record: PSEUDO's commit record."""

    kind: str
    name: str
    input: str
    record: ShardRecord | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"shard task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == PSEUDO) != (self.record is not None):
            raise ValueError(f"shard task {self.name!r}: a commit record belongs to {PSEUDO} tasks, and only them")

    def to_row(self) -> dict[str, str]:
        """The task as Ray Data carries it: COLUMNS, all strings (the record as JSON)."""
        return {"kind": self.kind, "name": self.name, "input": self.input,
                "record": json.dumps(asdict(self.record)) if self.record is not None else ""}

    @classmethod
    def from_batch(cls, batch: dict) -> Iterator[ShardTask]:
        """The tasks of a batch of ``to_row`` rows (Ray Data's numpy or list columns)."""
        for kind, name, uri, rec in zip(*(batch[c] for c in COLUMNS)):
            name = str(name)
            record = ShardRecord.from_dict(json.loads(str(rec)), f"task {name}") if str(kind) == PSEUDO else None
            yield cls(str(kind), name, str(uri), record)
