"""Subcompaction boundaries estimated from row-group statistics (pure logic, no files)."""

from __future__ import annotations

import bisect
import random

from hypothesis import given
from hypothesis import strategies as st

from lithify.compaction.split_points import split_rows


def _groups(rows: list[bytes], size: int) -> list[tuple[bytes, bytes, int]]:
    """Row-group statistics of a sorted file holding `rows`, `size` entries per row group."""
    return [
        (rows[i], rows[min(i + size, len(rows)) - 1], min(size, len(rows) - i))
        for i in range(0, len(rows), size)
    ]


def _counts(files: list[list[bytes]], bounds: list[bytes]) -> list[int]:
    """Entries of all files in each range (a range ends at its boundary, inclusive)."""
    counts = [0] * (len(bounds) + 1)
    for rows in files:
        for row in rows:
            counts[bisect.bisect_left(bounds, row)] += 1
    return counts


def _hex_files(rng: random.Random, files: int, entries: int, prefix: bytes) -> list[list[bytes]]:
    return [
        sorted(prefix + f"{rng.getrandbits(64):016x}".encode() for _ in range(entries))
        for _ in range(files)
    ]


def test_parts_of_random_rows_are_even_within_a_row_group() -> None:
    rng = random.Random(7)
    files = _hex_files(rng, files=10, entries=20_000, prefix=b"")
    groups = [g for rows in files for g in _groups(rows, 4096)]
    for parts in (2, 3, 8):
        bounds = split_rows(groups, parts)
        assert len(bounds) == parts - 1 and bounds == sorted(set(bounds))
        counts = _counts(files, bounds)
        # row-group edges alone would leave parts up to a row group (4096 x 10 files) apart
        assert max(counts) - min(counts) < 0.03 * sum(counts) / parts, counts


def test_shared_prefix_does_not_blind_the_estimate() -> None:
    rng = random.Random(8)
    files = _hex_files(rng, files=4, entries=10_000, prefix=b"tenant-0042/user/")
    bounds = split_rows([g for rows in files for g in _groups(rows, 1000)], 4)
    assert all(b.startswith(b"tenant-0042/user/") for b in bounds)
    counts = _counts(files, bounds)
    assert max(counts) - min(counts) < 0.05 * sum(counts) / 4, counts


def test_one_hot_row_cannot_be_split() -> None:
    assert split_rows([(b"hot", b"hot", 1_000_000)], 4) == [b"hot"]
    bounds = split_rows([(b"a", b"a", 10), (b"hot", b"hot", 1_000_000), (b"z", b"z", 10)], 2)
    assert bounds == [b"hot"]


def test_nothing_to_split() -> None:
    assert split_rows([], 4) == []
    assert split_rows([(b"a", b"z", 100)], 1) == []
    assert split_rows([(b"a", b"z", 0)], 2) == []


@given(
    st.lists(
        st.tuples(st.binary(max_size=12), st.binary(max_size=12), st.integers(0, 10_000)),
        max_size=30,
    ),
    st.integers(1, 9),
)
def test_boundaries_increase_and_lie_within_the_rows(
    raw: list[tuple[bytes, bytes, int]], parts: int
) -> None:
    groups = [(min(a, b), max(a, b), n) for a, b, n in raw]
    bounds = split_rows(groups, parts)
    assert len(bounds) <= max(0, parts - 1)
    assert bounds == sorted(set(bounds))
    live = [g for g in groups if g[2] > 0]
    if bounds:
        assert min(g[0] for g in live)[:8] <= bounds[0][:8]
        assert bounds[-1][:8] <= max(g[1] for g in live)[:8] + b"\xff"
