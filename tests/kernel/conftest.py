"""The BPF object the kernel tests load: built from its source for this run, and the
packaged one where the server looks for it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.kernel import unavailable
from turnserver.io.kernel.program import SOURCE, clang_command


@pytest.fixture(scope="module")
def bpf_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        unavailable("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)")
    if shutil.which("clang") is None or not Path("/usr/include/bpf/bpf_helpers.h").exists():
        unavailable("clang and libbpf-dev are needed to build the BPF object")
    out = tmp_path_factory.mktemp("bpf") / "channel_relay.bpf.o"
    subprocess.run(clang_command(SOURCE, out), check=True)
    return out


@pytest.fixture(scope="module")
def packaged_object(bpf_object: Path) -> Path:
    """The object where the server looks for it (`make bpf` builds it there)."""
    from turnserver.io.kernel.flows import OBJECT

    if not OBJECT.exists() or OBJECT.stat().st_mtime < SOURCE.stat().st_mtime:
        subprocess.run(clang_command(SOURCE, OBJECT), check=True)
    return OBJECT
