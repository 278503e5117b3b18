"""Compaction configuration on a live store (SYSTEM.md 5.2, 5.3), on both metadata backends.

Configuration changes while compactions run, so two promises are checked here: a bad value is
rejected whole (the message names the property and nothing at all is applied: not the stored
properties, not the services, not one executor's thread count), and a good value takes effect
without a restart (threads resized, services added and removed, tables re-routed). A compaction
iterator defined in this module holds compactions open on a gate, so that "running" and
"queued" can be observed instead of guessed from timing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping

import pytest

import lithify
from lithify import Mutation
from lithify.compaction.planner import DefaultCompactionPlanner
from lithify.compaction.spi import CompactionDispatcher, CompactionKind
from lithify.errors import ConfigError
from tests.gates import WAIT_S, Gate, new_gate, wait_until

SVC = "tserver.compaction.major.service."
CS1_EXECUTORS = SVC + "cs1.planner.opts.executors"
#: Rows that fall one into each tablet of a table split at SPLITS.
SPLITS = ["b", "d", "f", "h", "j", "l"]
ROWS = ["a", "c", "e", "g", "i", "k", "m"]


def gate_properties(gate: Gate) -> dict[str, str]:
    """Table properties that run every compaction of the table through `gate`."""
    return {
        "table.iterator.majc.gate": f"10,{gate.iterator()[0]}",
        "table.iterator.majc.gate.opt.gate": gate.name,
    }


# -- plug-ins for the dispatcher and planner cases ------------------------------------------------


class ExplodingDispatcher(CompactionDispatcher):
    """A dispatcher whose every decision fails: the store must fall back to `default`."""

    def init(self, options: Mapping[str, str]) -> None:
        pass

    def dispatch(
        self, kind: CompactionKind, hints: Mapping[str, str], table_properties: Mapping[str, str]
    ) -> str:
        raise RuntimeError("dispatcher exploded on purpose")


#: While True, FlakyPlanner.init fails (a planner whose dependency is missing at startup).
PLANNER_BROKEN = {"value": False}


class FlakyPlanner(DefaultCompactionPlanner):
    def init(self, service: str, options: Mapping[str, str]) -> None:
        if PLANNER_BROKEN["value"]:
            raise RuntimeError("planner dependency unavailable")
        super().init(service, options)


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path, metadata_url) -> Iterator[lithify.Store]:
    s = lithify.open(tmp_path / "store", metadata_url=metadata_url)
    yield s
    s.close()


@pytest.fixture
def gate(store: lithify.Store) -> Iterator[Gate]:
    """A fresh gate; opened (before the store closes) when the test ends, pass or fail."""
    with new_gate() as g:
        yield g


def executors_json(*specs: dict) -> str:
    return json.dumps(list(specs))


def config_state(store: lithify.Store) -> tuple:
    """Everything a configuration change could alter: stored and live properties, services,
    executors and their thread counts."""
    threads = {}
    for ex_id in store.manager.executor_stats():
        ex = store.manager.executor(ex_id)
        threads[ex_id] = None if ex is None else ex.threads
    return (
        store.meta.get_system_properties(),
        store.system_properties().explicit(),
        store.manager.services(),
        threads,
        store.manager.service_errors(),
    )


def write_round(store: lithify.Store, table: str, tag: str, rows: list[str] = ROWS) -> None:
    """One entry per row (so one per tablet), then a flush: one more file in every tablet."""
    store.write(table, [Mutation(r.encode()).put("f", tag, f"{tag}-{r}") for r in rows])
    store.flush(table)


def completed_by_executor(store: lithify.Store) -> dict[str, int]:
    return {k: v["completed"] for k, v in store.compactions.totals.snapshot().items()}


# -- rejected configuration -----------------------------------------------------------------------

GOOD_CS1 = executors_json(
    {"name": "small", "maxSize": "1M", "numThreads": 2},
    {"name": "large", "numThreads": 1},
)

INVALID = [
    pytest.param(
        CS1_EXECUTORS,
        executors_json(
            {"name": "a", "maxSize": "1M", "numThreads": 1},
            {"name": "b", "maxSize": "1024K", "numThreads": 1},
        ),
        "maxSize",
        id="duplicate-maxSize",
    ),
    pytest.param(
        CS1_EXECUTORS,
        executors_json({"name": "a", "maxSize": "1M"}, {"name": "b", "numThreads": 1}),
        "numThreads",
        id="internal-without-numThreads",
    ),
    pytest.param(
        CS1_EXECUTORS,
        executors_json({"name": "a", "numThreads": 1}, {"name": "e", "type": "external"}),
        "queue",
        id="external-without-queue",
    ),
    pytest.param(
        CS1_EXECUTORS,
        executors_json({"name": "e", "type": "external", "queue": "q1", "numThreads": 2}),
        "numThreads",
        id="external-with-numThreads",
    ),
    pytest.param(
        CS1_EXECUTORS,
        executors_json({"name": "a", "numThreads": 1}, {"name": "b", "numThreads": 1}),
        "maxSize",
        id="two-without-maxSize",
    ),
    pytest.param(CS1_EXECUTORS, '[{"name": "a", "numThreads": 1', "JSON", id="bad-json"),
    pytest.param(CS1_EXECUTORS, "[]", "at least one", id="no-executors"),
    pytest.param(
        CS1_EXECUTORS, executors_json({"name": "a", "numThreads": 0}), "numThreads", id="0-threads"
    ),
    pytest.param(
        CS1_EXECUTORS,
        executors_json({"name": "a", "numThreads": 1, "threads": 4}),
        "threads",
        id="unknown-field",
    ),
    pytest.param(SVC + "cs1.planner.opts.maxOpen", "1", "maxOpen", id="maxOpen-1"),
    pytest.param(SVC + "cs1.planner.opts.maxOpen", "ten", "maxOpen", id="maxOpen-text"),
    pytest.param(SVC + "default.planner.opts.maxOpen", "0", "maxOpen", id="default-maxOpen-0"),
    pytest.param(SVC + "cs1.planner.opts.lowestRatio", "0.5", "lowestRatio", id="lowestRatio"),
    pytest.param(SVC + "cs1.planner.opts.lowestRatio", "x", "lowestRatio", id="lowestRatio-text"),
    pytest.param(SVC + "cs1.planner.opts.maxopen", "5", "unknown option", id="option-typo"),
    pytest.param(
        SVC + "cs1.planner", "no_such_module_xyz:Planner", "no_such_module_xyz", id="planner-module"
    ),
    pytest.param(
        SVC + "cs1.planner", "lithify.compaction.planner:NoSuchPlanner", "NoSuch", id="planner-cls"
    ),
    pytest.param(
        SVC + "cs1.planner",
        "lithify.compaction.dispatcher:SimpleCompactionDispatcher",
        "CompactionPlanner",
        id="planner-wrong-kind",
    ),
    pytest.param(SVC + "cs1.planner", "not a class", "module:Class", id="planner-syntax"),
    pytest.param(SVC + "cs1.rate.limit", "fast", "rate.limit", id="rate-text"),
    pytest.param(SVC + "cs1.rate.limit", "-1", "rate.limit", id="rate-negative"),
    pytest.param(SVC + "default.rate.limit", "10X", "rate.limit", id="default-rate-unit"),
    pytest.param(SVC + "cs1.speed", "1", "speed", id="unknown-service-setting"),
    pytest.param(SVC + "cs1", "x", "service", id="service-without-setting"),
    pytest.param(
        SVC + "default.planner.opts.executors",
        executors_json({"name": "x", "maxSize": "-1", "numThreads": 1}),
        "maxSize",
        id="default-executors",
    ),
]


@pytest.mark.parametrize(("name", "value", "words"), INVALID)
def test_invalid_service_configuration_rejected_and_nothing_applied(
    store: lithify.Store, name: str, value: str, words: str
) -> None:
    store.set_system_property(CS1_EXECUTORS, GOOD_CS1)
    store.set_system_property(SVC + "cs1.planner.opts.maxOpen", "5")
    before = config_state(store)
    assert set(before[2]) == {"default", "cs1"}
    assert before[3]["i.cs1.small"] == 2 and before[3]["i.default.small"] == 2

    with pytest.raises(ConfigError) as err:
        store.set_system_property(name, value)
    message = str(err.value)
    assert name in message, message
    assert words in message, message
    assert config_state(store) == before


def test_planner_class_error_names_the_planner_property(store: lithify.Store) -> None:
    store.set_system_property(CS1_EXECUTORS, GOOD_CS1)
    with pytest.raises(ConfigError) as err:
        store.set_system_property(SVC + "cs1.planner", "no_such_module_xyz:Planner")
    assert SVC + "cs1.planner" in str(err.value) and "executors" not in str(err.value)


def test_new_service_needs_executors(store: lithify.Store) -> None:
    before = config_state(store)
    with pytest.raises(ConfigError, match=r"service\.cs2\.planner\.opts\.executors"):
        store.set_system_property(
            SVC + "cs2.planner", "lithify.compaction.planner:DefaultCompactionPlanner"
        )
    assert config_state(store) == before


def test_unsetting_executors_of_a_configured_service_rejected(store: lithify.Store) -> None:
    """The whole resulting configuration is validated: removing one property may break it."""
    store.set_system_property(CS1_EXECUTORS, GOOD_CS1)
    store.set_system_property(SVC + "cs1.planner.opts.maxOpen", "4")
    before = config_state(store)
    with pytest.raises(ConfigError, match=r"cs1\.planner\.opts\.executors"):
        store.set_system_property(CS1_EXECUTORS, None)
    assert config_state(store) == before


def test_unknown_system_property_rejected(store: lithify.Store) -> None:
    before = config_state(store)
    with pytest.raises(ConfigError, match=r"tserver\.compaction\.major\.sevice\.cs1\.planner"):
        store.set_system_property("tserver.compaction.major.sevice.cs1.planner", "a:B")
    assert config_state(store) == before


def test_rejected_configuration_not_persisted_across_reopen(tmp_path, metadata_url) -> None:
    path = tmp_path / "s"
    with lithify.open(path, metadata_url=metadata_url) as s:
        s.set_system_property(CS1_EXECUTORS, GOOD_CS1)
        with pytest.raises(ConfigError):
            s.set_system_property(CS1_EXECUTORS, "[not json")
    with lithify.open(path, metadata_url=metadata_url) as s:
        assert s.system_properties().explicit()[CS1_EXECUTORS] == GOOD_CS1
        assert s.manager.executor("i.cs1.small").threads == 2


@pytest.mark.parametrize("value", ["0.5", "0", "-3", "abc", "nan"])
def test_ratio_below_one_rejected_naming_the_property(store: lithify.Store, value: str) -> None:
    store.create_table("t", properties={"table.compaction.major.ratio": "2"})
    before = store.get_properties("t")
    with pytest.raises(ConfigError, match=r"table\.compaction\.major\.ratio"):
        store.set_property("t", "table.compaction.major.ratio", value)
    assert store.get_properties("t") == before
    assert float(before["table.compaction.major.ratio"]) == 2.0
    with pytest.raises(ConfigError, match=r"table\.compaction\.major\.ratio"):
        store.create_table("u", properties={"table.compaction.major.ratio": value})
    assert [t.name for t in store.list_tables()] == ["t"]


def test_dispatcher_property_syntax_checked_at_set_time(store: lithify.Store) -> None:
    store.create_table("t")
    with pytest.raises(ConfigError, match=r"table\.compaction\.dispatcher"):
        store.set_property("t", "table.compaction.dispatcher", "not a class name")
    assert "table.compaction.dispatcher" not in store.meta.get_table("t").properties


# -- dispatchers that fail fall back to `default` -------------------------------------------------
#
# Decision (SYSTEM.md 5.2): a dispatcher of the right form that cannot be loaded, that fails, or
# that names a missing service is accepted at set time (the class may be deployed later, the
# service may be added later) and its table's compactions run on `default`, with an error log.


@pytest.mark.parametrize(
    ("prop", "value", "logged"),
    [
        (
            "table.compaction.dispatcher",
            "no_such_module_xyz:Dispatcher",
            "table.compaction.dispatcher",
        ),
        ("table.compaction.dispatcher", f"{__name__}:ExplodingDispatcher", "exploded on purpose"),
        ("table.compaction.dispatcher.opts.service", "cs_missing", "cs_missing"),
        ("table.compaction.dispatcher.opts.bogus", "x", "bogus"),
    ],
    ids=["unloadable", "raises", "missing-service", "bad-option"],
)
def test_failing_dispatcher_falls_back_to_default(
    store: lithify.Store, caplog: pytest.LogCaptureFixture, prop: str, value: str, logged: str
) -> None:
    store.create_table("t", properties={"table.compaction.major.ratio": "1.5"})
    store.set_property("t", prop, value)
    caplog.set_level(logging.ERROR, logger="lithify.compaction.manager")
    write_round(store, "t", "q1", ["a"])
    write_round(store, "t", "q2", ["a"])
    assert store.wait_for_compactions(WAIT_S)
    assert store.files_per_tablet() == [1]
    assert completed_by_executor(store).get("i.default.small") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(logged in m and "default" in m for m in errors), errors
    assert sorted(v for _, v in store.scan_entries("t")) == [b"q1-a", b"q2-a"]


# -- live changes ---------------------------------------------------------------------------------


def routed_table(store: lithify.Store, gate: Gate, service: str = "cs1") -> None:
    """Table `t`: 7 tablets, ratio 1.5 (two files make a job), dispatched to `service`."""
    store.create_table(
        "t",
        splits=SPLITS,
        properties={
            "table.compaction.major.ratio": "1.5",
            "table.compaction.dispatcher.opts.service": service,
            **gate_properties(gate),
        },
    )


def test_num_threads_change_takes_effect_live(store: lithify.Store, gate: Gate) -> None:
    store.set_system_property(CS1_EXECUTORS, executors_json({"name": "all", "numThreads": 1}))
    ex = store.manager.executor("i.cs1.all")
    assert ex is not None and ex.threads == 1
    routed_table(store, gate)
    write_round(store, "t", "q1")
    write_round(store, "t", "q2")
    stats = lambda: store.manager.executor_stats()["i.cs1.all"]  # noqa: E731
    assert wait_until(lambda: stats().running == 1 and stats().queued == 6), stats()
    time.sleep(0.3)
    assert gate.peak == 1 and stats().running == 1

    store.set_system_property(CS1_EXECUTORS, executors_json({"name": "all", "numThreads": 3}))
    assert store.manager.executor("i.cs1.all") is ex and ex.threads == 3
    assert wait_until(lambda: stats().running == 3 and gate.active == 3), stats()
    # At least the other four wait. (A plan made while a thread has taken a job but not yet
    # reserved its files may queue that job again; the copy finds its files taken and does
    # nothing, so only real compactions are counted below, from the compaction totals.)
    assert stats().queued >= 4

    store.set_system_property(CS1_EXECUTORS, executors_json({"name": "all", "numThreads": 1}))
    assert ex.threads == 1
    time.sleep(0.2)
    assert stats().running == 3, "shrinking must not interrupt running compactions"
    gate.open()
    assert store.wait_for_compactions(WAIT_S)
    assert store.files_per_tablet() == [1] * 7
    totals = store.compactions.totals.snapshot()["i.cs1.all"]
    assert (totals["completed"], totals["failed"], totals["cancelled"]) == (7, 0, 0)
    assert gate.peak == 3
    assert wait_until(lambda: threads_named("compact-i.cs1.all") == 1)
    assert sorted(k.qualifier for k, _ in store.scan_entries("t")) == [b"q1"] * 7 + [b"q2"] * 7


def threads_named(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name == name)


def test_new_service_runs_its_tables_compactions(
    store: lithify.Store, caplog: pytest.LogCaptureFixture
) -> None:
    store.create_table("plain", properties={"table.compaction.major.ratio": "1.5"})
    write_round(store, "plain", "q1", ["a"])
    write_round(store, "plain", "q2", ["a"])
    assert store.wait_for_compactions(WAIT_S)
    before = completed_by_executor(store)
    assert before == {"i.default.small": 1}

    store.set_system_property(
        CS1_EXECUTORS,
        executors_json(
            {"name": "tiny", "maxSize": "64K", "numThreads": 1},
            {"name": "huge", "numThreads": 2},
        ),
    )
    assert set(store.manager.services()) == {"default", "cs1"}
    assert {"i.cs1.tiny", "i.cs1.huge"} <= set(store.manager.executor_stats())
    assert store.manager.executor("i.cs1.huge").threads == 2
    store.create_table(
        "routed",
        splits=SPLITS,
        properties={
            "table.compaction.major.ratio": "1.5",
            "table.compaction.dispatcher.opts.service": "cs1",
        },
    )
    caplog.set_level(logging.INFO, logger="lithify.tablet.compactions")
    write_round(store, "routed", "q1")
    write_round(store, "routed", "q2")
    assert store.wait_for_compactions(WAIT_S)
    after = completed_by_executor(store)
    assert after.get("i.cs1.tiny") == 7
    assert {k: v for k, v in after.items() if not k.startswith("i.cs1.")} == before
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compacting")]
    assert len(started) == 7 and all(" on cs1.tiny for SYSTEM" in m for m in started), started


def test_removing_a_service_cancels_queued_and_finishes_running(
    store: lithify.Store, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    store.set_system_property(CS1_EXECUTORS, executors_json({"name": "all", "numThreads": 1}))
    routed_table(store, gate)
    write_round(store, "t", "q1")
    write_round(store, "t", "q2")
    ex = store.manager.executor("i.cs1.all")
    assert ex is not None
    assert wait_until(lambda: ex.stats().running == 1 and ex.stats().queued == 6), ex.stats()
    running = ex.running_jobs()[0]

    caplog.set_level(logging.ERROR, logger="lithify.compaction.manager")
    store.set_system_property(CS1_EXECUTORS, None)
    assert set(store.manager.services()) == {"default"}
    assert not any(k.startswith("i.cs1.") for k in store.manager.executor_stats())
    st = ex.stats()
    assert (st.queued, st.running, st.cancelled) == (0, 1, 6)
    assert not running.cancelled.is_set(), "the running compaction must be allowed to finish"
    # The table's dispatcher still names cs1: its tablets fall back to `default` (logged).
    assert any("cs1" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)

    gate.open()
    assert wait_until(lambda: ex.stats().running == 0)
    assert ex.stats().completed == 1 and ex.stats().failed == 0
    assert store.wait_for_compactions(WAIT_S)
    assert store.files_per_tablet() == [1] * 7
    totals = completed_by_executor(store)
    assert totals["i.cs1.all"] == 1
    assert sum(v for k, v in totals.items() if k.startswith("i.default.")) == 6
    assert wait_until(lambda: threads_named("compact-i.cs1.all") == 0)
    assert len(list(store.scan_entries("t"))) == 14


def test_misconfigured_planner_plans_nothing_until_fixed(tmp_path, metadata_url) -> None:
    """A planner that fails to start (here: at reopen) leaves its service misconfigured: it
    plans nothing, the data stays readable, and fixing the configuration brings it back."""
    path = tmp_path / "s"
    planner = f"{__name__}:FlakyPlanner"
    with lithify.open(path, metadata_url=metadata_url) as s:
        s.set_system_property(CS1_EXECUTORS, executors_json({"name": "all", "numThreads": 1}))
        s.set_system_property(SVC + "cs1.planner", planner)
        s.create_table(
            "t",
            properties={
                "table.compaction.major.ratio": "1.5",
                "table.compaction.dispatcher.opts.service": "cs1",
            },
        )
    PLANNER_BROKEN["value"] = True
    try:
        with lithify.open(path, metadata_url=metadata_url) as s:
            errors = s.manager.service_errors()
            assert set(errors) == {"cs1"} and "planner dependency unavailable" in errors["cs1"]
            write_round(s, "t", "q1", ["a"])
            write_round(s, "t", "q2", ["a"])
            time.sleep(0.3)
            assert s.wait_for_compactions(WAIT_S)
            assert s.files_per_tablet() == [2]
            assert completed_by_executor(s) == {}
            assert len(list(s.scan_entries("t"))) == 2
            # Fixed: re-applying the configuration (any change) starts the planner.
            PLANNER_BROKEN["value"] = False
            s.set_system_property(SVC + "cs1.planner.opts.maxOpen", "8")
            assert s.manager.service_errors() == {}
            assert wait_until(lambda: s.files_per_tablet() == [1])
            assert completed_by_executor(s) == {"i.cs1.all": 1}
    finally:
        PLANNER_BROKEN["value"] = False


def test_rate_limit_change_applies_to_the_service_bucket(store: lithify.Store) -> None:
    store.set_system_property(SVC + "default.rate.limit", "2M")
    live = store.manager._services["default"]  # the bucket shared by the service's executors
    assert live.bucket.rate == 2 * 2**20
    store.set_system_property(SVC + "default.rate.limit", None)
    assert store.manager._services["default"].bucket is live.bucket
    assert live.bucket.rate == 0
