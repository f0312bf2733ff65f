"""Integration tests: a real server, in-process or as a subprocess (with the default worker
count and with one), on loopback, with real components where users run them (Redis,
Prometheus)."""
