"""Loading planner and dispatcher plug-ins named `module:Class` in configuration.

Every failure (a module that does not import, a missing class, a class of the wrong kind, a
constructor or `init` that raises) becomes a ConfigError naming the property and the value, so
that the operator sees which setting to fix and the service or table can report itself
misconfigured instead of crashing the server.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TypeVar

from lithify.compaction.dispatcher import DISPATCHER_PROPERTY
from lithify.compaction.spi import CompactionDispatcher, CompactionPlanner
from lithify.errors import ConfigError

__all__ = [
    "DEFAULT_DISPATCHER",
    "DEFAULT_PLANNER",
    "load_plugin",
    "make_dispatcher",
    "make_planner",
    "planner_property",
]

DEFAULT_PLANNER = "lithify.compaction.planner:DefaultCompactionPlanner"
DEFAULT_DISPATCHER = "lithify.compaction.dispatcher:SimpleCompactionDispatcher"

T = TypeVar("T")


def planner_property(service: str) -> str:
    """The property naming the planner class of `service`."""
    return f"tserver.compaction.major.service.{service}.planner"


def load_plugin(spec: str, base: type[T], *, property_name: str) -> T:
    """Import `module:Class` (the class part may be dotted, for nested classes) and instantiate it.

    The class must be a subclass of `base` and constructible without arguments.
    """
    where = f"{property_name}={spec!r}"
    if not isinstance(spec, str):
        raise ConfigError(f"{property_name}: expected 'module:Class', got {spec!r}")
    module_name, sep, class_path = spec.strip().partition(":")
    if not sep or not module_name or not class_path:
        raise ConfigError(f"{where}: expected 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {e!r}") from e
    obj: object = module
    for part in class_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{where}: module {module_name!r} has no {class_path!r}") from None
    if not isinstance(obj, type) or not issubclass(obj, base):
        raise ConfigError(f"{where}: {class_path!r} is not a subclass of {base.__name__}")
    try:
        return obj()
    except Exception as e:
        raise ConfigError(f"{where}: cannot instantiate {class_path!r}: {e!r}") from e


def make_planner(service: str, planner_spec: str, options: Mapping[str, str]) -> CompactionPlanner:
    """Load the planner of `service` and initialise it with its options.

    A ConfigError from `init` that already names one of the service's properties passes through
    unchanged (it names the precise option); anything else is wrapped in a ConfigError that names
    the planner property.
    """
    prop = planner_property(service)
    planner = load_plugin(planner_spec, CompactionPlanner, property_name=prop)
    try:
        planner.init(service, options)
    except ConfigError as e:
        if f"tserver.compaction.major.service.{service}." in str(e):
            raise
        raise ConfigError(f"{prop}={planner_spec!r}: init failed: {e}") from e
    except Exception as e:
        raise ConfigError(f"{prop}={planner_spec!r}: init failed: {e!r}") from e
    return planner


def make_dispatcher(spec: str, options: Mapping[str, str]) -> CompactionDispatcher:
    """Load a table's dispatcher (`table.compaction.dispatcher`) and initialise it."""
    dispatcher = load_plugin(spec, CompactionDispatcher, property_name=DISPATCHER_PROPERTY)
    try:
        dispatcher.init(options)
    except ConfigError as e:
        if DISPATCHER_PROPERTY in str(e):
            raise
        raise ConfigError(f"{DISPATCHER_PROPERTY}={spec!r}: init failed: {e}") from e
    except Exception as e:
        raise ConfigError(f"{DISPATCHER_PROPERTY}={spec!r}: init failed: {e!r}") from e
    return dispatcher
