"""Compaction services: a planner plus executors, defined by system properties.

    tserver.compaction.major.service.<svc>.planner              = module:Class
    tserver.compaction.major.service.<svc>.planner.opts.<opt>   = option (executors, maxOpen, ...)
    tserver.compaction.major.service.<svc>.rate.limit           = bytes/s for internal executors

The `executors` planner option defines a service's executors whatever its planner, so the
server can create the thread pools and queues a plan may name. The `default` service exists out
of the box. Parsing validates everything before anything is applied: a bad configuration is
rejected whole, with a message that names the property.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lithify.compaction.executors_config import ExecutorSpec, parse_executors
from lithify.compaction.planner import DEFAULT_EXECUTORS_JSON
from lithify.compaction.plugins import DEFAULT_PLANNER, make_planner
from lithify.compaction.spi import CompactionPlanner
from lithify.errors import ConfigError
from lithify.units import parse_size

SERVICE_PREFIX = "tserver.compaction.major.service."
DEFAULT_SERVICE = "default"


@dataclass(frozen=True)
class ServiceConfig:
    """The validated configuration of one service."""

    name: str
    planner_spec: str
    planner_options: Mapping[str, str]
    executors: tuple[ExecutorSpec, ...]
    rate_limit: int = 0
    raw: Mapping[str, str] = field(default_factory=dict)


def _split(system_props: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Service name -> its properties with the `tserver.compaction.major.service.<svc>.` cut."""
    per: dict[str, dict[str, str]] = {}
    for key, value in system_props.items():
        if not key.startswith(SERVICE_PREFIX):
            continue
        svc, sep, rest = key[len(SERVICE_PREFIX) :].partition(".")
        if not sep or not svc or not rest:
            raise ConfigError(
                f"property {key}: expected {SERVICE_PREFIX}<service>.planner, "
                f".planner.opts.<option> or .rate.limit"
            )
        per.setdefault(svc, {})[rest] = value
    per.setdefault(DEFAULT_SERVICE, {})
    return per


def parse_service_configs(system_props: Mapping[str, str]) -> dict[str, ServiceConfig]:
    """Every configured service (and `default`), validated; ConfigError names the property."""
    out: dict[str, ServiceConfig] = {}
    for svc, props in _split(system_props).items():
        opts: dict[str, str] = {}
        rate = 0
        planner = DEFAULT_PLANNER
        for rest, value in props.items():
            prop = f"{SERVICE_PREFIX}{svc}.{rest}"
            if rest == "planner":
                planner = value.strip()
            elif rest.startswith("planner.opts.") and len(rest) > len("planner.opts."):
                opts[rest[len("planner.opts.") :]] = value
            elif rest == "rate.limit":
                rate = parse_size(value, property_name=prop)
            else:
                raise ConfigError(
                    f"property {prop}: unknown service setting {rest!r} "
                    f"(known: planner, planner.opts.<option>, rate.limit)"
                )
        if svc == DEFAULT_SERVICE and planner == DEFAULT_PLANNER:
            opts.setdefault("executors", DEFAULT_EXECUTORS_JSON)
        if "executors" not in opts:
            raise ConfigError(
                f"property {SERVICE_PREFIX}{svc}.planner.opts.executors: required for service "
                f"{svc!r} but not set"
            )
        executors = parse_executors(svc, opts["executors"])
        out[svc] = ServiceConfig(svc, planner, dict(opts), executors, rate, dict(props))
    return out


def build_planner(cfg: ServiceConfig) -> CompactionPlanner:
    """Load and initialise a service's planner (ConfigError naming the property if it fails)."""
    return make_planner(cfg.name, cfg.planner_spec, cfg.planner_options)
