"""Usage records, RADIUS-accounting style: a `start` when an allocation is created,
an `interim` every usage.interim_interval, a `stop` with its cause; the on-disk spool
they wait in, the sinks that deliver them (a JSON-lines file, an HTTP webhook), the
crash ledger a restarted worker writes `stop` records from, and each tenant's bytes
for the calendar month (docs/usage.md)."""
