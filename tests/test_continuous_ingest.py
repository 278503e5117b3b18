"""Continuous ingest and verify (SYSTEM.md 7): the data-loss test, in process and through the CLI.

The big test writes a million linked-list entries into a pre-split store whose memory limit is
small, so flushes and system compactions run all through the ingest, then verifies the lists.
A lost entry anywhere in the flush/compaction pipeline shows up as UNDEFINED; a damaged one as
CORRUPT. Besides the linked-list check, the test counts the distinct rows it wrote (minus the
ones whose lists it deleted) and expects exactly that many entries, which also catches the loss
of an entry nothing points to. The negative checks delete a referenced row behind the ingester's
back and expect verify (and the CLI's exit status) to notice.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import lithify
from lithify import Mutation
from lithify.cli.ci import split_points
from lithify.continuous.ingest import ContinuousIngest
from lithify.continuous.verify import VerifyResult, verify_batches

TABLE = "ci"


class RowLedger:
    """The rows an ingest defined, kept as 64-bit integers (rows are 16 hex digits)."""

    def __init__(self) -> None:
        self.puts: list[np.ndarray] = []
        self.deletes: list[np.ndarray] = []

    @staticmethod
    def _ints(table: pa.Table) -> np.ndarray:
        return np.array([int(r, 16) for r in table.column("row").to_pylist()], dtype=np.uint64)

    def record(self, table: pa.Table) -> None:
        is_delete = "deleted" in table.column_names and table.num_rows > 0
        (self.deletes if is_delete else self.puts).append(self._ints(table))

    def live_rows(self) -> int:
        puts = np.unique(np.concatenate(self.puts)) if self.puts else np.array([], np.uint64)
        if not self.deletes:
            return len(puts)
        return len(np.setdiff1d(puts, np.concatenate(self.deletes), assume_unique=False))


def referenced_row(store: lithify.Store) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A row that some entry points to, and the (family, qualifier) of its entries."""
    target = None
    for _key, value in store.scan_entries(TABLE):
        prev = value.split(b":")[2]
        if prev:
            target = prev
            break
    assert target is not None, "no entry points to another: nothing to break"
    cols = [(k.family, k.qualifier) for k, _ in store.scan_entries(TABLE, target, target)]
    assert cols, f"referenced row {target!r} is not defined to begin with"
    return target, cols


def delete_row(store: lithify.Store, row: bytes, cols: list[tuple[bytes, bytes]]) -> None:
    m = Mutation(row)
    for fam, qual in cols:
        m.delete(fam, qual)
    store.write(TABLE, [m])


def assert_healthy(result: VerifyResult) -> None:
    assert result.undefined == 0, result.undefined_examples
    assert result.corrupt == 0
    assert result.referenced > 0 and result.unreferenced > 0


@pytest.mark.slow
def test_million_entries_with_compactions_running(tmp_path: Path) -> None:
    ledger = RowLedger()
    with lithify.open(tmp_path / "store") as store:
        store.set_system_property("tserver.memory.maps.max", "4M")
        store.create_table(TABLE, splits=split_points(8))

        def write(table: pa.Table) -> None:
            ledger.record(table)
            store.write(TABLE, table)

        ingest = ContinuousIngest(write, batch_size=4_000, delete_probability=0.25, seed=11)
        stats = ingest.run(1_000_000)
        assert stats.written >= 1_000_000
        assert stats.deleted > 0, "this seed should delete at least one set of lists"
        during = store.compactions.totals.snapshot()
        assert sum(v["completed"] for v in during.values()) > 0, "no compaction ran during ingest"
        assert len(store.tablets(TABLE)) == 8
        assert all(n > 0 for n in store.files_per_tablet()), "every tablet should have flushed"

        result = verify_batches(store.scan(TABLE))
        assert_healthy(result)
        assert result.entries == ledger.live_rows()

        # After the background work settles and a full compaction drops the deletes: the same.
        store.flush(TABLE)
        assert store.wait_for_compactions(120)
        store.compact(TABLE, timeout=120)
        assert store.files_per_tablet() == [1] * 8
        again = verify_batches(store.scan(TABLE))
        assert (again.referenced, again.unreferenced, again.undefined, again.corrupt) == (
            result.referenced,
            result.unreferenced,
            0,
            0,
        )
        assert again.entries == result.entries


def test_verify_detects_a_deleted_referenced_row(tmp_path: Path, metadata_url: str) -> None:
    with lithify.open(tmp_path / "store", metadata_url=metadata_url) as store:
        store.set_system_property("tserver.memory.maps.max", "256K")
        store.create_table(TABLE, splits=split_points(4))
        ContinuousIngest(lambda t: store.write(TABLE, t), batch_size=200, seed=3).run(20_000)
        assert_healthy(verify_batches(store.scan(TABLE)))
        row, cols = referenced_row(store)
        delete_row(store, row, cols)
        broken = verify_batches(store.scan(TABLE))
        assert broken.undefined == 1 and broken.undefined_examples == [row]
        store.compact(TABLE)  # a full compaction keeps the loss visible (nothing resurrected)
        assert verify_batches(store.scan(TABLE)).undefined_examples == [row]


def test_verify_detects_a_corrupt_value() -> None:
    batch = pa.RecordBatch.from_pydict(
        {
            "row": [b"0000000000000001"],
            "family": [b"0001"],
            "qualifier": [b"0002"],
            "value": [b"client:0000000000000000::payload:00000000"],
        }
    )
    result = verify_batches([batch])
    assert result.corrupt == 1 and not result.ok


# -- the CLI --------------------------------------------------------------------------------------


def lithify_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lithify")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lithify"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def counts(output: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^([A-Z]+)=(\d+)$", output, flags=re.M)}


@pytest.fixture
def cli_store(tmp_path: Path, metadata_url: str) -> Iterator[list[str]]:
    """The `--store`/`--metadata-url` arguments of a fresh store."""
    yield ["--store", str(tmp_path / "cli-store"), "--metadata-url", metadata_url]


def test_cli_ingest_verify_and_a_broken_list(cli_store: list[str]) -> None:
    ingest = lithify_cli(
        "ci", "ingest", *cli_store, "--entries", "30000", "--batch-size", "500", "--tablets", "4",
        "--seed", "5",
    )  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr
    written = re.search(r"wrote (\d+) entries \((\d+) deletes\)", ingest.stdout)
    assert written is not None, ingest.stdout
    assert int(written.group(1)) >= 30_000

    ok = lithify_cli("ci", "verify", *cli_store)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    healthy = counts(ok.stdout)
    assert healthy["UNDEFINED"] == 0 and healthy["CORRUPT"] == 0
    assert healthy["REFERENCED"] > 0 and healthy["UNREFERENCED"] > 0

    store_dir, url = cli_store[1], cli_store[3]
    with lithify.open(store_dir, metadata_url=url) as store:
        assert len(store.tablets(TABLE)) == 4
        row, cols = referenced_row(store)
        delete_row(store, row, cols)

    bad = lithify_cli("ci", "verify", *cli_store)
    assert bad.returncode != 0
    broken = counts(bad.stdout)
    assert broken["UNDEFINED"] == 1 and broken["CORRUPT"] == 0
    assert f"undefined row {row.decode()}" in bad.stdout
    # Exactly one defined row fewer (REFERENCED + UNREFERENCED counts the defined rows), and it
    # was a referenced one.
    assert (
        broken["REFERENCED"] + broken["UNREFERENCED"]
        == healthy["REFERENCED"] + healthy["UNREFERENCED"] - 1
    )
    assert broken["REFERENCED"] < healthy["REFERENCED"]
