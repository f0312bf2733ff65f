"""What runs the server, one concern per sub-package: `config` (YAML and flags to
Settings), `process` (one process or a supervisor and its workers, systemd), `http` (the
credentials, admin and health APIs), `telemetry` (metrics, event log, probe, certificate
checks), `dev` (developer mode) and `fleet` (several servers sharing Redis)."""
