"""The compaction coordinator (`lithify compaction-coordinator`, SYSTEM.md 5.5-5.6).

`phi` and `queues` are pure building blocks, `core` is the coordinator's logic over the metadata
store and the storage layer, `app` exposes it over HTTP (docs/EXTERNAL_COMPACTIONS.md), and
`process` runs it: lease, standby and takeover, periodic checks, clean shutdown.
"""
