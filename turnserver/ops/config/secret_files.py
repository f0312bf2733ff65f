"""Secret files named by the configuration rather than written in it (Kubernetes
Secret mounts, systemd credentials): one secret a line, comments allowed."""

from __future__ import annotations

import os
from typing import Any

from turnserver.ops.config.values import ConfigError, not_utf8, parse_account


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


def _one_line(path: str, key: str) -> str:
    """A secrets file that must hold exactly one secret."""
    lines = read_secret_lines(path, key)
    if len(lines) != 1:
        raise ConfigError(f"{key}: {path} must hold one line (it has {len(lines)})")
    return lines[0]


def external_secrets(s: Any) -> dict[str, Any]:
    """Settings fields with the secrets, API keys, accounts and passwords that files or
    environment variables name added (`s`: the Settings; config.py imports us)."""
    secrets = list(s.secrets)
    if s.secrets_file:
        secrets += read_secret_lines(s.secrets_file, "auth.secrets_file")
    if s.secrets_env:
        value = os.environ.get(s.secrets_env)
        if value is None:
            raise ConfigError(f"auth.secrets_env: environment variable {s.secrets_env} is unset")
        secrets += [x.strip() for x in value.replace("\\n", ",").split(",") if x.strip()]
    keys = list(s.api_keys)
    if s.api_keys_file:
        keys += read_secret_lines(s.api_keys_file, "api.keys_file")
    admin_tokens = list(s.admin_tokens)
    if s.admin_tokens_file:
        admin_tokens += read_secret_lines(s.admin_tokens_file, "admin.tokens_file")
    nonce_secret = s.nonce_secret
    if s.nonce_secret_file:
        nonce_secret = _one_line(s.nonce_secret_file, "auth.nonce_secret_file")
    redis_password = s.fleet_redis_password
    if s.fleet_redis_password_file:
        redis_password = _one_line(s.fleet_redis_password_file, "fleet.redis_password_file")
    accounts = list(s.accounts)
    if s.accounts_file:
        accounts += [
            parse_account(x, "api.accounts_file")
            for x in read_secret_lines(s.accounts_file, "api.accounts_file")
        ]
    webhook_token = s.usage_webhook_token
    if s.usage_webhook_token_file:
        webhook_token = _one_line(s.usage_webhook_token_file, "usage.webhook.token_file")
    hook_token = s.auth_hook_token
    if s.auth_hook_token_file:
        hook_token = _one_line(s.auth_hook_token_file, "auth_hook.token_file")
    return dict(
        usage_webhook_token=webhook_token,
        auth_hook_token=hook_token,
        secrets=tuple(secrets),
        api_keys=tuple(keys),
        accounts=tuple(accounts),
        admin_tokens=tuple(admin_tokens),
        nonce_secret=nonce_secret,
        fleet_redis_password=redis_password,
    )
