"""The compaction coordinator (`lithify compaction-coordinator`, SYSTEM.md 5.5-5.6).

`phi` and `queues` are pure building blocks and `config` the configuration; `reserve`, `running`,
`commit` and `requests` are the coordinator's parts (reservation, the running set and its
failure detection, the commit protocol, the asynchronous requests), and `core` wires them into
`CompactionCoordinator`. `app` exposes it over HTTP (docs/EXTERNAL_COMPACTIONS.md), and
`process` runs it: lease, standby and takeover, periodic checks, clean shutdown.
"""
