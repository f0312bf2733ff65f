"""The container image, built with podman from the Dockerfile as an operator would, and
containers started from it for a test and removed after it.

No registry is reachable from CI, so the Dockerfile's two base images are made locally
first (.ci/image/base-images: debootstrap, then Debian's python3 made to look like the
official python image); the Dockerfile keeps its real FROM lines. podman runs with a
private containers.conf (.ci/image/containers.conf: runc, explicit ulimits). The image
is rebuilt only when what it is built from changed (a label carries the hash)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
IMAGE = "localhost/turnserver:test"
LABEL = "org.turnserver.source-sha256"
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / ".ci" / "image" / "containers.conf")}
BUILT_FROM = ("Dockerfile", ".dockerignore", "constraints.txt", "pyproject.toml", "README.md")


def require_podman() -> None:
    """podman, debootstrap and root (debootstrap, netns): CI fails without them, a
    developer's laptop skips and says why."""
    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    why = ""
    if missing:
        why = f"{' and '.join(missing)} not installed (.ci/run installs them)"
    elif os.geteuid() != 0:
        why = "building the base images (debootstrap) and the image tests need root"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the image tests cannot run: {why}")
        pytest.skip(why)


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return done


def source_hash() -> str:
    """What the image is built from: the Dockerfile's inputs as they are on disk."""
    digest = hashlib.sha256()
    paths = [ROOT / name for name in BUILT_FROM] + [ROOT / "config" / "turnserver.yaml"]
    paths += sorted(
        p for p in (ROOT / "turnserver").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    for path in paths:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_image() -> str:
    """The base images (once), then the image when its sources changed; its name."""
    done = subprocess.run(
        [str(ROOT / ".ci" / "image" / "base-images")],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert done.returncode == 0, f"base images: {done.stdout}{done.stderr}"
    wanted = source_hash()
    have = podman(
        "image", "inspect", IMAGE, "--format", f'{{{{index .Labels "{LABEL}"}}}}', check=False
    )
    if have.returncode != 0 or have.stdout.strip() != wanted:
        podman(
            "build",
            "--pull=never",
            "--format",
            "docker",  # the OCI format drops HEALTHCHECK
            "--label",
            f"{LABEL}={wanted}",
            "-t",
            IMAGE,
            str(ROOT),
            timeout=600,
        )
    return IMAGE


@dataclass
class Container:
    name: str

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def state(self) -> tuple[str, int]:
        """(status, exit code)."""
        out = podman("inspect", self.name, "--format", "{{.State.Status}} {{.State.ExitCode}}")
        status, code = out.stdout.split()
        return status, int(code)

    def exec(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *args, timeout=timeout, check=False)


@contextmanager
def container(image: str, *run_args: str, command: list[str] | None = None) -> Iterator[Container]:
    """`podman run -d` with these options and command; removed at the end whatever
    happened (the test's own containers only: each has a unique name)."""
    name = f"turnserver-test-{uuid.uuid4().hex[:10]}"
    podman("run", "-d", "--name", name, *run_args, image, *(command or []))
    try:
        yield Container(name)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def config_dir(base: Path, text: str, secret: str) -> Path:
    """A directory to mount at /etc/turnserver: turnserver.yaml and the secrets file
    it names, readable by the image's unprivileged user."""
    path = base / f"etc-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    (path / "turnserver.yaml").write_text(text)
    (path / "secrets").write_text(secret + "\n")
    for f in path.iterdir():
        f.chmod(0o644)
    return path
