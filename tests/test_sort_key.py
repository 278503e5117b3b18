"""Byte-string sort keys: their byte order must be exactly the key order of `sort_tuple`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from lithify.compaction import sort_key
from lithify.data.key import ENTRY_SCHEMA, BatchKeys, sort_tuple, sort_tuple_at

field_st = st.one_of(
    st.sampled_from([b"", b"a", b"a\x00", b"\x00", b"ab", b"b", b"\xff"]), st.binary(max_size=6)
)
entry_st = st.tuples(
    field_st,
    field_st,
    field_st,
    field_st,
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
)


def batch_of(entries: list[tuple]) -> pa.RecordBatch:
    cols = list(zip(*entries, strict=True))
    arrays = [pa.array(list(c), f.type) for f, c in zip(list(ENTRY_SCHEMA)[:6], cols, strict=True)]
    arrays.append(pa.array([b"v"] * len(entries), pa.binary()))
    return pa.RecordBatch.from_arrays(arrays, schema=ENTRY_SCHEMA)


@settings(max_examples=300, deadline=None)
@given(st.lists(entry_st, min_size=1, max_size=40))
def test_byte_order_is_key_order(entries: list[tuple]) -> None:
    keys = sort_key.encode(batch_of(entries))
    assert keys is not None
    order = sort_key.merge_order(keys)
    want = sorted(range(len(entries)), key=lambda i: (sort_tuple(*entries[i]), i))
    assert order.tolist() == want
    same = sort_key.same_column(keys.keys[order], keys.column_bytes)
    cols = [entries[i][:4] for i in want]
    assert same.tolist() == [False] + [cols[i] == cols[i - 1] for i in range(1, len(cols))]


def test_fixed_width_fields_are_stored_raw_and_empty_fields_add_nothing() -> None:
    keys = sort_key.encode(
        batch_of([(b"r1", b"f", b"", b"", 5, False), (b"r2", b"f", b"", b"", 1, True)])
    )
    assert keys is not None
    assert keys.column_bytes == 3
    assert keys.keys.dtype.itemsize == 3 + 9


def test_keys_wider_than_the_limit_are_not_encoded() -> None:
    wide = b"x" * sort_key.MAX_KEY_BYTES
    assert sort_key.encode(batch_of([(wide, b"", b"", b"", 1, False)])) is None


def test_slices_are_encoded_from_their_own_offsets() -> None:
    entries = [(b"%03d" % i, b"f", b"q" * (i % 3), b"", i, False) for i in range(10)]
    whole = batch_of(entries)
    part = sort_key.encode(whole.slice(4, 3))
    assert part is not None
    want = sort_key.encode(batch_of(entries[4:7]))
    assert want is not None
    assert np.array_equal(part.keys, want.keys)


@settings(max_examples=200, deadline=None)
@given(st.lists(entry_st, min_size=1, max_size=30), st.data())
def test_batch_keys_read_the_sort_tuples_of_any_slice(entries: list[tuple], data) -> None:  # type: ignore[no-untyped-def]
    """`BatchKeys` reads Arrow buffers directly: offsets of slices, the delete bitmap's bit
    offset and empty data buffers must give exactly `sort_tuple_at`'s answers."""
    batch = batch_of(entries)
    start = data.draw(st.integers(0, len(entries) - 1))
    length = data.draw(st.integers(1, len(entries) - start))
    part = batch.slice(start, length)
    keys = BatchKeys(part)
    assert len(keys) == length
    assert [keys[i] for i in range(length)] == [sort_tuple_at(part, i) for i in range(length)]
    assert keys[-1] == sort_tuple_at(part, length - 1)
