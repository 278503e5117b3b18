"""`gather.take` equals Arrow's take, whether or not a column's values share one length."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given
from hypothesis import strategies as st

from lithify.data import gather


@st.composite
def _batch_and_indices(draw: st.DrawFn) -> tuple[pa.RecordBatch, np.ndarray]:
    n = draw(st.integers(1, 40))
    width = draw(st.integers(0, 5))
    same = [draw(st.binary(min_size=width, max_size=width)) for _ in range(n)]
    mixed = draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n))
    batch = pa.record_batch(
        {
            "same": pa.array(same, pa.binary()),
            "mixed": pa.array(mixed, pa.binary()),
            "num": pa.array(range(n), pa.int64()),
        }
    )
    start = draw(st.integers(0, n - 1))
    batch = batch.slice(start)  # offsets that do not start at zero
    idx = draw(st.lists(st.integers(0, batch.num_rows - 1), max_size=60))
    return batch, np.array(idx, dtype=np.int64)


@given(_batch_and_indices())
def test_take_equals_arrow_take(case: tuple[pa.RecordBatch, np.ndarray]) -> None:
    batch, idx = case
    got = gather.take(batch, idx, pa.default_memory_pool())
    want = pc.take(batch, pa.array(idx, pa.int64()))
    assert got.schema == want.schema
    for g, w in zip(got.columns, want.columns, strict=True):
        assert g.to_pylist() == w.to_pylist()
    got.validate(full=True)


def test_binary_offsets_of_a_slice() -> None:
    col = pa.array([b"ab", b"c", b"", b"defg"]).slice(1)
    assert gather.binary_offsets(col).tolist() == [2, 3, 3, 7]
