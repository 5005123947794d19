"""A worker's local shuffle: batches drawn at random from a buffer of whole Arrow blocks.

Ray Data's ``local_shuffle_buffer_size`` re-concatenates and re-takes its whole buffer as
blocks come and go, so every row (tens of KB of audio) is copied several times in the training
worker: measured 12.4 ms of worker CPU per sample against 8.8 without it, for a step-bound
audio student (docs/performance.md). Here the buffer is only an index of (block, row) pairs;
a batch's rows are taken once, by one ``take`` per block they come from (then collated), and
blocks are dropped when their last row is drawn, or, when undrawn rows keep too many blocks
alive, their live rows are moved into one block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa


def shuffled_batches(blocks: Iterable[pa.Table], batch_size: int, buffer_rows: int = 0,
                     seed: int = 0) -> Iterator[pa.Table]:
    """Arrow blocks -> tables of ``batch_size`` rows (the last one may be shorter).

    buffer_rows > 0: each batch is drawn uniformly, without replacement, from the rows of at
    least ``buffer_rows`` + ``batch_size`` buffered rows (fewer once the input runs out);
    reproducible for a given ``seed`` and block order. 0: rows in input order, re-cut into
    batches. Every input row is yielded exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    held: dict[int, pa.Table] = {}  # block id -> table, while some of its rows are buffered
    left: dict[int, int] = {}  # block id -> rows of it still buffered
    pos = np.zeros((0, 2), np.int64)  # buffered rows: (block id, row), in arrival order
    source = iter(blocks)
    next_id, exhausted = 0, False
    held_rows = 0  # rows of the held blocks, drawn or not
    want = buffer_rows + batch_size if buffer_rows > 0 else batch_size
    while True:
        while not exhausted and len(pos) < want:
            block = next(source, None)
            if block is None:
                exhausted = True
                break
            if block.num_rows == 0:
                continue
            held[next_id], left[next_id] = block, block.num_rows
            held_rows += block.num_rows
            rows = np.arange(block.num_rows, dtype=np.int64)
            pos = np.concatenate([pos, np.stack([np.full_like(rows, next_id), rows], axis=1)])
            next_id += 1
        if not len(pos):
            return
        if buffer_rows > 0 and held_rows - len(pos) > HELD_FACTOR * want:
            # A few undrawn rows can keep many drawn-from blocks alive; move the live rows into
            # one block (a copy of about the buffer per HELD_FACTOR buffers drawn) so that the
            # memory held stays within (HELD_FACTOR + 1) buffers plus a block.
            pos, held, left = _compact(pos, held, next_id)
            held_rows = len(pos)
            next_id += 1
        n = min(batch_size, len(pos))
        if buffer_rows > 0:
            pick = np.sort(rng.choice(len(pos), size=n, replace=False))
        else:
            pick = np.arange(n)
        chosen = pos[pick]
        keep = np.ones(len(pos), bool)
        keep[pick] = False
        pos = pos[keep]
        parts = []
        for b in np.unique(chosen[:, 0]):  # one take per block: the batch's rows are copied once
            rows = chosen[chosen[:, 0] == b, 1]
            parts.append(held[int(b)].take(pa.array(rows)))
            left[int(b)] -= len(rows)
            if not left[int(b)]:
                held_rows -= held[int(b)].num_rows
                del held[int(b)], left[int(b)]
        yield pa.concat_tables(parts) if len(parts) > 1 else parts[0]


HELD_FACTOR = 2  # drawn rows kept alive by their blocks: at most this many buffers' worth


def _compact(pos: np.ndarray, held: dict[int, pa.Table], new_id: int) -> tuple[np.ndarray, dict, dict]:
    """The buffered rows moved into one block ``new_id``; returns (pos, held, left) for it,
    pos in the same order as before."""
    order = np.lexsort((pos[:, 1], pos[:, 0]))  # by block, then row: one take per block
    srt = pos[order]
    parts = [held[int(b)].take(pa.array(srt[srt[:, 0] == b, 1])) for b in np.unique(srt[:, 0])]
    table = pa.concat_tables(parts).combine_chunks()
    rows = np.empty(len(pos), np.int64)
    rows[order] = np.arange(len(pos))
    return np.stack([np.full_like(rows, new_id), rows], axis=1), {new_id: table}, {new_id: len(pos)}


_END = object()


def in_background(items: Iterable, depth: int = 2) -> "Background":
    """Yield what ``items`` yields, computed in a daemon thread up to ``depth`` items ahead
    (shuffling and collating overlap the step, and on CUDA the device's queued kernels); an
    exception in the thread is re-raised here. The thread starts at once, so the first items
    are on their way while the caller still sets up (the first epoch's input starts before the
    model is built); ``close()`` stops it."""
    return Background(items, depth)


class Background:
    """The iterator ``in_background`` returns."""

    def __init__(self, items: Iterable, depth: int):
        import queue
        import threading

        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # The thread holds the queue and the event, not this object: dropped without close()
        # (an exception in the caller), it is collected and __del__ stops the thread.
        self._thread = threading.Thread(target=_fill, args=(items, self._q, self._stop), name="kdpipe-batches",
                                        daemon=True)
        self._thread.start()

    def __iter__(self) -> "Background":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        x, err = self._q.get()
        if x is _END:
            self.close()
            if err is not None:
                raise err
            raise StopIteration
        return x

    def close(self) -> None:
        """Stop the thread (it ends within 0.1 s, or when its current item is done)."""
        self._done = True
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


def _fill(items: Iterable, q, stop) -> None:
    """Background's thread: ``items`` into ``q`` (then _END, with the exception if one ended
    them), until ``stop`` is set."""
    import queue

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for x in items:
            if not put((x, None)):
                return
        put((_END, None))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
        put((_END, e))
