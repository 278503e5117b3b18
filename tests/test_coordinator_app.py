"""The coordinator over HTTP: the contract's endpoints, the long-poll, the secret, standby, and
the process itself (lease takeover, SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lithify.coordinator.app import CoordinatorHolder, create_app
from lithify.coordinator.core import CompactionCoordinator
from lithify.data.ranges import FileRef
from lithify.files.storage import Storage
from lithify.metadata.store import MetadataStore, TabletMeta
from lithify.rpc.client import RpcClient, RpcError
from lithify.rpc.wire import extent_from_json, extent_to_json
from lithify.server.instance import bind, ensure_secret, open_metadata, url_of
from lithify.server.serving import ServerThread

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cret"


class Served:
    def __init__(self, tmp_path: Path) -> None:
        self.meta = MetadataStore.open(f"sqlite:///{tmp_path / 'meta.db'}")
        self.storage = Storage(str(tmp_path / "data"))
        epoch = self.meta.acquire_lease("coordinator", "http://me", 60.0)
        assert epoch is not None
        self.core = CompactionCoordinator(self.meta, self.storage, epoch)
        self.holder = CoordinatorHolder()
        self.holder.activate(self.core)
        sock = bind("127.0.0.1", 0)
        self.url = url_of(sock)
        self.server = ServerThread(create_app(self.holder, SECRET), sock)
        self.server.start()
        self.client = RpcClient(self.url, SECRET, timeout=30.0)

    def tablets(self, n: int, name: str = "t") -> list[TabletMeta]:
        info = self.meta.create_table(name, splits=[b"%03d" % i for i in range(1, n)])
        out = []
        for i, m in enumerate(self.meta.tablets(info.id)):
            files = (FileRef(f"tables/{info.id}/F{i:04d}.parquet", 10, 1),)
            out.append(self.meta.update_tablet(m, m.replace(files=files)))
        return out

    def close(self) -> None:
        self.server.stop()
        self.core.close()
        self.meta.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    try:
        yield s
    finally:
        s.close()


def plan_body(m: TabletMeta, queue: str = "q") -> dict[str, Any]:
    return {
        "extent": extent_to_json(m.extent),
        "jobs": [
            {"files": [f.to_json() for f in m.files], "executor": f"e.{queue}", "priority": 3}
        ],
    }


def next_body(ecid: str, wait_s: float = 0.0, queue: str = "q") -> dict[str, Any]:
    return {"queue": queue, "compactor": "c1", "address": None, "ecid": ecid, "wait_s": wait_s}


def test_secret_is_required(served: Served) -> None:
    for secret in ("", "wrong"):
        with pytest.raises(RpcError) as e:
            RpcClient(served.url, secret).call("POST", "/v1/compactor/next", next_body("e1"))
        assert e.value.status == 401
    schema = RpcClient(served.url, "anything").call("GET", "/openapi.json")
    paths = set(schema["paths"])
    assert {
        "/v1/queues/plan",
        "/v1/cancel",
        "/v1/compactor/next",
        "/v1/compactor/status",
        "/v1/compactor/finished",
        "/v1/compactor/failed",
        "/v1/requests",
        "/v1/requests/{rid}",
    } <= paths


def test_plan_next_status_failed_over_http(served: Served) -> None:
    (m,) = served.tablets(1)
    c = served.client
    assert c.call("POST", "/v1/queues/plan", plan_body(m)) == {"queued": 1}
    job = c.call("POST", "/v1/compactor/next", next_body("e1"))["job"]
    assert job["ecid"] == "e1" and job["extent"] == extent_to_json(m.extent)
    assert c.call("POST", "/v1/compactor/next", next_body("e2"))["job"] is None
    status = {"ecid": "e1", "compactor": "c1", "state": "STARTED"}
    assert c.call("POST", "/v1/compactor/status", status) == {"cancel": False}
    unknown = {"ecid": "zz", "compactor": "c1", "state": "IN_PROGRESS"}
    assert c.call("POST", "/v1/compactor/status", unknown) == {"cancel": True}
    body = {"ecid": "e1", "compactor": "c1", "state": "FAILED", "error": "boom"}
    assert c.call("POST", "/v1/compactor/failed", body) == {"ack": True}
    assert served.meta.get_tablet(m.extent).compactions == {}
    cancel = {"table_id": m.extent.table_id, "extents": None, "kind": None}
    assert c.call("POST", "/v1/cancel", cancel) == {"cancelled": 0}
    assert c.call("GET", "/v1/requests/nope")["state"] == "NOT_SUBMITTED"
    assert c.call("DELETE", "/v1/requests/nope")["state"] == "NOT_SUBMITTED"
    with pytest.raises(RpcError) as e:
        c.call("POST", "/v1/queues/plan", {"extent": extent_to_json(m.extent), "jobs": "x"})
    assert e.value.status == 422


def test_fast_lane_answers_like_the_routes(served: Served) -> None:
    """The compactor calls taken by the fast lane (`_HotRoutes`) keep FastAPI's answers for
    bodies the model refuses, and the app's error mapping for what the handlers raise."""
    c = served.client
    for bad in (
        {**next_body("e1"), "extra": 1},  # unknown field
        {"queue": "q", "compactor": "c1"},  # missing ECID
        {**next_body("e1"), "wait_s": "soon"},
    ):
        with pytest.raises(RpcError) as e:
            c.call("POST", "/v1/compactor/next", bad)
        assert e.value.status == 422 and isinstance(e.value.detail, list), e.value.detail
    with pytest.raises(RpcError) as e:
        c.call("POST", "/v1/compactor/status", {"ecid": "e1"})
    assert e.value.status == 422 and isinstance(e.value.detail, list)
    (m,) = served.tablets(1)
    c.call("POST", "/v1/queues/plan", plan_body(m))
    with pytest.raises(RpcError) as e:
        c.call("POST", "/v1/compactor/next", next_body("a/b"))  # the core refuses it
    assert e.value.status == 422 and "invalid ECID" in str(e.value.detail)
    with pytest.raises(RpcError) as e:
        c.call_bytes("POST", "/v1/compactor/next", b"{not json", content_type="application/json")
    assert e.value.status == 422


def test_finished_over_http_answers_before_the_commit_ends(served: Served) -> None:
    (m,) = served.tablets(1)
    c = served.client
    c.call("POST", "/v1/queues/plan", plan_body(m))
    assert c.call("POST", "/v1/compactor/next", next_body("e1"))["job"] is not None
    result = {"entries_read": 1, "entries_written": 0, "bytes_read": 10, "bytes_written": 0}
    body = {"ecid": "e1", "compactor": "c1", "result": result}
    assert c.call("POST", "/v1/compactor/finished", body) == {"ack": True}
    assert c.call("POST", "/v1/compactor/finished", body) == {"ack": True}  # a repeat
    assert served.core.drain_commits(30)
    after = served.meta.get_tablet(m.extent)
    assert after.compactions == {} and after.files == ()  # nothing written: inputs gone
    assert served.meta.final_states() == [] and served.core.metrics().completed == 1
    with pytest.raises(RpcError) as e:
        c.call("POST", "/v1/compactor/finished", {"ecid": "e1", "compactor": "c1"})
    assert e.value.status == 422 and isinstance(e.value.detail, list)


def test_concurrent_compactors_drain_the_queue_once(served: Served) -> None:
    """Reservations asked at once are group-committed; each job still goes to one compactor
    and is recorded in the metadata before its compactor has it."""
    metas = served.tablets(40)
    for m in metas:
        served.client.call("POST", "/v1/queues/plan", plan_body(m))
    jobs: list[dict[str, Any]] = []
    lock = threading.Lock()

    def compactor(i: int) -> None:
        for n in range(100):  # bounded: the queue holds 40 jobs
            job = served.client.call("POST", "/v1/compactor/next", next_body(f"e{i}-{n}"))["job"]
            if job is None:
                return
            rec = served.meta.get_tablet(extent_from_json(job["extent"])).compactions
            assert job["ecid"] in rec
            with lock:
                jobs.append(job)

    threads = [threading.Thread(target=compactor, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(jobs) == 40
    assert len({json.dumps(j["extent"], sort_keys=True) for j in jobs}) == 40


def test_long_poll_wakes_as_soon_as_a_job_is_queued(served: Served) -> None:
    metas = served.tablets(3)
    got: dict[str, Any] = {}

    def wait() -> None:
        t0 = time.monotonic()
        got["job"] = served.client.call("POST", "/v1/compactor/next", next_body("e1", 20.0))
        got["t"] = time.monotonic() - t0

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # parked, not answered
    queued_at = time.monotonic()
    served.client.call("POST", "/v1/queues/plan", plan_body(metas[1]))
    t.join(10)
    assert not t.is_alive()
    assert got["job"]["job"]["ecid"] == "e1"
    assert time.monotonic() - queued_at < 2.0 and got["t"] < 5.0


def test_many_waiters_each_get_one_job(served: Served) -> None:
    metas = served.tablets(6)
    jobs: list[Any] = []
    lock = threading.Lock()

    def wait(i: int) -> None:
        r = served.client.call("POST", "/v1/compactor/next", next_body(f"e{i}", 5.0))
        with lock:
            jobs.append(r["job"])

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    for m in metas[:4]:
        served.client.call("POST", "/v1/queues/plan", plan_body(m))
    for t in threads:
        t.join(10)
    assert len(jobs) == 4 and all(j is not None for j in jobs)
    assert len({j["extent"]["end_row"] for j in jobs}) == 4


def test_long_poll_times_out_with_null(served: Served) -> None:
    t0 = time.monotonic()
    assert served.client.call("POST", "/v1/compactor/next", next_body("e1", 0.3))["job"] is None
    assert 0.25 <= time.monotonic() - t0 < 3.0


def test_standby_answers_503_and_wakes_waiters(served: Served) -> None:
    box: dict[str, Any] = {}

    def wait() -> None:
        try:
            served.client.call("POST", "/v1/compactor/next", next_body("e1", 20.0))
        except RpcError as e:
            box["status"] = e.status

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    served.holder.deactivate()
    t.join(5)
    assert box.get("status") == 503
    for path, body in (
        ("/v1/compactor/next", next_body("e2")),
        ("/v1/compactor/status", {"ecid": "e", "compactor": "c", "state": "STARTED"}),
    ):
        with pytest.raises(RpcError) as e:
            served.client.call("POST", path, body)
        assert e.value.status == 503
    assert served.client.call("GET", "/v1/coordinator") == {"active": False}


def test_lease_lost_answers_503(served: Served) -> None:
    (m,) = served.tablets(1)
    served.client.call("POST", "/v1/queues/plan", plan_body(m))
    served.meta.release_lease("coordinator", "http://me")
    served.meta.acquire_lease("coordinator", "http://other", 60.0)
    with pytest.raises(RpcError) as e:
        served.client.call("POST", "/v1/compactor/next", next_body("e1"))
    assert e.value.status == 503
    assert not served.core.active


def test_metrics(served: Served) -> None:
    metas = served.tablets(2)
    served.client.call("POST", "/v1/queues/plan", plan_body(metas[0], "DCQ1"))
    served.client.call("POST", "/v1/queues/plan", plan_body(metas[1], "DCQ1"))
    served.client.call("POST", "/v1/compactor/next", next_body("e1", queue="DCQ1"))
    text = served.client.call("GET", "/metrics")
    for line in (
        'lithify_coordinator_queued{queue="DCQ1"} 1.0',
        'lithify_coordinator_jobs_dequeued_total{queue="DCQ1"} 1.0',
        'lithify_coordinator_jobs_rejected_total{queue="DCQ1"} 0.0',
        "lithify_coordinator_running 1.0",
        "lithify_coordinator_compactors_seen 1.0",
        "lithify_coordinator_compactions_completed_total 0.0",
        "lithify_coordinator_active 1.0",
    ):
        assert line in text
    assert 'lithify_coordinator_queue_oldest_age_seconds{queue="DCQ1"}' in text


# ---------------------------------------------------------------------- the process


def _start(directory: Path, name: str) -> subprocess.Popen:
    announce = directory / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "lithify.coordinator.process", "--dir", str(directory)]
    cmd += ["--announce", str(announce), "-v"]
    log = open(directory / f"{name}.log", "w")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _url(directory: Path, name: str, proc: subprocess.Popen, timeout: float = 30.0) -> str:
    path = directory / f"{name}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())["url"]
        assert proc.poll() is None, (directory / f"{name}.log").read_text()
        time.sleep(0.05)
    raise AssertionError(f"{name} did not announce itself")


def _active(url: str, secret: str) -> bool:
    try:
        return bool(RpcClient(url, secret, timeout=5).call("GET", "/v1/coordinator")["active"])
    except RpcError:
        return False


def _until(fn, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_process_standby_takeover_and_sigterm(tmp_path: Path) -> None:
    meta = open_metadata(tmp_path)
    secret = ensure_secret(meta)
    # Long enough that coordinator a keeps its lease while b starts beside it on a busy machine.
    meta.set_system_properties({"coordinator.lease.ttl": "3s"})
    procs: list[subprocess.Popen] = []
    try:
        a = _start(tmp_path, "a")
        procs.append(a)
        url_a = _url(tmp_path, "a", a)
        _until(lambda: _active(url_a, secret), 30)
        assert meta.lease_info("coordinator").holder == url_a
        b = _start(tmp_path, "b")
        procs.append(b)
        url_b = _url(tmp_path, "b", b)
        time.sleep(1.0)
        assert not _active(url_b, secret)  # standby
        with pytest.raises(RpcError) as e:
            RpcClient(url_b, secret).call("POST", "/v1/compactor/next", next_body("x"))
        assert e.value.status == 503
        epoch_a = meta.lease_info("coordinator").epoch
        a.send_signal(signal.SIGTERM)
        assert a.wait(15) == 0
        _until(lambda: _active(url_b, secret), 20)
        info = meta.lease_info("coordinator")
        assert info.holder == url_b and info.epoch == epoch_a + 1
        b.send_signal(signal.SIGTERM)
        assert b.wait(15) == 0
        assert meta.lease_info("coordinator").holder is None  # released, not left to expire
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        meta.close()


def test_process_refuses_an_instance_without_secret(tmp_path: Path) -> None:
    open_metadata(tmp_path).close()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "lithify.coordinator.process", "--dir", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "secret" in done.stderr
