"""Prometheus metrics of a store or tablet server, computed when scraped.

A custom collector reads the live state (executors, tablets, compaction totals, flushes) at
scrape time, so nothing on the write or compaction path pays for bookkeeping beyond a counter.
Executor ids label the series: `i.<service>.<executor>` for internal, `e.<queue>` for external.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lithify.store import Store

_TOTALS = (
    ("completed", "compactions completed"),
    ("failed", "compactions failed"),
    ("cancelled", "compactions cancelled"),
    ("entries_read", "entries read by compactions"),
    ("entries_written", "entries written by compactions"),
    ("bytes_read", "bytes read by compactions"),
    ("bytes_written", "bytes written by compactions"),
)


class StoreCollector(Collector):
    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        store = self._store
        queued = GaugeMetricFamily(
            "lithify_compactions_queued", "compaction jobs queued per executor", labels=["executor"]
        )
        running = GaugeMetricFamily(
            "lithify_compactions_running",
            "compaction jobs running per executor",
            labels=["executor"],
        )
        threads = GaugeMetricFamily(
            "lithify_executor_threads", "threads of each internal executor", labels=["executor"]
        )
        for ex_id, st in sorted(store.manager.executor_stats().items()):
            queued.add_metric([ex_id], st.queued)
            running.add_metric([ex_id], st.running)
            ex = store.manager.executor(ex_id)
            threads.add_metric([ex_id], ex.threads if ex else 0)
        yield queued
        yield running
        yield threads

        totals = store.compactions.totals.snapshot()
        for key, help_text in _TOTALS:
            c = CounterMetricFamily(f"lithify_compaction_{key}", help_text, labels=["executor"])
            for ex_id, vals in sorted(totals.items()):
                c.add_metric([ex_id], vals[key])
            yield c

        counts = store.files_per_tablet()
        mean = GaugeMetricFamily("lithify_tablet_files_mean", "mean files per tablet")
        mean.add_metric([], sum(counts) / len(counts) if counts else 0.0)
        yield mean
        mx = GaugeMetricFamily("lithify_tablet_files_max", "most files of any tablet")
        mx.add_metric([], max(counts) if counts else 0)
        yield mx
        tablets = GaugeMetricFamily("lithify_tablets", "tablets hosted")
        tablets.add_metric([], len(counts))
        yield tablets

        minc_q, minc_r = store.flush_stats()
        q = GaugeMetricFamily("lithify_minc_queued", "flushes (minor compactions) queued")
        q.add_metric([], minc_q)
        yield q
        r = GaugeMetricFamily("lithify_minc_running", "flushes (minor compactions) running")
        r.add_metric([], minc_r)
        yield r
        mem = GaugeMetricFamily("lithify_memory_bytes", "bytes in in-memory maps")
        mem.add_metric([], store.memory_bytes())
        yield mem


def registry_for(store: Store) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(store))
    return reg


def exposition(store: Store) -> bytes:
    """The Prometheus text format of a store's metrics."""
    return generate_latest(registry_for(store))


def scrape(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Parse Prometheus text into {sample name: {sorted label pairs: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out
