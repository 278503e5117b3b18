"""Starting, finding and stopping the processes of a local cluster (`lithify cluster`, tests).

Each process is a real OS process (`python -m lithify <command>`) in a session of its own, so a
signal to its process group reaches anything it started and nothing else; its output goes to
`D/logs/<name>.log`. A process announces its URL (it binds port 0) in `D/cluster/<name>.announce`;
the launcher then waits until the URL answers and records `D/cluster/<name>.json` (pid, URL,
command, start time). The start time guards every later signal: a recorded pid that the system
has since given to another process is never signalled.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from lithify.errors import LithifyError

#: The order in which a cluster stops: workers first, so that they can still report.
STOP_ORDER = ("compactor", "coordinator", "tserver")


@dataclass(frozen=True)
class ProcessRecord:
    """A started process as recorded in `D/cluster/<name>.json`."""

    name: str
    kind: str
    pid: int
    url: str
    command: list[str]
    log: str
    create_time: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> ProcessRecord:
        d = json.loads(text)
        return ProcessRecord(
            str(d["name"]),
            str(d.get("kind", "")),
            int(d["pid"]),
            str(d["url"]),
            [str(x) for x in d["command"]],
            str(d["log"]),
            float(d["create_time"]),
        )


def cluster_dir(directory: str | os.PathLike) -> Path:
    return Path(directory).resolve() / "cluster"


def logs_dir(directory: str | os.PathLike) -> Path:
    return Path(directory).resolve() / "logs"


def lithify_command(*args: str) -> list[str]:
    """The command line of a lithify subcommand, run by this Python (`-v`: INFO logs)."""
    return [sys.executable, "-m", "lithify", "-v", *args]


def _process(rec: ProcessRecord) -> psutil.Process | None:
    """The recorded process if it still runs (same pid and start time, not a zombie)."""
    try:
        p = psutil.Process(rec.pid)
        if abs(p.create_time() - rec.create_time) > 0.5:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_alive(rec: ProcessRecord) -> bool:
    return _process(rec) is not None


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a lithify server answers at `url` (its public OpenAPI description)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", "/openapi.json")
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def log_tail(path: str | os.PathLike, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Spawned:
    """A process started but not yet known to answer."""

    name: str
    kind: str
    proc: subprocess.Popen
    command: list[str]
    announce: Path
    log: Path


def spawn(
    directory: str | os.PathLike,
    name: str,
    kind: str,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
) -> Spawned:
    """Start `lithify <args> --announce ...` as `name` in a session of its own; see `ready`."""
    cdir, ldir = cluster_dir(directory), logs_dir(directory)
    cdir.mkdir(parents=True, exist_ok=True)
    ldir.mkdir(parents=True, exist_ok=True)
    announce = cdir / f"{name}.announce"
    announce.unlink(missing_ok=True)
    log_path = ldir / f"{name}.log"
    cmd = lithify_command(*args, "--announce", str(announce))
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    return Spawned(name, kind, proc, cmd, announce, log_path)


def ready(directory: str | os.PathLike, sp: Spawned, timeout_s: float = 60.0) -> ProcessRecord:
    """Wait (bounded) until a spawned process answers; record it in `D/cluster/<name>.json`.

    A process that dies or does not answer in time is killed, and LithifyError says why with
    the end of its log.
    """
    try:
        url = _wait_ready(sp.proc, sp.announce, sp.log, sp.name, timeout_s)
        created = psutil.Process(sp.proc.pid).create_time()
    except BaseException:
        _kill_group(sp.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            sp.proc.wait(10)
        raise
    rec = ProcessRecord(sp.name, sp.kind, sp.proc.pid, url, sp.command, str(sp.log), created)
    (cluster_dir(directory) / f"{sp.name}.json").write_text(rec.to_json())
    sp.announce.unlink(missing_ok=True)
    return rec


def start_process(
    directory: str | os.PathLike,
    name: str,
    kind: str,
    args: Sequence[str],
    *,
    ready_timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
) -> tuple[ProcessRecord, subprocess.Popen]:
    """Start one process and wait until it answers; returns its record and its Popen (which
    the caller may use to reap it)."""
    sp = spawn(directory, name, kind, args, env=env)
    return ready(directory, sp, ready_timeout_s), sp.proc


def kill_spawned(sp: Spawned) -> None:
    """SIGKILL a spawned process's group and reap it (bounded)."""
    _kill_group(sp.proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        sp.proc.wait(10)


def _wait_ready(
    proc: subprocess.Popen, announce: Path, log_path: Path, name: str, timeout_s: float
) -> str:
    deadline = time.monotonic() + timeout_s
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LithifyError(
                f"{name} exited with status {proc.returncode} while starting; its log "
                f"({log_path}) ends:\n{log_tail(log_path)}"
            )
        if url is None and announce.exists():
            try:
                url = json.loads(announce.read_text())["url"]
            except (ValueError, KeyError, OSError):
                url = None  # written but not complete yet; read again
        if url is not None and answers(url):
            return url
        time.sleep(0.1)
    raise LithifyError(
        f"{name} did not answer within {timeout_s:g}s; its log ({log_path}) ends:\n"
        f"{log_tail(log_path)}"
    )


def _kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def signal_process(rec: ProcessRecord, sig: int) -> bool:
    """Send `sig` to the recorded process's group if it is still that process; True if sent."""
    if not is_alive(rec):
        return False
    _kill_group(rec.pid, sig)
    return True


def read_records(directory: str | os.PathLike) -> list[ProcessRecord]:
    """The recorded processes of a cluster directory, in start order."""
    out = []
    for path in cluster_dir(directory).glob("*.json"):
        try:
            out.append(ProcessRecord.from_json(path.read_text()))
        except (ValueError, KeyError, OSError):
            continue
    return sorted(out, key=lambda r: r.create_time)


def forget(directory: str | os.PathLike, rec: ProcessRecord) -> None:
    (cluster_dir(directory) / f"{rec.name}.json").unlink(missing_ok=True)


def wait_gone(records: Iterable[ProcessRecord], timeout_s: float) -> list[ProcessRecord]:
    """Wait (bounded) until none of `records` runs; returns those still running."""
    left = list(records)
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [r for r in left if is_alive(r)]
    return left


def stop_processes(records: Sequence[ProcessRecord], *, timeout_s: float = 60.0) -> dict[str, str]:
    """Stop processes kind by kind (compactors, coordinators, tablet server): SIGTERM, wait
    (bounded), then SIGKILL. Returns how each ended: `stopped`, `killed` or `not running`."""
    outcome: dict[str, str] = {}
    kinds = [*STOP_ORDER, *sorted({r.kind for r in records} - set(STOP_ORDER))]
    for kind in kinds:
        group = [r for r in records if r.kind == kind]
        running = []
        for r in group:
            if signal_process(r, signal.SIGTERM):
                running.append(r)
            else:
                outcome[r.name] = "not running"
        for r in wait_gone(running, timeout_s):
            _kill_group(r.pid)
            outcome[r.name] = "killed"
        wait_gone(running, 5.0)
        for r in running:
            outcome.setdefault(r.name, "stopped")
    return outcome
