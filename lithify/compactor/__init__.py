"""Compactors (`lithify compactor -q QUEUE`): processes that run external compaction jobs.

`compactor` is the work loop (ask, run, heartbeat, report), `process` the process around it.
"""
