"""How long the default planner takes to plan one tablet.

Planning runs after every flush and periodically for every hosted tablet, so a server with many
tablets plans constantly; the target is under 200 microseconds per plan of 30 files.

The data set is fixed by a seed: each tablet has `--files` files with log-uniform sizes between
1 KiB and 1 GiB (a tablet's files span orders of magnitude), a SYSTEM plan with ratio 3 on the
`default` service. Every repeat plans every tablet once; the figure is the median over repeats.

    .venv/bin/python benchmarks/planner.py --tablets 10000 --files 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from lithify.compaction.planner import DefaultCompactionPlanner
from lithify.compaction.spi import CompactableFile, CompactionKind, PlanningParameters

TARGET_US = 200.0


def make_tablets(tablets: int, files: int, seed: int) -> list[PlanningParameters]:
    """One SYSTEM planning request per tablet, every file a candidate, nothing running."""
    rng = random.Random(seed)
    out = []
    for t in range(tablets):
        tablet_files = tuple(
            CompactableFile(
                f"file:///bench/t{t:05d}/F{i:03d}.parquet", int(2 ** rng.uniform(10, 30)), 0
            )
            for i in range(files)
        )
        out.append(
            PlanningParameters(
                kind=CompactionKind.SYSTEM,
                ratio=3.0,
                all_files=tablet_files,
                candidates=tablet_files,
                table_file_max=15,
            )
        )
    return out


def run(tablets: int, files: int, repeats: int, seed: int) -> dict[str, float | int]:
    planner = DefaultCompactionPlanner()
    planner.init("default", {})
    requests = make_tablets(tablets, files, seed)
    make_plan = planner.make_plan
    per_plan_us = []
    jobs = 0
    for _ in range(repeats):
        jobs = 0
        start = time.perf_counter()
        for params in requests:
            jobs += len(make_plan(params).jobs)
        per_plan_us.append((time.perf_counter() - start) / tablets * 1e6)
    return {
        "us_per_plan": statistics.median(per_plan_us),
        "us_per_plan_min": min(per_plan_us),
        "us_per_plan_max": max(per_plan_us),
        "tablets": tablets,
        "files": files,
        "repeats": repeats,
        "jobs_per_repeat": jobs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tablets", type=int, default=10_000, help="tablets to plan (10000)")
    parser.add_argument("--files", type=int, default=30, help="files per tablet (30)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (5)")
    parser.add_argument("--seed", type=int, default=20240601, help="random seed")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the result as JSON")
    args = parser.parse_args(argv)
    if args.tablets < 1 or args.files < 1 or args.repeats < 1:
        parser.error("--tablets, --files and --repeats must be positive")

    result = run(args.tablets, args.files, args.repeats, args.seed)
    us = result["us_per_plan"]
    verdict = "meets" if us < TARGET_US else "MISSES"
    rows = [
        ("tablets", f"{args.tablets:,}"),
        ("files per tablet", f"{args.files}"),
        ("repeats", f"{args.repeats}"),
        ("jobs per repeat", f"{result['jobs_per_repeat']:,}"),
        ("us per plan (median)", f"{us:.1f}"),
        (
            "us per plan (min..max)",
            f"{result['us_per_plan_min']:.1f}..{result['us_per_plan_max']:.1f}",
        ),
        ("target us per plan", f"< {TARGET_US:.0f} ({verdict})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:>18}")
    if args.json:
        args.json.write_text(
            json.dumps({"us_per_plan": us, "tablets": args.tablets, "files": args.files}) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
