"""Conditional-update (compare-and-set) throughput of the metadata store.

Every change to a tablet's file set is a read followed by a version compare-and-set (SYSTEM.md 4),
so this rate bounds how many flushes, compaction reservations and commits per second one store
can record. One thread hammers one tablet of a table with 10,000 tablets (as in the prototype's
measurement) and reports:

* `mutate`: `MetadataStore.mutate_tablet` (a read transaction, then a CAS write transaction),
  the path every real caller takes;
* `cas`: `update_tablet` alone, chaining the returned meta (one write transaction per op);
* `batch`: `mutate_tablets` over `--batch` tablets at a time (one read and one write transaction
  per batch, each tablet its own compare-and-set: the coordinator's group commit of
  reservations), reported as tablet updates per second;
* `raw_sqlite3` (SQLite only): the prototype's loop in plain sqlite3, BEGIN IMMEDIATE / SELECT /
  UPDATE WHERE version / COMMIT, on this machine, so that the cost of the store's layers can be
  told apart from the speed of the disk and CPU.

The prototype's figure (PERFORMANCE_NOTES.md) is printed as the named baseline with the ratio.

    .venv/bin/python benchmarks/metadata_cas.py --ops 5000 \
        --url postgresql+psycopg://postgres@127.0.0.1:5432/test --json
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from lithify.data.ranges import FileRef
from lithify.metadata.store import MetadataStore, TabletMeta

#: PERFORMANCE_NOTES.md: raw sqlite3, WAL, synchronous=NORMAL, one row of 10,000.
BASELINE_NAME = "prototype raw sqlite3 WAL synchronous=NORMAL"
BASELINE_TX_S = 25_451.0


def _bump(meta: TabletMeta) -> TabletMeta:
    """A small change like a flush makes: a new sequence number and a one-file set."""
    return meta.replace(
        flushed_seq=meta.flushed_seq + 1,
        files=(FileRef(f"F{meta.flushed_seq + 1:08d}.parquet", 1024, 10),),
    )


def bench_store(url: str, ops: int, tablets: int, sync: str | None, batch: int) -> dict[str, Any]:
    """mutate, cas and batch rates of `MetadataStore` at `url`; the bench table is deleted
    after."""
    store = MetadataStore.open(url, synchronous=sync) if sync else MetadataStore.open(url)
    try:
        splits = [f"row{i:06d}".encode() for i in range(1, tablets)]
        table = store.create_table(f"bench_cas_{uuid.uuid4().hex[:8]}", {}, splits)
        try:
            target = store.tablets(table.id)[tablets // 2]
            extent = target.extent

            t0 = time.perf_counter()
            for _ in range(ops):
                store.mutate_tablet(extent, _bump)
            mutate_s = time.perf_counter() - t0

            meta = store.get_tablet(extent)
            assert meta is not None
            t0 = time.perf_counter()
            for _ in range(ops):
                meta = store.update_tablet(meta, _bump(meta))
            cas_s = time.perf_counter() - t0
            final = store.get_tablet(extent)
            assert final is not None and final.flushed_seq == 2 * ops, "lost an update"

            group = [m.extent for m in store.tablets(table.id)[: min(batch, tablets)]]
            rounds = max(1, ops // len(group))
            t0 = time.perf_counter()
            for _ in range(rounds):
                outcomes = store.mutate_tablets([(e, _bump) for e in group])
                assert all(o.meta is not None for o in outcomes), "a batch item failed"
            batch_s = time.perf_counter() - t0
        finally:
            store.delete_table(table.id)
        return {
            "url": url.split("@")[-1] if "@" in url else url,
            "backend": store.dialect,
            "ops": ops,
            "mutate_tx_s": round(ops / mutate_s, 1),
            "cas_tx_s": round(ops / cas_s, 1),
            "batch": len(group),
            "batch_updates_s": round(rounds * len(group) / batch_s, 1),
        }
    finally:
        store.close()


def bench_raw_sqlite(path: Path, ops: int, rows: int, sync: str) -> float:
    """The prototype's loop in plain sqlite3 (one row of `rows`), tx/s."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, files TEXT, version INTEGER)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t VALUES (?, '[]', 0)", ((i,) for i in range(rows)))
        conn.execute("COMMIT")
        key = rows // 2
        t0 = time.perf_counter()
        for i in range(ops):
            conn.execute("BEGIN IMMEDIATE")
            (version,) = conn.execute("SELECT version FROM t WHERE k = ?", (key,)).fetchone()
            cur = conn.execute(
                "UPDATE t SET files = ?, version = ? WHERE k = ? AND version = ?",
                (f'["F{i}"]', version + 1, key, version),
            )
            assert cur.rowcount == 1
            conn.execute("COMMIT")
        return ops / (time.perf_counter() - t0)
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        action="append",
        default=[],
        help="metadata URL to measure as well (repeatable); SQLite in a temporary directory is "
        "always measured unless a sqlite URL is given",
    )
    parser.add_argument("--ops", type=int, default=5000, help="operations per measurement")
    parser.add_argument("--tablets", type=int, default=10_000, help="tablets in the bench table")
    parser.add_argument("--sync", default="NORMAL", help="SQLite synchronous level")
    parser.add_argument("--batch", type=int, default=16, help="tablets per mutate_tablets call")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.ops < 1 or args.tablets < 1 or args.batch < 1:
        parser.error("--ops, --tablets and --batch must be positive")

    results: list[dict[str, Any]] = []
    raw: float | None = None
    with tempfile.TemporaryDirectory(prefix="lithify-cas-") as tmp:
        urls = list(args.url)
        if not any(u.startswith("sqlite") for u in urls):
            urls.insert(0, f"sqlite:///{Path(tmp) / 'meta.db'}")
        for url in urls:
            sync = args.sync if url.startswith("sqlite") else None
            results.append(bench_store(url, args.ops, args.tablets, sync, args.batch))
        raw = bench_raw_sqlite(Path(tmp) / "raw.db", args.ops, args.tablets, args.sync)

    for r in results:
        r["mutate_vs_baseline"] = round(r["mutate_tx_s"] / BASELINE_TX_S, 3)
        r["cas_vs_baseline"] = round(r["cas_tx_s"] / BASELINE_TX_S, 3)
    report = {
        "baseline": {"name": BASELINE_NAME, "tx_s": BASELINE_TX_S},
        "raw_sqlite3_here_tx_s": round(raw, 1),
        "raw_sqlite3_here_vs_baseline": round(raw / BASELINE_TX_S, 3),
        "sqlite_synchronous": args.sync.upper(),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"baseline ({BASELINE_NAME}): {BASELINE_TX_S:,.0f} tx/s")
    print(f"raw sqlite3 on this machine: {raw:,.0f} tx/s ({raw / BASELINE_TX_S:.2f}x baseline)")
    for r in results:
        print(
            f"{r['backend']:<10} mutate_tablet (read tx + CAS tx): {r['mutate_tx_s']:>9,.0f} op/s "
            f"({r['mutate_vs_baseline']:.3f}x)   update_tablet (CAS tx): "
            f"{r['cas_tx_s']:>9,.0f} tx/s ({r['cas_vs_baseline']:.3f}x)   mutate_tablets "
            f"(batches of {r['batch']}): {r['batch_updates_s']:>9,.0f} updates/s"
        )


if __name__ == "__main__":
    main()
