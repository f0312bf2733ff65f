#!/usr/bin/env python3
"""A usage-record webhook receiver: stores each record once in SQLite.

turnserver delivers records at least once (a batch may come again after a timeout or a
restart), so the receiver deduplicates by the record's `id`: INSERT OR IGNORE on a
primary key. Standard library only.

    python3 usage_receiver.py --listen 127.0.0.1:8089 --db usage.sqlite --token-file T

and in turnserver.yaml:

    usage:
      state_dir: /var/lib/turnserver/usage
      webhook:
        url: http://127.0.0.1:8089/
        token_file: T

Usage per tenant and month, from the stop records (each allocation has exactly one):

    sqlite3 usage.sqlite "SELECT tenant, substr(datetime(time, 'unixepoch'), 1, 7) AS month,
        count(*), sum(bytes_to_peer + bytes_to_client) FROM records WHERE kind = 'stop'
        GROUP BY tenant, month"
"""

from __future__ import annotations

import argparse
import hmac
import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COLUMNS = (
    "id", "kind", "allocation_id", "seq", "time", "tenant", "user", "client", "transport",
    "duration", "peers", "packets_to_peer", "bytes_to_peer", "packets_to_client",
    "bytes_to_client", "cause",
)  # fmt: skip
MAX_BODY = 16 * 2**20


def open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute(
        "CREATE TABLE IF NOT EXISTS records (id TEXT PRIMARY KEY, kind TEXT, "
        "allocation_id TEXT, seq INTEGER, time REAL, tenant TEXT, user TEXT, client TEXT, "
        "transport TEXT, duration REAL, peers INTEGER, packets_to_peer INTEGER, "
        "bytes_to_peer INTEGER, packets_to_client INTEGER, bytes_to_client INTEGER, "
        "cause TEXT, record TEXT)"
    )
    db.commit()
    return db


def store(db: sqlite3.Connection, lock: threading.Lock, records: list[dict[str, object]]) -> int:
    """Insert the records not seen before; returns how many were new."""
    rows = [(*(r.get(c) for c in COLUMNS), json.dumps(r)) for r in records]
    marks = ", ".join("?" * (len(COLUMNS) + 1))
    with lock:
        before = db.total_changes
        db.executemany(f"INSERT OR IGNORE INTO records VALUES ({marks})", rows)
        db.commit()
        return db.total_changes - before


def make_handler(db: sqlite3.Connection, token: str) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # (http.server's name for it)
            given = self.headers.get("Authorization", "")
            if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self.send_error(401)
                return
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY:
                self.send_error(413)
                return
            try:
                body = json.loads(self.rfile.read(length))
                if body.get("schema") != 1:
                    raise ValueError("unknown schema")
                store(db, lock, body["records"])
            except (ValueError, KeyError, TypeError, AttributeError):
                self.send_error(400)  # turnserver retries: fix the receiver, nothing is lost
                return
            self.send_response(204)  # 2xx: turnserver moves on
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8089")
    parser.add_argument("--db", default="usage.sqlite")
    parser.add_argument("--token-file", help="the bearer token turnserver sends")
    args = parser.parse_args()
    token = ""
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), make_handler(open_db(args.db), token))
    server.serve_forever()


if __name__ == "__main__":
    main()
