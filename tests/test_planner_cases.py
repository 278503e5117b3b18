"""The acceptance cases of shared/design/planner_cases.json, asserted through the public interface.

Each `find` case calls `find_files_to_compact`; each `plan` case configures a
`DefaultCompactionPlanner` the way a service would (through its string options) and checks the
plan's jobs, or the listed properties where several equal-size choices are valid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lithify.compaction.planner import DefaultCompactionPlanner, find_files_to_compact
from lithify.compaction.spi import (
    CompactableFile,
    CompactionJob,
    CompactionKind,
    PlanningParameters,
    RunningCompaction,
)

_RELATIVE = Path("shared/design/planner_cases.json")
_HERE = Path(__file__).resolve()
_CANDIDATES = [_HERE.parents[2] / _RELATIVE, _HERE.parents[1] / _RELATIVE]
CASES_PATH = next((p for p in _CANDIDATES if p.is_file()), None)

_KNOWN_PROPERTIES = {
    "num_jobs",
    "job_size",
    "kind",
    "group",
    "disjoint",
    "union",
    "within",
    "max_total",
}


def _load_cases() -> list[dict[str, Any]]:
    if CASES_PATH is None:
        return []
    return json.loads(CASES_PATH.read_text())["cases"]


CASES = _load_cases()


def uri(name: str) -> str:
    """A URI that sorts like the file name, as the cases file asks."""
    return f"file:///t/{name}"


def _files(case: Mapping[str, Any]) -> dict[str, CompactableFile]:
    return {name: CompactableFile(uri(name), size, 0) for name, size in case["files"]}


def _names(files: Any) -> list[str]:
    prefix = uri("")
    return sorted(f.uri[len(prefix) :] for f in files)


def _check_find(case: Mapping[str, Any]) -> None:
    files = _files(case)
    got = find_files_to_compact(files.values(), case["ratio"], case["max_files"], case["max_size"])
    assert _names(got) == sorted(case["expected"])


def _plan(case: Mapping[str, Any]) -> tuple[DefaultCompactionPlanner, list[CompactionJob]]:
    files = _files(case)
    options = {"maxOpen": str(case["max_open"])}
    if case.get("executors") is not None:
        options["executors"] = json.dumps(case["executors"])
    if case.get("lowest_ratio") is not None:
        options["lowestRatio"] = str(case["lowest_ratio"])
    service = case.get("service", "cs1" if "executors" in options else "default")
    planner = DefaultCompactionPlanner()
    planner.init(service, options)
    running = [
        RunningCompaction(CompactionKind(r["kind"]), tuple(files[n] for n in r["files"]))
        for r in case["running"]
    ]
    extra = {}
    if case.get("table_file_max") is not None:
        extra["table_file_max"] = case["table_file_max"]
    params = PlanningParameters(
        kind=CompactionKind(case["kind"]),
        ratio=float(case["ratio"]),
        all_files=tuple(files.values()),
        candidates=tuple(files[n] for n in case["candidates"]),
        running=tuple(running),
        service=service,
        **extra,
    )
    return planner, list(planner.make_plan(params).jobs)


def _check_plan(case: Mapping[str, Any]) -> None:
    planner, jobs = _plan(case)
    executor_names = {spec.executor_id: spec.name for spec in planner.executors}
    sizes = dict(case["files"])
    kind = CompactionKind(case["kind"])
    candidates = set(case["candidates"])
    for job in jobs:
        assert job.kind == kind
        assert job.executor in executor_names
        assert set(_names(job.files)) <= candidates

    if "expected_jobs" in case:
        got = sorted((_names(j.files), executor_names[j.executor]) for j in jobs)
        expected = case["expected_jobs"]
        assert len(got) == len(expected), f"jobs {got} != expected {expected}"
        unmatched = list(got)
        for want in expected:
            want_files = sorted(want["files"])
            match = next(
                (g for g in unmatched if g[0] == want_files and want["executor"] in (None, g[1])),
                None,
            )
            assert match is not None, f"expected job {want} not in {got}"
            unmatched.remove(match)
        return

    props = case["expected_properties"]
    unknown = set(props) - _KNOWN_PROPERTIES
    assert not unknown, f"the test does not know how to check {sorted(unknown)}"
    job_files = [_names(j.files) for j in jobs]
    if "num_jobs" in props:
        assert len(jobs) == props["num_jobs"]
    if "job_size" in props:
        assert all(len(f) == props["job_size"] for f in job_files), [len(f) for f in job_files]
    if "kind" in props:
        assert all(j.kind == CompactionKind(props["kind"]) for j in jobs)
    if "group" in props:
        assert {executor_names[j.executor] for j in jobs} <= {props["group"]}
    if props.get("disjoint"):
        flat = [n for f in job_files for n in f]
        assert len(flat) == len(set(flat))
    if "union" in props:
        assert {n for f in job_files for n in f} == set(props["union"])
    if "within" in props:
        assert {n for f in job_files for n in f} <= set(props["within"])
    if "max_total" in props:
        # Read as a bound on each job's total input size.
        for f in job_files:
            assert sum(sizes[n] for n in f) <= props["max_total"], f


def test_cases_file_has_both_targets() -> None:
    if CASES_PATH is None:
        pytest.skip("planner_cases.json not found")
    targets = {c["target"] for c in CASES}
    assert {"find", "plan"} <= targets


_PARAMS = [pytest.param(c, id=c["name"]) for c in CASES] or [
    pytest.param(
        None,
        id="no-cases-file",
        marks=pytest.mark.skip(
            reason=f"planner_cases.json not found at any of {[str(p) for p in _CANDIDATES]}"
        ),
    )
]


@pytest.mark.parametrize("case", _PARAMS)
def test_case(case: dict[str, Any]) -> None:
    if case["target"] == "find":
        _check_find(case)
    elif case["target"] == "plan":
        _check_plan(case)
    else:
        pytest.fail(f"unknown target {case['target']!r}")
