"""The simple dispatcher and the loading of planner/dispatcher plug-ins.

Plug-ins come from configuration, so every way of getting one wrong must end in a ConfigError that
names the property and the value, never in an ImportError or TypeError from deep inside a server.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from lithify.compaction.dispatcher import SimpleCompactionDispatcher
from lithify.compaction.planner import DefaultCompactionPlanner
from lithify.compaction.plugins import (
    DEFAULT_DISPATCHER,
    DEFAULT_PLANNER,
    load_plugin,
    make_dispatcher,
    make_planner,
    planner_property,
)
from lithify.compaction.spi import (
    CompactableFile,
    CompactionDispatcher,
    CompactionJob,
    CompactionKind,
    CompactionPlan,
    CompactionPlanner,
    PlanningParameters,
)
from lithify.errors import ConfigError

SYSTEM = CompactionKind.SYSTEM
USER = CompactionKind.USER
PLANNER_PROP = "tserver.compaction.major.service.cs1.planner"
DISPATCHER_PROP = "table.compaction.dispatcher"


def simple(options: Mapping[str, str]) -> SimpleCompactionDispatcher:
    d = SimpleCompactionDispatcher()
    d.init(options)
    return d


# -- simple dispatcher ----------------------------------------------------------------------------


def test_defaults_to_the_default_service() -> None:
    d = simple({})
    assert d.dispatch(SYSTEM, {}, {}) == "default"
    assert d.dispatch(USER, {}, {}) == "default"
    assert d.dispatch(USER, {"compaction_type": "full"}, {}) == "default"


def test_service_option_covers_both_kinds() -> None:
    d = simple({"service": "cs1"})
    assert d.dispatch(SYSTEM, {}, {}) == "cs1"
    assert d.dispatch(USER, {}, {}) == "cs1"


def test_per_kind_and_per_type_services() -> None:
    d = simple(
        {
            "service": "cs1",
            "service.system": "sys",
            "service.user": "usr",
            "service.user.full": "ext",
            "service.user.purge.old": "dotted",
        }
    )
    assert d.dispatch(SYSTEM, {}, {}) == "sys"
    assert d.dispatch(SYSTEM, {"compaction_type": "full"}, {}) == "sys"  # hints are for USER
    assert d.dispatch(USER, {}, {}) == "usr"
    assert d.dispatch(USER, {"compaction_type": "full"}, {}) == "ext"
    assert d.dispatch(USER, {"compaction_type": "purge.old"}, {}) == "dotted"
    assert d.dispatch(USER, {"compaction_type": "other"}, {}) == "usr"
    assert d.dispatch(USER, {"unrelated": "full"}, {}) == "usr"


def test_user_type_without_service_user_falls_back_to_service() -> None:
    d = simple({"service": "cs1", "service.user.full": "ext"})
    assert d.dispatch(USER, {"compaction_type": "full"}, {}) == "ext"
    assert d.dispatch(USER, {}, {}) == "cs1"


@pytest.mark.parametrize(
    ("options", "bad_key"),
    [
        ({"service": ""}, "service"),
        ({"service.system": "  "}, "service.system"),
        ({"service.user.full": ""}, "service.user.full"),
        ({"srvice": "cs1"}, "srvice"),
        ({"service.user.": "cs1"}, "service.user."),
    ],
)
def test_bad_dispatcher_options(options: dict[str, str], bad_key: str) -> None:
    with pytest.raises(ConfigError) as e:
        simple(options)
    assert f"table.compaction.dispatcher.opts.{bad_key}" in str(e.value)


def test_make_dispatcher_default() -> None:
    d = make_dispatcher(DEFAULT_DISPATCHER, {"service.system": "sys"})
    assert isinstance(d, SimpleCompactionDispatcher)
    assert d.dispatch(SYSTEM, {}, {}) == "sys"


def test_make_dispatcher_bad_option_names_property() -> None:
    with pytest.raises(ConfigError, match=r"table\.compaction\.dispatcher\.opts\.nope"):
        make_dispatcher(DEFAULT_DISPATCHER, {"nope": "x"})


# -- user-written plug-ins (used by the loading tests below) --------------------------------------


class OneJobPlanner(CompactionPlanner):
    """A user planner: every candidate in one job on a fixed executor."""

    def init(self, service: str, options: Mapping[str, str]) -> None:
        self.executor = options.get("executor", f"i.{service}.all")

    def make_plan(self, params: PlanningParameters) -> CompactionPlan:
        if not params.candidates:
            return CompactionPlan()
        return CompactionPlan(
            (CompactionJob(tuple(params.candidates), self.executor, 1, params.kind),)
        )


class TableDispatcher(CompactionDispatcher):
    """A user dispatcher that reads the table's own properties."""

    def init(self, options: Mapping[str, str]) -> None:
        self.fallback = options.get("fallback", "default")

    def dispatch(
        self, kind: CompactionKind, hints: Mapping[str, str], table_properties: Mapping[str, str]
    ) -> str:
        return table_properties.get("table.custom.service", self.fallback)


class ExplodingConstructor(CompactionPlanner):
    def __init__(self) -> None:
        raise RuntimeError("boom in constructor")

    def init(self, service: str, options: Mapping[str, str]) -> None:  # pragma: no cover
        pass

    def make_plan(self, params: PlanningParameters) -> CompactionPlan:  # pragma: no cover
        return CompactionPlan()


class ExplodingInit(OneJobPlanner):
    def init(self, service: str, options: Mapping[str, str]) -> None:
        raise ValueError("boom in init")


class PlainConfigErrorInit(OneJobPlanner):
    def init(self, service: str, options: Mapping[str, str]) -> None:
        raise ConfigError("option 'x' is bad")


class ExplodingDispatcherInit(TableDispatcher):
    def init(self, options: Mapping[str, str]) -> None:
        raise KeyError("boom")


class NeedsArgument(OneJobPlanner):
    def __init__(self, x: int) -> None:
        self.x = x


class Outer:
    class Inner(OneJobPlanner):
        pass


def not_a_class() -> None:
    """A function is not a plug-in."""


HERE = __name__  # the module that defines the plug-ins above, importable by name


# -- loading --------------------------------------------------------------------------------------


def test_load_user_planner_and_plan() -> None:
    p = make_planner("cs1", f"{HERE}:OneJobPlanner", {"executor": "e.Q"})
    assert isinstance(p, OneJobPlanner)
    files = (CompactableFile("file:///a", 1, 1), CompactableFile("file:///b", 2, 1))
    plan = p.make_plan(PlanningParameters(USER, 3.0, files, files))
    assert [j.executor for j in plan.jobs] == ["e.Q"]


def test_load_nested_class() -> None:
    p = load_plugin(f"{HERE}:Outer.Inner", CompactionPlanner, property_name="p")
    assert isinstance(p, Outer.Inner)


def test_load_user_dispatcher() -> None:
    d = make_dispatcher(f"{HERE}:TableDispatcher", {"fallback": "cs9"})
    assert d.dispatch(SYSTEM, {}, {"table.custom.service": "cs2"}) == "cs2"
    assert d.dispatch(SYSTEM, {}, {}) == "cs9"


def test_make_default_planner() -> None:
    p = make_planner("default", DEFAULT_PLANNER, {"maxOpen": "12"})
    assert isinstance(p, DefaultCompactionPlanner)
    assert p.max_open == 12
    assert planner_property("cs1") == PLANNER_PROP


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "module:Class"),
        ("lithify.compaction.planner", "module:Class"),
        ("lithify.compaction.planner:", "module:Class"),
        (":DefaultCompactionPlanner", "module:Class"),
        ("no_such_module_xyz:Planner", "cannot import"),
        ("lithify.compaction.planner:NoSuchPlanner", "has no"),
        (f"{HERE}:Outer.Missing", "has no"),
        (DEFAULT_DISPATCHER, "not a subclass of CompactionPlanner"),
        (f"{HERE}:not_a_class", "not a subclass"),
        (f"{HERE}:HERE", "not a subclass"),
        (f"{HERE}:ExplodingConstructor", "boom in constructor"),
        (f"{HERE}:NeedsArgument", "cannot instantiate"),
    ],
)
def test_planner_loading_errors(spec: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_planner("cs1", spec, {})
    message = str(e.value)
    assert PLANNER_PROP in message
    assert repr(spec) in message or repr(spec.strip()) in message
    assert words in message


def test_load_plugin_rejects_non_string() -> None:
    with pytest.raises(ConfigError, match="prop.name"):
        load_plugin(None, CompactionPlanner, property_name="prop.name")  # type: ignore[arg-type]


@pytest.fixture
def broken_module(tmp_path: Path) -> Iterator[str]:
    name = "lithify_test_broken_plugin"
    (tmp_path / f"{name}.py").write_text("raise RuntimeError('module fails on import')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_module_that_fails_on_import(broken_module: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_planner("cs1", f"{broken_module}:Planner", {})
    assert PLANNER_PROP in str(e.value)
    assert "module fails on import" in str(e.value)


def test_init_failure_wrapped_with_property() -> None:
    with pytest.raises(ConfigError) as e:
        make_planner("cs1", f"{HERE}:ExplodingInit", {})
    assert PLANNER_PROP in str(e.value)
    assert "boom in init" in str(e.value)
    assert isinstance(e.value.__cause__, ValueError)


def test_config_error_without_property_gets_one() -> None:
    with pytest.raises(ConfigError) as e:
        make_planner("cs1", f"{HERE}:PlainConfigErrorInit", {})
    assert PLANNER_PROP in str(e.value)
    assert "option 'x' is bad" in str(e.value)


def test_default_planner_option_error_names_the_option() -> None:
    with pytest.raises(ConfigError) as e:
        make_planner("cs1", DEFAULT_PLANNER, {"executors": "[]"})
    assert "tserver.compaction.major.service.cs1.planner.opts.executors" in str(e.value)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("nonsense", "module:Class"),
        ("no_such_module_xyz:D", "cannot import"),
        (DEFAULT_PLANNER, "not a subclass of CompactionDispatcher"),
        (f"{HERE}:ExplodingDispatcherInit", "boom"),
    ],
)
def test_dispatcher_loading_errors(spec: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_dispatcher(spec, {})
    assert DISPATCHER_PROP in str(e.value)
    assert repr(spec) in str(e.value)
    assert words in str(e.value)
