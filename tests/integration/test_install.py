"""Installing without the checkout, as the docs say: `make dist`'s build gives a wheel
and an sdist with what an installed server needs (the compiled BPF object, the page),
and docs/testing-relay-only.md's commands and example file, run verbatim in a fresh
virtualenv outside the repository, pass."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "testing-relay-only.md"
PLACEHOLDER = "/path/to/turnserver-0.1.0-py3-none-any.whl"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make dist` runs (python -m build), into a directory of the test's."""
    out = tmp_path_factory.mktemp("dist")
    make = (ROOT / "Makefile").read_text()
    assert "$(BIN)/python -m build --outdir dist ." in make
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_dist_builds_a_wheel_and_an_sdist_with_what_a_server_needs(dist: Path) -> None:
    (wheel,) = dist.glob("turnserver-*-py3-none-any.whl")
    (sdist,) = dist.glob("turnserver-*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "turnserver/io/kernel/channel_relay.bpf.o",
        "turnserver/io/kernel/channel_relay.bpf.c",
        "turnserver/client/static/preflight.html",
        "turnserver/client/static/preflight.js",
    ):
        assert needed in names, needed
    shipped = zipfile.ZipFile(wheel).read("turnserver/io/kernel/channel_relay.bpf.o")
    assert shipped == (ROOT / "turnserver/io/kernel/channel_relay.bpf.o").read_bytes()
    metadata = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        .decode()
    )
    assert "Provides-Extra: testing" in metadata
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    for needed in ("config/turnserver.yaml", "constraints.txt", "systemd/turnserver.service",
                   "Dockerfile", "turnserver/io/kernel/channel_relay.bpf.o"):  # fmt: skip
        assert needed in members, needed


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_docs_example_runs_in_a_fresh_venv_outside_the_repository(
    dist: Path, tmp_path: Path
) -> None:
    """The doc's install block and its test_relay.py, verbatim but for the wheel's
    path: a real aiortc call through `turnserver dev` and the pytest plugin's fixture."""
    text = DOC.read_text()
    (commands,) = [b for b in _blocks(text, "sh") if "pip install" in b and "[testing]" in b]
    (example,) = [b for b in _blocks(text, "python") if "def test_" in b]
    (wheel,) = dist.glob("turnserver-*-py3-none-any.whl")
    assert PLACEHOLDER in commands
    project = tmp_path / "my-app"
    project.mkdir()
    (project / "test_relay.py").write_text(example)
    script = "set -eu\n" + commands.replace(PLACEHOLDER, str(wheel))
    script = script.replace("pytest test_relay.py", "pytest -p no:cacheprovider test_relay.py")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT))
    )
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "2 passed" in done.stdout, done.stdout[-3000:]
    installed = subprocess.run(
        [
            str(project / ".venv" / "bin" / "python"),
            "-c",
            "import turnserver; print(turnserver.__file__)",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert str(project / ".venv") in installed.stdout  # the wheel's, not the checkout's
