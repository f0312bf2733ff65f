"""Authorization beyond the configuration: the HTTP hook asked about users the server
does not know (docs/auth-hook.md)."""
