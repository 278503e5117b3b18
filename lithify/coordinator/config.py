"""The coordinator's configuration: the `coordinator.*` system properties plus fixed tunables.

The property defaults are declared once, in `lithify.table.properties` (where `lithify config`
validates and lists them); `CoordinatorConfig()` takes its defaults from there, so a changed
default there changes a coordinator built without properties (tests) too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lithify.coordinator.phi import PhiAccrualDetector
from lithify.table.properties import Properties, system_properties

#: The fields that come from system properties: field -> (property, typed getter).
_PROPERTY_FIELDS: dict[str, tuple[str, Callable[[Properties, str], Any]]] = {
    "lease_ttl_s": ("coordinator.lease.ttl", Properties.get_duration),
    "queue_max": ("coordinator.queue.max", Properties.get_int),
    "phi_threshold": ("coordinator.phi.threshold", Properties.get_float),
    "phi_window": ("coordinator.phi.window", Properties.get_int),
    "phi_min_std_s": ("coordinator.phi.min.std", Properties.get_duration),
    "check_interval_s": ("coordinator.check.interval", Properties.get_duration),
}


def _property_values(values: Mapping[str, str]) -> dict[str, Any]:
    """The property-backed fields read from system property `values` (defaults filled in)."""
    p = system_properties(values)
    return {f: get(p, name) for f, (name, get) in _PROPERTY_FIELDS.items()}


_DEFAULTS = _property_values({})


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """The coordinator's tunables; `from_properties` reads the `coordinator.*` properties."""

    lease_ttl_s: float = _DEFAULTS["lease_ttl_s"]
    queue_max: int = _DEFAULTS["queue_max"]
    phi_threshold: float = _DEFAULTS["phi_threshold"]
    phi_window: int = _DEFAULTS["phi_window"]
    phi_min_std_s: float = _DEFAULTS["phi_min_std_s"]
    check_interval_s: float = _DEFAULTS["check_interval_s"]
    #: The interval assumed before a compactor's second status report (contract: 1 s).
    first_interval_s: float = 1.0
    #: How long a client should wait between STATUS polls of an async request.
    request_tick_s: float = 1.0
    #: Table properties are cached this long (they decide iterators, versions and codec).
    table_props_ttl_s: float = 2.0
    #: Jobs one `next_job` call may try (stale jobs are dropped) and the time it may spend.
    reserve_max_jobs: int = 1000
    reserve_max_s: float = 5.0
    #: Suspect compactors asked per check (each ask may wait for a timeout).
    max_asks_per_check: int = 64

    @classmethod
    def from_properties(cls, values: Mapping[str, str], **overrides: Any) -> CoordinatorConfig:
        """From system property values (defaults from `lithify.table.properties`)."""
        base = cls(**_property_values(values))
        return dataclasses.replace(base, **overrides) if overrides else base

    def new_detector(self, first_interval_s: float | None = None) -> PhiAccrualDetector:
        """A failure detector with this configuration's window and deviation floor.

        `first_interval_s` is the rhythm assumed before the second heartbeat: a compactor's
        status period by default, a client's poll tick for async requests.
        """
        return PhiAccrualDetector(
            window=self.phi_window,
            min_std_s=self.phi_min_std_s,
            first_interval_s=first_interval_s or self.first_interval_s,
        )
