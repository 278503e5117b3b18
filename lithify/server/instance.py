"""What every process of an instance needs first: its metadata store, its secret, its address.

An instance is a directory plus a metadata store (SQLite `D/metadata.db` unless a URL is given),
as docs/EXTERNAL_COMPACTIONS.md says. The instance secret is made once, by whoever initialises
the instance, and read by every process at start; processes find each other through leases.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from lithify.errors import LithifyError
from lithify.metadata.store import MetadataStore

#: Lease of the tablet server; its holder is the server's base URL.
TSERVER_LEASE = "tserver"
#: Lease of the active compaction coordinator; its holder is the coordinator's base URL.
COORDINATOR_LEASE = "coordinator"
#: The system property that holds the instance secret (as `lithify.rpc.auth.SECRET_PROPERTY`,
#: not imported from there so that clients need none of the server's libraries).
SECRET_PROPERTY = "instance.secret"
#: How long a tablet server's lease lives without renewal (renewed every third of it).
TSERVER_LEASE_TTL_S = 10.0


def open_metadata(directory: str | os.PathLike, url: str | None = None) -> MetadataStore:
    Path(directory).mkdir(parents=True, exist_ok=True)
    return MetadataStore.open_in(directory, url)


def ensure_secret(meta: MetadataStore) -> str:
    """The instance secret, made now if the instance has none yet.

    Two processes initialising at once may both write one; each re-reads what is stored, so the
    one that lost adopts the winner's. `lithify cluster start` makes it before starting anything.
    """
    current = meta.get_system_properties().get(SECRET_PROPERTY)
    if current:
        return current
    from lithify.rpc.auth import new_secret  # servers only: clients need no starlette

    meta.set_system_properties({SECRET_PROPERTY: new_secret()})
    stored = meta.get_system_properties().get(SECRET_PROPERTY)
    if not stored:
        raise LithifyError("could not store the instance secret in the metadata store")
    return stored


def read_secret(meta: MetadataStore, *, wait_s: float = 0.0) -> str:
    """The instance secret, waiting (bounded) for an initialising process to make it."""
    deadline = time.monotonic() + wait_s
    while True:
        secret = meta.get_system_properties().get(SECRET_PROPERTY)
        if secret:
            return secret
        if time.monotonic() >= deadline:
            raise LithifyError(
                "the instance has no secret yet: start a tablet server or `lithify cluster "
                "start` first (it initialises the instance)"
            )
        time.sleep(0.2)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), bound before the server starts
    so that the URL it publishes is known and already reachable."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


def lease_holder(meta: MetadataStore, name: str) -> tuple[str | None, int]:
    """(holder URL or None, epoch) of a lease; (None, 0) when it was never taken."""
    info = meta.lease_info(name)
    if info is None:
        return None, 0
    return info.holder, info.epoch


def announce(path: str | os.PathLike, url: str) -> None:
    """Write {"url", "pid"} to `path` atomically, for whoever started this process (its URL
    is only known once its port is bound)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    tmp.replace(p)
