"""The coordinator's HTTP API (docs/EXTERNAL_COMPACTIONS.md, "Calls"), a FastAPI app.

Only translation lives here: JSON in, a call on the active `CompactionCoordinator`, JSON out.
Which coordinator is active changes at runtime (standby, takeover, deposition), so handlers
reach it through a `CoordinatorHolder`; with none active every compactor, tablet server and
request call answers 503, which makes callers re-read the lease and retry elsewhere.

`/v1/compactor/next` is a long-poll that costs nothing while it waits: the handler parks on an
asyncio future of its queue, and queuing a job resolves as many futures as jobs were added
(`_Waiters`). A generation counter per queue closes the gap between "the queue looked empty" and
"I am waiting", so a job queued in between is never missed. Reservations (metadata transactions)
run in a thread of their own that takes all waiting requests at once and reserves them in one
transaction (group commit, `_Reserver`); heartbeats of known compactions are answered on the
loop without any thread hand-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue as queue_mod
import threading
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lithify.coordinator.core import CompactionCoordinator, NotActiveError
from lithify.coordinator.queues import planned_job_from_json
from lithify.coordinator.reserve import JobRequest
from lithify.errors import LithifyError, TableNotFoundError
from lithify.metadata.store import LeaseLostError
from lithify.rpc.auth import SecretMiddleware
from lithify.rpc.wire import extent_from_json

log = logging.getLogger(__name__)

#: Longest long-poll a compactor may ask for (it asks again afterwards).
MAX_WAIT_S = 300.0
#: Threads that run reservations (each a leader of group commits, see `_Reserver`).
RESERVE_THREADS = 1
#: Reservations one thread takes from its queue at a time (one group commit).
_RESERVE_BATCH = 256
#: Rounds of "try to reserve, then wait" one long-poll may go through (a bound, not a target).
_MAX_ROUNDS = 10000


# ---------------------------------------------------------------------- active coordinator


class CoordinatorHolder:
    """The active coordinator of this process, or None while standing by."""

    def __init__(self) -> None:
        self._core: CompactionCoordinator | None = None
        self._lock = threading.Lock()
        self._on_change: list[Callable[[CompactionCoordinator | None], None]] = []
        self._on_lost: list[Callable[[CompactionCoordinator], None]] = []

    @property
    def core(self) -> CompactionCoordinator | None:
        core = self._core
        return core if core is not None and core.active else None

    def require(self) -> CompactionCoordinator:
        core = self.core
        if core is None:
            raise NotActiveError("this coordinator is not active")
        return core

    def activate(self, core: CompactionCoordinator) -> None:
        with self._lock:
            self._core = core
        for fn in self._on_change:
            fn(core)

    def deactivate(self) -> CompactionCoordinator | None:
        """Stop routing calls to the core (the caller closes it); waiting long-polls wake."""
        with self._lock:
            core, self._core = self._core, None
        for fn in self._on_change:
            fn(None)
        return core

    def lease_lost(self, core: CompactionCoordinator) -> None:
        """A handler saw LeaseLostError: tell the process (it goes back to standby)."""
        core.depose()
        for fn in self._on_lost:
            fn(core)

    def on_change(self, fn: Callable[[CompactionCoordinator | None], None]) -> None:
        self._on_change.append(fn)

    def on_lease_lost(self, fn: Callable[[CompactionCoordinator], None]) -> None:
        self._on_lost.append(fn)


# ---------------------------------------------------------------------- models


class _Body(BaseModel):
    """A request body: unknown fields are refused (422), as the tablet server does, so that a
    misspelt field is not silently ignored (`extent` for `extents` would cancel a table)."""

    model_config = ConfigDict(extra="forbid")


class ExtentModel(_Body):
    table_id: str
    prev_end_row: str | None = None
    end_row: str | None = None


class PlanJobModel(_Body):
    files: list[dict[str, Any]] = Field(min_length=1)
    executor: str
    priority: int
    kind: Literal["SYSTEM", "USER"] = "SYSTEM"


class PlanRequest(_Body):
    extent: ExtentModel
    jobs: list[PlanJobModel] = []


class PlanResponse(BaseModel):
    queued: int


class CancelRequest(_Body):
    table_id: str
    extents: list[ExtentModel] | None = None
    kind: Literal["SYSTEM", "USER"] | None = None


class CancelResponse(BaseModel):
    cancelled: int


class NextRequest(_Body):
    queue: str = Field(min_length=1)
    compactor: str = Field(min_length=1)
    address: str | None = None
    ecid: str = Field(min_length=1)
    wait_s: float = 0.0


class NextResponse(BaseModel):
    job: dict[str, Any] | None


class StatusRequest(_Body):
    ecid: str
    compactor: str
    state: str = "IN_PROGRESS"
    entries_read: int = 0
    entries_written: int = 0


class StatusResponse(BaseModel):
    cancel: bool


class ResultModel(_Body):
    entries_read: int = 0
    entries_written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class FinishedRequest(_Body):
    ecid: str
    compactor: str
    result: ResultModel


class FailedRequest(_Body):
    ecid: str
    compactor: str
    state: Literal["FAILED", "CANCELLED"] = "FAILED"
    error: str = ""


class AckResponse(BaseModel):
    ack: bool = True


class SubmitRequest(_Body):
    op: Literal["compact", "flush"]
    table: str
    start: str | None = None
    end: str | None = None
    iterators: list[Any] = []
    hints: dict[str, str] = {}
    client: str = ""
    nonce: str = ""
    cancel_on_client_loss: bool = False


class SubmitResponse(BaseModel):
    id: str
    tick_s: float


class RequestStateResponse(BaseModel):
    state: str
    tick_s: float
    progress: dict[str, Any] = {}


# ---------------------------------------------------------------------- long-poll support


class _Waiters:
    """Long-polls parked per queue; lives on the event loop thread only."""

    def __init__(self) -> None:
        self.generation: defaultdict[str, int] = defaultdict(int)
        self._waiting: defaultdict[str, deque[asyncio.Future[bool]]] = defaultdict(deque)

    def notify(self, queue: str, n: int) -> None:
        """Jobs were queued: wake up to `n` waiters of `queue`, oldest first."""
        self.generation[queue] += 1
        dq = self._waiting.get(queue)
        while n > 0 and dq:
            fut = dq.popleft()
            if not fut.done():
                fut.set_result(True)
                n -= 1

    def notify_all(self) -> None:
        """Wake every waiter (the coordinator stopped being active: they must answer 503)."""
        for queue, dq in self._waiting.items():
            self.generation[queue] += 1
            while dq:
                fut = dq.popleft()
                if not fut.done():
                    fut.set_result(True)

    async def wait(self, queue: str, timeout: float) -> bool:
        """Park until woken or `timeout`; returns whether woken."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        dq = self._waiting[queue]
        dq.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            # Woken, then the request died (client gone, server stopping): pass the wake-up
            # on, or the job it announced would wait for the next poll.
            if fut.done() and not fut.cancelled():
                self.notify(queue, 1)
            raise
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                dq.remove(fut)


class _Reserver:
    """Group commit of reservations: a thread takes every waiting request at once and has the
    core reserve all of them together (`CompactionCoordinator.next_jobs`).

    Every reservation is a metadata transaction that must not run on the event loop. While the
    thread commits one batch, the requests that arrive queue up, and the next round takes all
    of them: one read and one write transaction for the lot, each reservation still its own
    compare-and-set, so the commit rate of the database stops bounding the reservation rate.
    The answers of a batch go back to the loop with one call. With several threads, one can
    read its tablets while another commits; on a server database they also overlap round trips.
    """

    def __init__(self, threads: int) -> None:
        self._queue: queue_mod.SimpleQueue[Any] = queue_mod.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"reserve-{i}", daemon=True)
            for i in range(threads)
        ]
        self._started = False
        self._lock = threading.Lock()

    async def reserve(self, core: CompactionCoordinator, request: JobRequest) -> Any:
        """`core.next_job` for `request`, served in the next batch."""
        if not self._started:
            with self._lock:
                if not self._started:
                    for t in self._threads:
                        t.start()
                    self._started = True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.put((loop, fut, core, request))
        return await fut

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < _RESERVE_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue_mod.Empty:
                    break
            # Normally one core; after a takeover a batch may straddle the old and the new.
            by_core: dict[int, tuple[CompactionCoordinator, list[Any]]] = {}
            for item in batch:
                by_core.setdefault(id(item[2]), (item[2], []))[1].append(item)
            answers: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, bool]]] = {}
            for core, items in by_core.values():
                try:
                    results: list[Any] = core.next_jobs([item[3] for item in items])
                except BaseException as e:  # noqa: BLE001 - handed to the awaiting requests
                    results = [e] * len(items)
                for (loop, fut, _, _), answer in zip(items, results, strict=True):
                    ok = not isinstance(answer, BaseException)
                    answers.setdefault(loop, []).append((fut, answer, ok))
            for loop, delivered in answers.items():
                with contextlib.suppress(RuntimeError):  # that loop is gone: nobody waits
                    loop.call_soon_threadsafe(_deliver, delivered)


def _deliver(items: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    for fut, answer, ok in items:
        if fut.done():
            continue  # the request was cancelled meanwhile
        if ok:
            fut.set_result(answer)
        else:
            fut.set_exception(answer)


# ---------------------------------------------------------------------- the fast lane

#: HTTP status of each error class a handler may raise (the nearest class in the MRO wins).
_ERROR_STATUS: dict[type[Exception], int] = {
    NotActiveError: 503,
    LeaseLostError: 503,
    TableNotFoundError: 404,
    ValueError: 422,
    LithifyError: 500,
}
#: Larger bodies than this are no compactor call of the fast lane: FastAPI gets them.
_HOT_BODY_MAX = 64 * 1024
#: A fast-lane route: the body's model and the handler that answers it with plain JSON.
_HotRoute = tuple[type[BaseModel], Callable[[Any], Awaitable[dict[str, Any]]]]


class _HotRoutes:
    """ASGI middleware that answers the compactors' frequent calls without FastAPI's
    per-request machinery (`/v1/compactor/next`, `/status` and `/finished`).

    A profile of the coordinator under many compactors showed the FastAPI route layers
    (routing, dependency solving, body parsing, response validation and the wrappers around
    `send`) costing about a third of its CPU per reservation, more than the reservation's
    metadata transaction once that is group-committed. Here a well-formed call is validated
    with the route's own pydantic model and answered by the same handler function as the
    route; errors are mapped by the same function as the app's exception handlers. Anything
    else, a body the model refuses above all, goes to FastAPI unchanged (the body replayed),
    so the 422 answers and the OpenAPI description stay FastAPI's.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, _HotRoute],
        errors: Callable[[Exception], Response | None],
    ) -> None:
        self.app = app
        self._routes = dict(routes)
        self._errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self._routes.get(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        model, handler = route
        read = await _read_body(receive, _HOT_BODY_MAX)
        if read is None:
            return  # the client went away: nobody to answer
        body, ended = read
        parsed = None
        if ended and len(body) <= _HOT_BODY_MAX:
            with contextlib.suppress(ValidationError):  # FastAPI words the 422
                parsed = model.model_validate_json(body)
        if parsed is None:
            await self.app(scope, _replay(body, ended, receive), send)
            return
        try:
            response: Response = JSONResponse(await handler(parsed))
        except Exception as e:
            mapped = self._errors(e)
            if mapped is None:
                raise
            response = mapped
        await response(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool] | None:
    """The request body read so far and whether it ended; None when the client disconnected.
    Bounded: it stops reading once more than `limit` bytes came."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True
    return b"".join(chunks), False


def _replay(body: bytes, ended: bool, receive: Receive) -> Receive:
    """A `receive` that hands out the body read already, then the rest from `receive`."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": not ended}

    return replay


# ---------------------------------------------------------------------- metrics


class CoordinatorCollector(Collector):
    """Prometheus series of the coordinator, read from the active core at scrape time."""

    def __init__(self, holder: CoordinatorHolder) -> None:
        self._holder = holder

    def collect(self) -> Iterator[Metric]:
        core = self._holder.core
        active = GaugeMetricFamily(
            "lithify_coordinator_active", "1 when this process is the active coordinator"
        )
        active.add_metric([], 1.0 if core is not None else 0.0)
        yield active
        if core is None:
            return
        m = core.metrics()
        epoch = GaugeMetricFamily("lithify_coordinator_epoch", "epoch of the coordinator lease")
        epoch.add_metric([], m.epoch)
        yield epoch
        depth = GaugeMetricFamily(
            "lithify_coordinator_queued", "jobs waiting per external queue", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "lithify_coordinator_queue_oldest_age_seconds",
            "age of the oldest queued job per external queue",
            labels=["queue"],
        )
        queued = CounterMetricFamily(
            "lithify_coordinator_jobs_queued", "jobs queued per external queue", labels=["queue"]
        )
        dequeued = CounterMetricFamily(
            "lithify_coordinator_jobs_dequeued",
            "jobs taken from each external queue",
            labels=["queue"],
        )
        rejected = CounterMetricFamily(
            "lithify_coordinator_jobs_rejected",
            "jobs rejected because an external queue was full",
            labels=["queue"],
        )
        running_q = GaugeMetricFamily(
            "lithify_coordinator_running_by_queue",
            "external compactions running per queue",
            labels=["queue"],
        )
        for name, st in sorted(m.queues.items()):
            depth.add_metric([name], st.depth)
            age.add_metric([name], st.oldest_age_s)
            queued.add_metric([name], st.queued)
            dequeued.add_metric([name], st.dequeued)
            rejected.add_metric([name], st.rejected)
        for name, n in sorted(m.running_by_queue.items()):
            running_q.add_metric([name], n)
        yield from (depth, age, queued, dequeued, rejected, running_q)
        running = GaugeMetricFamily("lithify_coordinator_running", "external compactions running")
        running.add_metric([], m.running)
        seen = GaugeMetricFamily(
            "lithify_coordinator_compactors_seen", "compactors heard from in the last 5 minutes"
        )
        seen.add_metric([], m.compactors_seen)
        yield from (running, seen)
        for key, value, text in (
            ("completed", m.completed, "external compactions committed"),
            ("failed", m.failed, "external compactions failed"),
            ("cancelled", m.cancelled, "external compactions cancelled"),
            ("stale_dropped", m.stale_dropped, "queued jobs dropped because the tablet changed"),
        ):
            c = CounterMetricFamily(f"lithify_coordinator_compactions_{key}", text)
            c.add_metric([], value)
            yield c
        req = GaugeMetricFamily(
            "lithify_coordinator_requests", "async requests known, by state", labels=["state"]
        )
        for state, n in sorted(m.requests.items()):
            req.add_metric([state], n)
        yield req


# ---------------------------------------------------------------------- the app


def create_app(holder: CoordinatorHolder, secret: str) -> FastAPI:
    """The coordinator's FastAPI app; every path but the API description needs the secret."""
    app = FastAPI(title="lithify compaction coordinator", version="1")
    waiters = _Waiters()
    # Reservations get threads of their own (see _Reserver), so heartbeats and reports never
    # wait behind a burst of them in the general thread pool.
    reserver = _Reserver(RESERVE_THREADS)
    report_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="status-lookup")
    final_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="finished")
    loop_box: dict[str, asyncio.AbstractEventLoop] = {}
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(holder))

    def remember_loop() -> None:
        # The loop serving requests now (a restarted server runs a new one).
        loop_box["loop"] = asyncio.get_running_loop()

    def on_queued(added: Mapping[str, int]) -> None:
        loop = loop_box.get("loop")
        if loop is None or loop.is_closed():
            return  # no request is being served: nobody can be waiting
        for queue, n in added.items():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(waiters.notify, queue, n)

    def on_change(core: CompactionCoordinator | None) -> None:
        if core is not None:
            core.add_listener(on_queued)
        loop = loop_box.get("loop")
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(waiters.notify_all)

    holder.on_change(on_change)
    if holder.core is not None:
        holder.core.add_listener(on_queued)

    # -- errors -------------------------------------------------------------------------------

    def error_response(e: Exception) -> JSONResponse | None:
        """The answer to an error a handler raised, chosen like Starlette chooses an exception
        handler (the nearest class in the error's MRO); None for errors that are not ours (a
        500). Serves the FastAPI routes and the fast lane (`_HotRoutes`) alike."""
        for cls in type(e).__mro__:
            status = _ERROR_STATUS.get(cls)
            if status is None:
                continue
            if cls is LeaseLostError:
                core = holder._core
                if core is not None:
                    holder.lease_lost(core)
                return JSONResponse({"detail": f"coordinator deposed: {e}"}, status_code=status)
            return JSONResponse({"detail": str(e)}, status_code=status)
        return None

    async def handle_error(_: Request, e: Exception) -> Response:
        response = error_response(e)
        if response is None:  # not reached: registered for the mapped classes only
            raise e
        return response

    for error_class in _ERROR_STATUS:
        app.add_exception_handler(error_class, handle_error)

    # -- tablet server -> coordinator ---------------------------------------------------------

    @app.post("/v1/queues/plan")
    async def plan(body: PlanRequest) -> PlanResponse:
        remember_loop()
        core = holder.require()
        extent = extent_from_json(body.extent.model_dump())
        jobs = [planned_job_from_json(j.model_dump()) for j in body.jobs]
        return PlanResponse(queued=core.plan(extent, jobs))

    @app.post("/v1/cancel")
    def cancel(body: CancelRequest) -> CancelResponse:
        # A thread, not the loop: a USER cancel reads the table's tablets (`core.cancel`).
        core = holder.require()
        extents = (
            None
            if body.extents is None
            else [extent_from_json(e.model_dump()) for e in body.extents]
        )
        return CancelResponse(cancelled=core.cancel(body.table_id, extents, body.kind))

    # -- compactor -> coordinator -------------------------------------------------------------

    async def serve_next(body: NextRequest) -> dict[str, Any]:
        """`POST /v1/compactor/next`: the long-poll for a job (the route and the fast lane)."""
        remember_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, min(body.wait_s, MAX_WAIT_S))
        queue = body.queue
        for _ in range(_MAX_ROUNDS):
            core = holder.require()
            generation = waiters.generation[queue]
            if core.has_work(queue, body.ecid):
                request = JobRequest(queue, body.compactor, body.address, body.ecid)
                job = await reserver.reserve(core, request)
                if job is not None:
                    if core.queue_depth(queue) > 0:
                        waiters.notify(queue, 1)  # more work: hand the baton on
                    # Built by the core from plain JSON types: no need to validate it again.
                    return {"job": job}
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if waiters.generation[queue] != generation:
                continue  # something was queued while we looked
            await waiters.wait(queue, remaining)
        holder.require()
        return {"job": None}

    async def serve_status(body: StatusRequest) -> dict[str, Any]:
        """`POST /v1/compactor/status`: the heartbeat (the route and the fast lane)."""
        core = holder.require()
        args = (body.ecid, body.compactor, body.state, body.entries_read, body.entries_written)
        # Heartbeats of known compactions touch only memory: answered on the loop itself.
        cancel = core.status(*args, lookup=False)
        if cancel is None:
            loop = asyncio.get_running_loop()
            cancel = await loop.run_in_executor(report_pool, functools.partial(core.status, *args))
        return {"cancel": bool(cancel)}

    @app.post("/v1/compactor/next", response_model=NextResponse)
    async def next_job(body: NextRequest) -> Response:
        return JSONResponse(await serve_next(body))

    @app.post("/v1/compactor/status", response_model=StatusResponse)
    async def status(body: StatusRequest) -> Response:
        return JSONResponse(await serve_status(body))

    async def serve_finished(body: FinishedRequest) -> dict[str, Any]:
        """`POST /v1/compactor/finished` (the route and the fast lane): one per job, answered
        once the final state is written, a metadata write that runs off the event loop."""
        core = holder.require()
        args = (body.ecid, body.compactor, body.result.model_dump())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(final_pool, functools.partial(core.finished, *args))
        return {"ack": True}

    @app.post("/v1/compactor/finished", response_model=AckResponse)
    async def finished(body: FinishedRequest) -> Response:
        return JSONResponse(await serve_finished(body))

    @app.post("/v1/compactor/failed")
    def failed(body: FailedRequest) -> AckResponse:
        core = holder.require()
        core.failed(body.ecid, body.compactor, body.state, body.error)
        return AckResponse()

    # -- async requests -----------------------------------------------------------------------

    @app.post("/v1/requests")
    def submit(body: SubmitRequest) -> SubmitResponse:
        core = holder.require()
        rid, tick = core.submit_request(body.model_dump())
        return SubmitResponse(id=rid, tick_s=tick)

    @app.get("/v1/requests/{rid}")
    def request_status(rid: str) -> RequestStateResponse:
        core = holder.require()
        return RequestStateResponse(**core.request_status(rid))

    @app.delete("/v1/requests/{rid}")
    def cancel_request(rid: str) -> RequestStateResponse:
        core = holder.require()
        return RequestStateResponse(**core.cancel_request(rid))

    # -- observation --------------------------------------------------------------------------

    @app.get("/v1/coordinator")
    def describe() -> dict[str, Any]:
        """Not in the contract: who is active, queue depths and the running compactions."""
        core = holder.core
        if core is None:
            return {"active": False}
        m = core.metrics()
        return {
            "active": True,
            "epoch": core.epoch,
            "queues": {name: st.depth for name, st in sorted(m.queues.items())},
            "running": core.running(),
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    # The last added is the outermost: the secret is checked before the fast lane is taken.
    hot: dict[str, _HotRoute] = {
        "/v1/compactor/next": (NextRequest, serve_next),
        "/v1/compactor/status": (StatusRequest, serve_status),
        "/v1/compactor/finished": (FinishedRequest, serve_finished),
    }
    app.add_middleware(_HotRoutes, routes=hot, errors=error_response)
    app.add_middleware(SecretMiddleware, secret=secret)
    return app
