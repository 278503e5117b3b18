"""The simple dispatcher: a table's compactions go to services named in its options.

Options (`table.compaction.dispatcher.opts.*`):

* `service`: the service for everything not named more precisely (default `default`);
* `service.system`: the service of SYSTEM compactions;
* `service.user`: the service of USER compactions;
* `service.user.<type>`: the service of USER compactions started with the execution hint
  `compaction_type=<type>`, so that for example a nightly full compaction can go to a service with
  external executors while routine work stays inside the servers.

Whether the named service exists is not checked here: services change at run time, and the store
falls back to `default` (and logs) when a dispatcher names one that is missing.
"""

from __future__ import annotations

from collections.abc import Mapping

from lithify.compaction.spi import CompactionDispatcher, CompactionKind
from lithify.errors import ConfigError

__all__ = [
    "COMPACTION_TYPE_HINT",
    "CompactionDispatcher",
    "DISPATCHER_OPTS_PREFIX",
    "DISPATCHER_PROPERTY",
    "SimpleCompactionDispatcher",
]

DISPATCHER_PROPERTY = "table.compaction.dispatcher"
DISPATCHER_OPTS_PREFIX = "table.compaction.dispatcher.opts."
COMPACTION_TYPE_HINT = "compaction_type"

_USER_TYPE_PREFIX = "service.user."


class SimpleCompactionDispatcher(CompactionDispatcher):
    """Chooses a service by compaction kind and the `compaction_type` hint; see module docs."""

    def __init__(self) -> None:
        self._system = "default"
        self._user = "default"
        self._user_types: dict[str, str] = {}

    def init(self, options: Mapping[str, str]) -> None:
        def service_option(key: str, default: str) -> str:
            value = options.get(key, default)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(
                    f"{DISPATCHER_OPTS_PREFIX}{key}: expected a service name, got {value!r}"
                )
            return value.strip()

        user_types: dict[str, str] = {}
        for key in options:
            if key in ("service", "service.system", "service.user"):
                continue
            if key.startswith(_USER_TYPE_PREFIX) and len(key) > len(_USER_TYPE_PREFIX):
                user_types[key[len(_USER_TYPE_PREFIX) :]] = service_option(key, "")
                continue
            raise ConfigError(
                f"{DISPATCHER_OPTS_PREFIX}{key}: unknown option of the simple dispatcher "
                "(known: service, service.system, service.user, service.user.<type>)"
            )
        default = service_option("service", "default")
        self._system = service_option("service.system", default)
        self._user = service_option("service.user", default)
        self._user_types = user_types

    def dispatch(
        self,
        kind: CompactionKind,
        hints: Mapping[str, str],
        table_properties: Mapping[str, str],
    ) -> str:
        if kind == CompactionKind.USER:
            compaction_type = hints.get(COMPACTION_TYPE_HINT)
            if compaction_type is not None:
                service = self._user_types.get(compaction_type)
                if service is not None:
                    return service
            return self._user
        return self._system
