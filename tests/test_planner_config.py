"""Configuration of the default planner: sizes, the `executors` JSON, `maxOpen`, `lowestRatio`
and the compaction ratio. Every invalid value must be rejected with a ConfigError that names the
property (and, for executors, the field), because operators fix configuration from the message.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lithify.compaction.executors_config import (
    ExecutorSpec,
    executors_property,
    parse_executors,
    parse_lowest_ratio,
    parse_max_open,
    parse_planner_options,
    parse_ratio,
    planner_option_property,
)
from lithify.compaction.planner import DEFAULT_EXECUTORS_JSON, DefaultCompactionPlanner
from lithify.errors import ConfigError
from lithify.units import format_size, parse_size

SVC = "cs1"
EXECUTORS_PROP = "tserver.compaction.major.service.cs1.planner.opts.executors"


# -- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("16M", 16 * 2**20),
        ("16m", 16 * 2**20),
        ("1K", 1024),
        ("2G", 2 * 2**30),
        (" 32M ", 32 * 2**20),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text, property_name="p") == expected


@pytest.mark.parametrize("text", ["", "M", "16MB", "1.5G", "-1", "16T", "16 M", "ten", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_size(text, property_name="some.property")
    assert "some.property" in str(e.value)
    assert repr(text) in str(e.value)


def test_parse_size_rejects_non_string() -> None:
    with pytest.raises(ConfigError, match="some.property"):
        parse_size(16, property_name="some.property")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (1000, "1000"), (1024, "1K"), (1536, "1536"), (32 * 2**20, "32M"), (2**30, "1G")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text
    assert parse_size(format_size(n), property_name="p") == n


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_size(-1)


# -- executors: valid -----------------------------------------------------------------------------


def test_property_names() -> None:
    assert executors_property(SVC) == EXECUTORS_PROP
    assert planner_option_property(SVC, "maxOpen") == (
        "tserver.compaction.major.service.cs1.planner.opts.maxOpen"
    )


def test_executors_sorted_by_max_size_with_unbounded_last() -> None:
    text = json.dumps(
        [
            {"name": "huge", "type": "external", "queue": "DCQ1"},
            {"name": "medium", "maxSize": "128M", "numThreads": 2},
            {"name": "small", "type": "internal", "maxSize": "32M", "numThreads": 3},
            {"name": "large", "type": "external", "maxSize": 536870912, "queue": "DCQ2"},
        ]
    )
    specs = parse_executors(SVC, text)
    assert [s.name for s in specs] == ["small", "medium", "large", "huge"]
    assert [s.max_size for s in specs] == [32 * 2**20, 128 * 2**20, 512 * 2**20, None]
    assert [s.executor_id for s in specs] == ["i.cs1.small", "i.cs1.medium", "e.DCQ2", "e.DCQ1"]
    assert specs[0] == ExecutorSpec("small", "internal", 32 * 2**20, 3, None, SVC)
    assert specs[1].type == "internal"  # a missing type means internal
    assert specs[3].num_threads is None and specs[3].queue == "DCQ1"


def test_all_executors_may_have_max_size() -> None:
    specs = parse_executors(SVC, '[{"name": "a", "maxSize": "1M", "numThreads": 1}]')
    assert specs[0].max_size == 2**20


def test_default_executors() -> None:
    specs = parse_executors("default", DEFAULT_EXECUTORS_JSON)
    assert [(s.name, s.max_size, s.num_threads) for s in specs] == [
        ("small", 32 * 2**20, 2),
        ("medium", 128 * 2**20, 2),
        ("large", None, 2),
    ]
    planner = DefaultCompactionPlanner()
    planner.init("default", {})
    assert planner.executors == specs
    assert planner.max_open == 10
    assert planner.lowest_ratio == 1.1


def test_numeric_options_as_strings() -> None:
    options = parse_planner_options(
        SVC,
        {"executors": DEFAULT_EXECUTORS_JSON, "maxOpen": " 15 ", "lowestRatio": "1.5"},
    )
    assert options.max_open == 15
    assert options.lowest_ratio == 1.5


def test_executors_required_outside_the_default_service() -> None:
    with pytest.raises(ConfigError, match=EXECUTORS_PROP):
        DefaultCompactionPlanner().init(SVC, {})


def test_unknown_planner_option_rejected() -> None:
    with pytest.raises(ConfigError, match=r"service\.cs1\.planner\.opts\.maxopen"):
        parse_planner_options(SVC, {"executors": DEFAULT_EXECUTORS_JSON, "maxopen": "3"})


# -- executors: invalid ---------------------------------------------------------------------------

INTERNAL = {"name": "small", "type": "internal", "maxSize": "32M", "numThreads": 1}
EXTERNAL = {"name": "big", "type": "external", "queue": "Q1"}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DROP = object()

# (id, executors JSON text, a word the message must contain: the field at fault)
INVALID_EXECUTORS: list[tuple[str, str, str]] = [
    ("not-json", "[{name: small}]", "JSON"),
    ("empty-string", "", "JSON"),
    ("object-not-array", json.dumps(INTERNAL), "array"),
    ("empty-array", "[]", "at least one"),
    ("element-not-object", "[1]", "object"),
    ("missing-name", json.dumps([_with(INTERNAL, name=_DROP)]), "name"),
    ("empty-name", json.dumps([_with(INTERNAL, name="")]), "name"),
    ("name-not-string", json.dumps([_with(INTERNAL, name=3)]), "name"),
    ("name-with-dot", json.dumps([_with(INTERNAL, name="a.b")]), "name"),
    ("bad-type", json.dumps([_with(INTERNAL, type="remote")]), "type"),
    ("type-not-string", json.dumps([_with(INTERNAL, type=1)]), "type"),
    ("unknown-field", json.dumps([_with(INTERNAL, maxsize="1M")]), "maxsize"),
    ("internal-no-threads", json.dumps([_with(INTERNAL, numThreads=_DROP)]), "numThreads"),
    ("internal-zero-threads", json.dumps([_with(INTERNAL, numThreads=0)]), "numThreads"),
    ("internal-negative-threads", json.dumps([_with(INTERNAL, numThreads=-2)]), "numThreads"),
    ("internal-fraction-threads", json.dumps([_with(INTERNAL, numThreads=1.5)]), "numThreads"),
    ("internal-bool-threads", json.dumps([_with(INTERNAL, numThreads=True)]), "numThreads"),
    ("internal-text-threads", json.dumps([_with(INTERNAL, numThreads="two")]), "numThreads"),
    ("internal-null-threads", json.dumps([_with(INTERNAL, numThreads=None)]), "numThreads"),
    ("internal-with-queue", json.dumps([_with(INTERNAL, queue="Q")]), "queue"),
    ("external-no-queue", json.dumps([_with(EXTERNAL, queue=_DROP)]), "queue"),
    ("external-empty-queue", json.dumps([_with(EXTERNAL, queue="")]), "queue"),
    ("external-queue-not-string", json.dumps([_with(EXTERNAL, queue=7)]), "queue"),
    ("external-with-threads", json.dumps([_with(EXTERNAL, numThreads=2)]), "numThreads"),
    ("bad-size-text", json.dumps([_with(INTERNAL, maxSize="big")]), "maxSize"),
    ("bad-size-suffix", json.dumps([_with(INTERNAL, maxSize="32MB")]), "maxSize"),
    ("zero-size", json.dumps([_with(INTERNAL, maxSize="0")]), "maxSize"),
    ("negative-size", json.dumps([_with(INTERNAL, maxSize=-5)]), "maxSize"),
    ("fraction-size", json.dumps([_with(INTERNAL, maxSize=1.5)]), "maxSize"),
    ("bool-size", json.dumps([_with(INTERNAL, maxSize=True)]), "maxSize"),
    ("null-size", json.dumps([_with(INTERNAL, maxSize=None)]), "maxSize"),
    (
        "two-unbounded",
        json.dumps([_with(INTERNAL, maxSize=_DROP), _with(EXTERNAL, maxSize=_DROP)]),
        "maxSize",
    ),
    (
        "shared-max-size",
        json.dumps([INTERNAL, _with(EXTERNAL, maxSize=str(32 * 2**20))]),
        "maxSize",
    ),
    (
        "duplicate-name",
        json.dumps([INTERNAL, _with(INTERNAL, maxSize="64M", numThreads=2)]),
        "name",
    ),
    (
        "duplicate-queue",
        json.dumps([_with(EXTERNAL, maxSize="1G"), _with(EXTERNAL, name="bigger")]),
        "queue",
    ),
]


@pytest.mark.parametrize(
    ("text", "field"), [pytest.param(t, f, id=i) for i, t, f in INVALID_EXECUTORS]
)
def test_invalid_executors_rejected(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_executors(SVC, text)
    message = str(e.value)
    assert EXECUTORS_PROP in message
    assert field in message


@pytest.mark.parametrize(("text", "field"), [(t, f) for _, t, f in INVALID_EXECUTORS[:8]])
def test_invalid_executors_rejected_by_planner_init(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        DefaultCompactionPlanner().init(SVC, {"executors": text})
    assert EXECUTORS_PROP in str(e.value)
    assert field in str(e.value)


def test_executors_not_a_string() -> None:
    with pytest.raises(ConfigError, match=EXECUTORS_PROP):
        parse_executors(SVC, [INTERNAL])  # type: ignore[arg-type]


# -- maxOpen, lowestRatio, ratio ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["2", "10", "100", 15])
def test_max_open_valid(value: Any) -> None:
    assert parse_max_open(SVC, value) == int(value)


@pytest.mark.parametrize("value", ["", "ten", "1", "0", "-3", "2.5", "1e3", "nan", True, None])
def test_max_open_invalid(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"service\.cs1\.planner\.opts\.maxOpen"):
        parse_max_open(SVC, value)


@pytest.mark.parametrize("value", ["1", "1.0", "1.1", "3", " 2.5 "])
def test_lowest_ratio_valid(value: str) -> None:
    assert parse_lowest_ratio(SVC, value) == float(value)


@pytest.mark.parametrize("value", ["", "low", "0.99", "0", "-1", "nan", "inf", "-inf", None])
def test_lowest_ratio_invalid(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"service\.cs1\.planner\.opts\.lowestRatio"):
        parse_lowest_ratio(SVC, value)


@pytest.mark.parametrize(
    ("option", "value"),
    [("maxOpen", "1"), ("maxOpen", "x"), ("lowestRatio", "0.5"), ("lowestRatio", "x")],
)
def test_planner_init_rejects_bad_options(option: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        DefaultCompactionPlanner().init("default", {option: value})
    assert f"tserver.compaction.major.service.default.planner.opts.{option}" in str(e.value)


@pytest.mark.parametrize("value", ["1", "1.5", "3", 2])
def test_ratio_valid(value: Any) -> None:
    assert parse_ratio(value) == float(value)


@pytest.mark.parametrize("value", ["", "three", "0.99", "0", "-2", "nan", "inf", None])
def test_ratio_invalid(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"table\.compaction\.major\.ratio"):
        parse_ratio(value)


def test_ratio_custom_property_name() -> None:
    with pytest.raises(ConfigError, match="my.ratio"):
        parse_ratio("0.5", property_name="my.ratio")


def test_failed_init_keeps_previous_configuration() -> None:
    planner = DefaultCompactionPlanner()
    planner.init("default", {})
    with pytest.raises(ConfigError):
        planner.init("default", {"maxOpen": "0"})
    assert planner.max_open == 10
    assert [s.name for s in planner.executors] == ["small", "medium", "large"]
