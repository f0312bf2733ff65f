"""Secret files named by the configuration rather than written in it (Kubernetes
Secret mounts, systemd credentials): one secret a line, comments allowed."""

from __future__ import annotations

from turnserver.ops.config_values import ConfigError
from turnserver.ops.config_yaml import not_utf8


def read_secret_lines(path: str, key: str) -> list[str]:
    """Non-empty, non-comment lines of a secrets file, e.g. a Kubernetes Secret mount
    (ConfigError names the key)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{key}: {path}: {not_utf8(exc)}") from None
