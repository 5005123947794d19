"""The worker's local shuffle and its background thread, without Ray: every row once, batch
sizes, reproducible for a seed, really mixed across blocks, errors reach the consumer."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest

from pipeline.student.shuffle import in_background, shuffled_batches


def _blocks(sizes):
    start = 0
    for n in sizes:
        yield pa.table({"i": pa.array(np.arange(start, start + n)), "payload": pa.array([[float(j)] * 3 for j in
                                                                                          range(start, start + n)])})
        start += n


SIZES = [7, 0, 30, 1, 12, 50]


def _ids(batches):
    return [b.column("i").to_pylist() for b in batches]


@pytest.mark.parametrize("buffer", [0, 16, 1000])
def test_every_row_exactly_once_in_full_batches(buffer):
    got = _ids(shuffled_batches(_blocks(SIZES), 8, buffer, seed=3))
    flat = [i for b in got for i in b]
    assert sorted(flat) == list(range(sum(SIZES)))
    assert [len(b) for b in got] == [8] * 12 + [4]  # 100 rows: the last batch is the rest
    for b in shuffled_batches(_blocks(SIZES), 8, buffer, seed=3):  # rows stay whole
        assert [p[0] for p in b.column("payload").to_pylist()] == [float(i) for i in b.column("i").to_pylist()]


def test_no_buffer_keeps_input_order_and_a_buffer_mixes_blocks():
    assert [i for b in _ids(shuffled_batches(_blocks(SIZES), 8, 0)) for i in b] == list(range(100))
    got = _ids(shuffled_batches(_blocks(SIZES), 8, 40, seed=1))
    assert got == _ids(shuffled_batches(_blocks(SIZES), 8, 40, seed=1))  # reproducible
    assert got != _ids(shuffled_batches(_blocks(SIZES), 8, 40, seed=2))
    # the first batch draws from >= 48 buffered rows, across the first four blocks
    assert max(got[0]) >= 37 and min(got[0]) < 37


def test_background_thread_yields_in_order_and_reraises():
    assert list(in_background(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad shard x")

    it = in_background(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad shard x"):
        next(it)


def test_leaving_early_stops_the_thread():
    before = threading.active_count()
    it = in_background(iter(range(10**6)), depth=2)
    assert next(it) == 0
    it.close()
    for t in threading.enumerate():
        if t.name == "kdpipe-batches":
            t.join(timeout=2)
    assert threading.active_count() == before


def test_memory_held_stays_bounded_when_a_few_rows_keep_blocks_alive():
    """Uniform draws leave a few rows of many blocks undrawn; without moving those into one
    block, 1024-row blocks kept ~9,000 rows alive for a 576-row buffer (measured)."""
    import gc

    width, rows, batch, buffer = 100, 1024, 64, 512

    def blocks():
        for b in range(40):  # allocated by Arrow's pool (the cast), so the pool counts them
            payload = pa.array(np.zeros(rows * width)).cast(pa.float32())
            yield pa.table({"i": pa.array(np.arange(b * rows, (b + 1) * rows)),
                            "payload": pa.FixedSizeListArray.from_arrays(payload, width)})

    gc.collect()
    base, peak, seen = pa.total_allocated_bytes(), 0, 0
    for t in shuffled_batches(blocks(), batch, buffer, seed=0):
        peak = max(peak, pa.total_allocated_bytes() - base)
        seen += t.num_rows
    assert seen == 40 * rows
    held = peak / (width * 4 + 8)  # rows' worth of bytes
    assert held < 3 * (buffer + batch) + 2 * rows, held  # (HELD_FACTOR + 1) buffers + a block + the copy
