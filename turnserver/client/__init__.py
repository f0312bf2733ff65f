"""A TURN client that works against any server (ours, coturn, ...): the protocol client
(`turnclient`), the `preflight` network diagnosis built on it, and the browser version of
that diagnosis (`static/preflight.html` and `.js`, served by the credentials API).

Imports only `stun/`: the server's self-probe (ops/telemetry/probe.py) and the CLI use it, never
the other way round."""
