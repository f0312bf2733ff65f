"""Running the server as processes: one process (ops/process/app.py) or a supervisor and its
workers sharing the listener ports (SO_REUSEPORT), who are one server to clients and
operators: quotas, RFC 6062 connections, revocations, metrics and the drain span them."""
