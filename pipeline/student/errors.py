"""The student stage's data errors: what ends a training or evaluation job at once, with one
line, instead of being retried (a damaged cache, shards that do not pair)."""

from __future__ import annotations


class DataError(RuntimeError):
    """Training stopped on a data error (a damaged cache, shards that do not pair): retrying
    cannot help, so the job ends with its one-line message."""


def data_error(e: BaseException) -> str | None:
    """The message of a kdpipe data error (a damaged cache, shards that do not pair) anywhere
    in an exception's chain, as raised inside a Ray task; None for any other error."""
    from pipeline.shards import FormatError
    from pipeline.student.data import PairingError

    todo, seen = [e], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if type(e) in (FormatError, PairingError, DataError) or (
                isinstance(e, (FormatError, PairingError, DataError)) and cause is None):
            return str(e).strip().splitlines()[0]
        # Ray Train's WorkerGroupError keeps each worker's error by rank
        todo += list((getattr(e, "worker_failures", None) or {}).values())
        todo += [cause, e.__cause__, e.__context__]
    return None
