"""The tablet server (`lithify tserver`): the embedded store served over HTTP.

`tserver_app` is the API, `coordinator_link` forwards external compaction plans and
cancellations to the coordinator, `user_compactions` follows user compactions through the
metadata, `tserver` is the process, and `instance`, `serving` and `launcher` are what every
process of an instance shares: the secret, leases, an HTTP server thread, starting processes.
"""
