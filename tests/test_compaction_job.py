"""run_compaction: one output file equal to the reference merge, whatever the subcompactions."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow as pa
import pytest

from lithify.compaction import compactor_job
from lithify.compaction.compactor_job import CompactionRequest, run_compaction
from lithify.data.key import ENTRY_SCHEMA
from lithify.data.ranges import FileRef, RowRange
from lithify.errors import CompactionCancelledError, ConfigError, CorruptFileError
from lithify.files.reader import SortedFileReader
from lithify.files.storage import Storage
from lithify.files.writer import write_entries
from tests.test_merge import Entry, reference_merge, sort_entries, to_entries, to_table


def make_runs(n_runs: int, n: int, seed: int) -> list[list[Entry]]:
    """Overlapping runs, oldest first: later runs rewrite and delete some earlier keys."""
    rnd = random.Random(seed)
    runs: list[list[Entry]] = []
    keys: list[tuple[bytes, bytes]] = []
    for r in range(n_runs):
        ts = 1000 * (r + 1)
        run = []
        for _ in range(n):
            if keys and rnd.random() < 0.2:
                row, q = rnd.choice(keys)
            else:
                row, q = b"%06d" % rnd.randrange(10**6), b"q%d" % rnd.randrange(3)
                keys.append((row, q))
            deleted = rnd.random() < 0.05
            run.append((row, b"f", q, b"", ts + rnd.randrange(3), deleted, rnd.randbytes(4)))
        runs.append(sort_entries(run))
    return runs


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Storage, list[FileRef], list]:
    storage = Storage(str(tmp_path_factory.mktemp("cj")))
    runs = make_runs(4, 3000, seed=11)
    refs = []
    for i, run in enumerate(runs):
        info = write_entries(storage, f"tables/t/F{i}.parquet", to_table(run), row_group_size=256)
        refs.append(FileRef(info.path, info.size, info.entries))
    return storage, refs[::-1], runs[::-1]  # newest first


def read_output(storage: Storage, path: str) -> list[Entry]:
    with SortedFileReader.open(storage, path) as r:
        return to_entries(pa.Table.from_batches(list(r.batches()), schema=ENTRY_SCHEMA))


def request(refs: list[FileRef], tmp_id: str, **kw: object) -> CompactionRequest:
    base: dict = dict(
        inputs=refs,
        extent_range=RowRange(),
        output_path="tables/t/A9.parquet",
        tmp_id=tmp_id,
        propagate_deletes=False,
        versions=1,
        min_subcompaction_entries=500,
        batch_size=700,
        row_group_size=300,
    )
    base.update(kw)
    return CompactionRequest(**base)


@pytest.mark.parametrize("subs", [1, 4])
@pytest.mark.parametrize("versions,propagate", [(1, False), (2, True), (None, False)])
def test_output_matches_reference(files, subs: int, versions: int | None, propagate: bool) -> None:
    storage, refs, runs = files
    tid = f"s{subs}v{versions}p{int(propagate)}"
    progress: list[tuple[int, int]] = []
    limited: list[int] = []

    class Limiter:
        def acquire(self, nbytes: int) -> None:
            limited.append(nbytes)

    res = run_compaction(
        storage,
        request(refs, tid, subcompactions=subs, versions=versions, propagate_deletes=propagate),
        on_progress=lambda r, w: progress.append((r, w)),
        rate_limiter=Limiter(),
    )
    want = reference_merge(runs, versions=versions, propagate_deletes=propagate)
    assert res.tmp_path == f"tables/t/A9.parquet_tmp_{tid}"
    assert res.final_path == "tables/t/A9.parquet"
    assert read_output(storage, res.tmp_path) == want
    assert res.entries_read == sum(len(r) for r in runs)
    assert res.entries_written == len(want)
    assert progress[-1] == (res.entries_read, res.entries_written)
    assert res.bytes_written == storage.size(res.tmp_path)
    assert res.bytes_read > 0 and sum(limited) >= res.bytes_written
    assert res.first_key is not None and res.first_key.row == want[0][0]
    assert res.last_key is not None and res.last_key.row == want[-1][0]
    assert not [p for p in storage.list_files("tables") if "_part" in p]
    with SortedFileReader.open(storage, res.tmp_path) as r:
        assert r.entries == len(want) and r.format_version == 1
    storage.delete(res.tmp_path)


def test_subcompactions_split_the_work(files) -> None:
    storage, refs, runs = files
    res1 = run_compaction(storage, request(refs, "one", subcompactions=1))
    res4 = run_compaction(storage, request(refs, "four", subcompactions=4))
    assert read_output(storage, res1.tmp_path) == read_output(storage, res4.tmp_path)
    with SortedFileReader.open(storage, res4.tmp_path) as r:
        assert r.num_row_groups >= 4


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="read-ahead needs a spare core")
def test_one_thread_reads_inputs_in_its_own_thread(files, monkeypatch: pytest.MonkeyPatch) -> None:
    """`subcompactions` is the threads a compaction may use: with 1 (a compactor given its
    share of a host) no read-ahead threads start; with more, one part reads its inputs ahead."""
    storage, refs, _ = files
    started: list[int] = []
    real_init = compactor_job._ReadAhead.__init__

    def counting_init(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        started.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(compactor_job._ReadAhead, "__init__", counting_init)
    one = run_compaction(storage, request(refs, "t1", subcompactions=1))
    assert started == []
    many = run_compaction(
        storage, request(refs, "t2", subcompactions=2, min_subcompaction_entries=10**9)
    )
    assert len(started) == len(refs)  # one part, two threads allowed: each input read ahead
    assert read_output(storage, one.tmp_path) == read_output(storage, many.tmp_path)
    storage.delete(one.tmp_path)
    storage.delete(many.tmp_path)


def test_fences_and_extent(files) -> None:
    storage, refs, runs = files
    fences = [RowRange(b"1", b"6"), RowRange(), RowRange(None, b"4"), RowRange(b"3", None)]
    fenced = [
        FileRef(f.path, f.size, f.entries, fence) for f, fence in zip(refs, fences, strict=True)
    ]
    extent = RowRange(b"2", b"8")
    res = run_compaction(storage, request(fenced, "fenced", subcompactions=3, extent_range=extent))
    want_sources = [
        [e for e in run if fence.contains(e[0]) and extent.contains(e[0])]
        for run, fence in zip(runs, fences, strict=True)
    ]
    want = reference_merge(want_sources, versions=1, propagate_deletes=False)
    assert read_output(storage, res.tmp_path) == want


def test_age_off_iterator_in_request(files) -> None:
    storage, refs, runs = files
    specs = [("lithify.compaction.iterators:AgeOffFilter", {"ttl": "1500", "currentTime": "4000"})]
    res = run_compaction(storage, request(refs, "ageoff", subcompactions=2, iterators=specs))
    want = reference_merge(runs, versions=1, propagate_deletes=False, min_timestamp=2500)
    assert read_output(storage, res.tmp_path) == want


def test_empty_result(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    e = [(b"a", b"f", b"q", b"", 5, True, b"")]
    info = write_entries(storage, "tables/t/F1.parquet", to_table(e))
    res = run_compaction(storage, request([FileRef(info.path, info.size, info.entries)], "empty"))
    assert res.entries_written == 0 and res.first_key is None
    assert read_output(storage, res.tmp_path) == []


def test_missing_input_leaves_nothing(files) -> None:
    storage, refs, _ = files
    before = storage.list_files("")
    bad = [*refs, FileRef("tables/t/missing.parquet", 1, 1)]
    with pytest.raises(CorruptFileError, match="missing.parquet"):
        run_compaction(storage, request(bad, "missing", subcompactions=2))
    assert storage.list_files("") == before


def test_bad_iterator_rejected_before_work(files) -> None:
    storage, refs, _ = files
    before = storage.list_files("")
    with pytest.raises(ConfigError, match="nope:Nope"):
        run_compaction(storage, request(refs, "badit", iterators=[("nope:Nope", {})]))
    assert storage.list_files("") == before


def test_cancel_before_start_removes_temp(files) -> None:
    storage, refs, _ = files
    before = storage.list_files("")
    with pytest.raises(CompactionCancelledError):
        run_compaction(
            storage, request(refs, "cancel", subcompactions=3), is_cancelled=lambda: True
        )
    assert storage.list_files("") == before


def test_corrupt_input_fails_and_cleans_up(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    runs = make_runs(2, 2000, seed=5)
    refs = []
    for i, run in enumerate(runs):
        info = write_entries(
            storage, f"tables/t/F{i}.parquet", to_table(run), compression="none", row_group_size=200
        )
        refs.append(FileRef(info.path, info.size, info.entries))
    path = Path(storage.path(refs[1].path))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    before = storage.list_files("")
    with pytest.raises(CorruptFileError, match="F1.parquet"):
        run_compaction(storage, request(refs[::-1], "corrupt", subcompactions=2))
    assert storage.list_files("") == before


def test_merge_buffer_settings_apply_once() -> None:
    """On glibc the settings are accepted (mallopt refuses out-of-range values), then kept."""
    import platform

    from lithify.compaction import allocator

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc is not glibc's")
    assert allocator.keep_merge_buffers() is True
    assert allocator.keep_merge_buffers() is True
