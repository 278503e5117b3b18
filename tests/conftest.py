"""Shared pytest fixtures.

Metadata backends: every test that takes `metadata_url` runs on SQLite (always) and on
PostgreSQL when `LITHIFY_TEST_PG_DSN` names a server, e.g.
`postgresql+psycopg://postgres@127.0.0.1:5432/test`. Each PostgreSQL test gets a database of its
own, created through the DSN's database and dropped afterwards, so tests never see each other's
rows and can run in any order.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.cluster_util import cluster  # noqa: F401 - the local-cluster fixture

PG_DSN_ENV = "LITHIFY_TEST_PG_DSN"

_BACKENDS = [pytest.param("sqlite", id="sqlite")]
if os.environ.get(PG_DSN_ENV):
    _BACKENDS.append(pytest.param("postgresql", id="postgresql"))


@pytest.fixture(params=_BACKENDS)
def metadata_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An SQLAlchemy URL of an empty metadata database, one per test and backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.db'}"
        return
    yield from _fresh_pg_database(os.environ[PG_DSN_ENV])


def _fresh_pg_database(dsn: str) -> Iterator[str]:
    """Create `lithify_t_<random>` next to the DSN's database, yield its URL, then drop it
    (WITH (FORCE) ends connections a failed test left open)."""
    base = make_url(dsn)
    name = f"lithify_t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
