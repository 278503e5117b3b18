"""Parsing and validating the default planner's options: `executors`, `maxOpen`, `lowestRatio`.

A compaction service is configured by system properties such as
`tserver.compaction.major.service.<svc>.planner.opts.executors`. Configuration changes while the
store runs, so a bad value must be caught when it is set, with a message that names the property
and the field at fault; nothing here guesses or falls back silently.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lithify.errors import ConfigError
from lithify.units import parse_size

ExecutorType = Literal["internal", "external"]

DEFAULT_MAX_OPEN = 10
DEFAULT_LOWEST_RATIO = 1.1
RATIO_PROPERTY = "table.compaction.major.ratio"

_OPTIONS = ("executors", "maxOpen", "lowestRatio")
_FIELDS = ("name", "type", "maxSize", "numThreads", "queue")
# Names end up in executor ids (`i.<service>.<name>`) and metric labels, so keep them plain.
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


def planner_option_property(service: str, option: str) -> str:
    """The full property name of a planner option of `service`."""
    return f"tserver.compaction.major.service.{service}.planner.opts.{option}"


def executors_property(service: str) -> str:
    """The property that holds the `executors` JSON of `service`."""
    return planner_option_property(service, "executors")


@dataclass(frozen=True, slots=True)
class ExecutorSpec:
    """One executor of a service: where jobs up to `max_size` bytes run.

    Internal executors are thread pools in the tablet server (`num_threads`); external ones are
    queues on the coordinator served by compactor processes (`queue`). `executor_id` is the name
    jobs, queues and metrics use: `i.<service>.<name>` or `e.<queue>`.
    """

    name: str
    type: ExecutorType
    max_size: int | None
    num_threads: int | None
    queue: str | None
    service: str = "default"
    executor_id: str = field(init=False)

    def __post_init__(self) -> None:
        if self.type == "internal":
            executor_id = f"i.{self.service}.{self.name}"
        else:
            executor_id = f"e.{self.queue}"
        object.__setattr__(self, "executor_id", executor_id)


@dataclass(frozen=True, slots=True)
class PlannerOptions:
    """The validated options of a `DefaultCompactionPlanner`."""

    executors: tuple[ExecutorSpec, ...]
    max_open: int
    lowest_ratio: float


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_executor(service: str, prop: str, index: int, raw: Any) -> ExecutorSpec:
    where = f"{prop}: executor #{index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a JSON object, got {raw!r}")
    for key in raw:
        if key not in _FIELDS:
            raise ConfigError(
                f"{where}: unknown field {key!r} (known fields: {', '.join(_FIELDS)})"
            )

    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{where}: field 'name' is required and must be letters, digits, '_' or '-', "
            f"got {name!r}"
        )
    where = f"{prop}: executor {name!r}"

    etype = raw.get("type", "internal")
    if etype not in ("internal", "external"):
        raise ConfigError(f"{where}: field 'type' must be 'internal' or 'external', got {etype!r}")

    max_size: int | None = None
    if "maxSize" in raw:
        value = raw["maxSize"]
        if _is_int(value):
            max_size = value
        elif isinstance(value, str):
            max_size = parse_size(value, property_name=f"{where}: field 'maxSize'")
        else:
            raise ConfigError(
                f"{where}: field 'maxSize' must be a size such as '32M', got {value!r}"
            )
        if max_size <= 0:
            raise ConfigError(f"{where}: field 'maxSize' must be greater than 0, got {value!r}")

    num_threads: int | None = None
    queue: str | None = None
    if etype == "internal":
        if "queue" in raw:
            raise ConfigError(f"{where}: field 'queue' is only allowed for external executors")
        if "numThreads" not in raw:
            raise ConfigError(f"{where}: field 'numThreads' is required for internal executors")
        value = raw["numThreads"]
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not _is_int(value) or value <= 0:
            raise ConfigError(
                f"{where}: field 'numThreads' must be an integer greater than 0, "
                f"got {raw['numThreads']!r}"
            )
        num_threads = value
    else:
        if "numThreads" in raw:
            raise ConfigError(
                f"{where}: field 'numThreads' is only allowed for internal executors "
                "(external executors are served by compactors)"
            )
        queue = raw.get("queue")
        if not isinstance(queue, str) or not _NAME_RE.fullmatch(queue):
            raise ConfigError(
                f"{where}: field 'queue' is required for external executors and must be "
                f"letters, digits, '_' or '-', got {queue!r}"
            )

    return ExecutorSpec(name, etype, max_size, num_threads, queue, service)


def parse_executors(service: str, text: str) -> tuple[ExecutorSpec, ...]:
    """Parse the `executors` JSON of `service` into specs ordered by `max_size` (None last).

    Every rule of PLANNER.md "Executors option" is enforced; the first violation raises
    ConfigError naming the property and the field.
    """
    prop = executors_property(service)
    if not isinstance(text, str):
        raise ConfigError(f"{prop}: expected a JSON array of executors, got {text!r}")
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{prop}: not valid JSON ({e}): {text!r}") from None
    if not isinstance(raw, list):
        raise ConfigError(f"{prop}: expected a JSON array of executors, got {text!r}")
    if not raw:
        raise ConfigError(f"{prop}: at least one executor is required")

    specs = [_parse_executor(service, prop, i, item) for i, item in enumerate(raw)]

    names: set[str] = set()
    queues: set[str] = set()
    sizes: dict[int, str] = {}
    unbounded: str | None = None
    for spec in specs:
        if spec.name in names:
            raise ConfigError(f"{prop}: field 'name': executor name {spec.name!r} is used twice")
        names.add(spec.name)
        if spec.queue is not None:
            if spec.queue in queues:
                raise ConfigError(f"{prop}: field 'queue': queue {spec.queue!r} is used twice")
            queues.add(spec.queue)
        if spec.max_size is None:
            if unbounded is not None:
                raise ConfigError(
                    f"{prop}: field 'maxSize': only one executor may omit it, "
                    f"but {unbounded!r} and {spec.name!r} both do"
                )
            unbounded = spec.name
        else:
            other = sizes.get(spec.max_size)
            if other is not None:
                raise ConfigError(
                    f"{prop}: field 'maxSize': executors {other!r} and {spec.name!r} "
                    f"share the maxSize {spec.max_size}"
                )
            sizes[spec.max_size] = spec.name

    specs.sort(key=lambda s: (s.max_size is None, s.max_size or 0))
    return tuple(specs)


def _parse_number(prop: str, value: Any, *, integer: bool) -> float:
    """A finite number from an option string (or a JSON number), for the range checks."""
    if isinstance(value, bool):
        raise ConfigError(f"{prop}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip()) if integer else float(value.strip())
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"{prop}: expected {kind}, got {value!r}") from None
    else:
        raise ConfigError(f"{prop}: expected a number, got {value!r}")
    if integer and not isinstance(number, int):
        raise ConfigError(f"{prop}: expected an integer, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{prop}: expected a finite number, got {value!r}")
    return number


def parse_max_open(service: str, value: str) -> int:
    """`maxOpen`: the most files one job may merge; at least 2, since one file is no merge."""
    prop = planner_option_property(service, "maxOpen")
    number = int(_parse_number(prop, value, integer=True))
    if number < 2:
        raise ConfigError(f"{prop}: must be an integer >= 2, got {value!r}")
    return number


def parse_lowest_ratio(service: str, value: str) -> float:
    """`lowestRatio`: the smallest ratio the over-`table.file.max` rescue may settle for."""
    prop = planner_option_property(service, "lowestRatio")
    number = float(_parse_number(prop, value, integer=False))
    if number < 1:
        raise ConfigError(f"{prop}: must be a number >= 1, got {value!r}")
    return number


def parse_ratio(value: str, *, property_name: str = RATIO_PROPERTY) -> float:
    """The compaction ratio (`table.compaction.major.ratio`): a real number >= 1.

    Below 1 a set could never satisfy `largest * ratio < total` in a useful way: every pair of
    files would qualify and the tablet would compact endlessly.
    """
    number = float(_parse_number(property_name, value, integer=False))
    if number < 1:
        raise ConfigError(f"{property_name}: must be a number >= 1, got {value!r}")
    return number


def parse_planner_options(
    service: str,
    options: Mapping[str, str],
    *,
    default_executors: str | None = None,
) -> PlannerOptions:
    """Validate all options of the default planner of `service`.

    `default_executors` is used when the `executors` option is absent; without it the option is
    required. Unknown options are rejected so that a misspelt option is not silently ignored.
    """
    for key in options:
        if key not in _OPTIONS:
            raise ConfigError(
                f"{planner_option_property(service, key)}: unknown option of the default "
                f"planner (known options: {', '.join(_OPTIONS)})"
            )
    text = options.get("executors", default_executors)
    if text is None:
        raise ConfigError(f"{executors_property(service)}: required but not set")
    executors = parse_executors(service, text)
    max_open = parse_max_open(service, options.get("maxOpen", str(DEFAULT_MAX_OPEN)))
    lowest_ratio = parse_lowest_ratio(
        service, options.get("lowestRatio", str(DEFAULT_LOWEST_RATIO))
    )
    return PlannerOptions(executors, max_open, lowest_ratio)
