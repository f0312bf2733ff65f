"""Revocations persist in a file: JSON `{"revocations": [{"user", "until", "reason"}]}`,
written atomically by the admin API and re-read when it changes, so that a fleet may
mount one shared file (a Kubernetes Secret or ConfigMap) and an operator may edit it."""

from __future__ import annotations

import json
import os

from turnserver.ops.config.values import ConfigError

Revocations = dict[str, tuple[float, str]]  # user -> (until, reason)


class RevocationStore:
    """The revocations file: JSON `{"revocations": [{"user", "until", "reason"}]}`,
    written atomically, re-read when it changes (a fleet may mount one shared file)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._mtime: float | None = None

    def load(self, now: float) -> Revocations:
        """The live entries (expired ones dropped); ConfigError for a bad file."""
        if not self.path:
            return {}
        try:
            stat = os.stat(self.path)
            with open(self.path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            self._mtime = None
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"admin.revocations_file: cannot read {self.path}: {exc}") from None
        self._mtime = stat.st_mtime
        if not text.strip():
            return {}
        try:
            entries = json.loads(text)["revocations"]
            out: Revocations = {}
            for e in entries:
                until = float(e["until"])
                if until > now:
                    out[str(e["user"])] = (until, str(e.get("reason", "")))
            return out
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"admin.revocations_file: {self.path} is not a revocations file ({exc})"
            ) from None

    def changed(self) -> bool:
        """True when the file's modification time differs from the last load."""
        if not self.path:
            return False
        try:
            mtime: float | None = os.stat(self.path).st_mtime
        except OSError:
            mtime = None
        return mtime != self._mtime

    def save(self, entries: Revocations) -> str | None:
        """Write the file atomically; returns why not (read-only mount...) or None."""
        if not self.path:
            return "no admin.revocations_file configured: kept in memory only"
        body = {
            "revocations": [
                {"user": u, "until": int(until), "reason": reason}
                for u, (until, reason) in sorted(entries.items())
            ]
        }
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(body, fh, indent=2)
                fh.write("\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return f"cannot write {self.path} ({exc.strerror}): kept in memory only"
        self._mtime = os.stat(self.path).st_mtime
        return None
