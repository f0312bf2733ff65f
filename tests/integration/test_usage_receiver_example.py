"""docs/examples/usage_receiver.py, as the docs say to run it, behind a server's webhook:
it stores every record once, a batch delivered again adds nothing, a wrong token is
refused."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aioice import turn

from tests.support import Collector, eventually
from tests.support.endpoints import stable_port
from tests.support.procs import turnserver_process
from tests.support.server import free_port_range
from turnserver.ops.http.credentials import mint

pytestmark = pytest.mark.one_loop
EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "usage_receiver.py"


def _rows(db: Path) -> list[tuple[str, str, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, kind, tenant FROM records").fetchall()


async def test_the_example_receiver_keeps_each_record_once(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("receiver-token-0123\n")
    db = tmp_path / "usage.sqlite"
    port = stable_port()
    receiver = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--listen", f"127.0.0.1:{port}", "--db", str(db),
         "--token-file", str(token)],
    )  # fmt: skip
    lo, hi = free_port_range(100)
    config = tmp_path / "turnserver.yaml"
    config.write_text(
        f"""
realm: example.org
auth: {{secrets: [s3cret]}}
relay: {{min_port: {lo}, max_port: {hi}}}
usage:
  state_dir: {tmp_path / "state"}
  webhook: {{url: "http://127.0.0.1:{port}/", token_file: {token}, retry_max: 1}}
"""
    )
    try:
        with turnserver_process(tmp_path, "--config", str(config)) as server:
            for i in range(3):
                cred = mint("s3cret", f"r{i}", 600, time.time())
                transport, _ = await turn.create_turn_endpoint(
                    Collector,
                    server_addr=("127.0.0.1", server.port),
                    username=cred.username,
                    password=cred.password,
                )
                transport.close()
            await eventually(lambda: len(_rows(db)) == 6, timeout=20, what="3 starts, 3 stops")
        rows = _rows(db)
        assert sorted(kind for _, kind, _ in rows) == ["start"] * 3 + ["stop"] * 3
        assert {tenant for _, _, tenant in rows} == {"default"}
        with sqlite3.connect(db) as conn:
            records = [json.loads(r) for (r,) in conn.execute("SELECT record FROM records")]
        url = f"http://127.0.0.1:{port}/"
        async with aiohttp.ClientSession() as session:
            batch = {"schema": 1, "records": records}
            headers = {"Authorization": "Bearer receiver-token-0123"}
            async with session.post(url, json=batch, headers=headers) as resp:
                assert resp.status == 204  # delivered again: taken, nothing added
            async with session.post(url, json=batch, headers={"Authorization": "Bearer x"}) as resp:
                assert resp.status == 401
        assert len(_rows(db)) == 6
    finally:
        receiver.terminate()
        receiver.wait(10)
