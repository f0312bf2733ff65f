"""`turnserver admin`: the admin API from a shell, for one server or a fleet.

    turnserver admin --server http://127.0.0.1:9642 --token-file T allocations --user alice
    turnserver admin --server URL1 --server URL2 revoke alice --for 2h --reason "banned"
    turnserver admin --server URL --token-file T allocations --fleet   (every node of a fleet)
    turnserver admin --server URL --token-file T end ID

The commands say what the API says (allocations, end); `sessions` and `kill` are the same
commands under the names they had before.

Every command goes to every --server (e.g. each pod of the DaemonSet); the exit code is
non-zero when any server refused or could not be reached.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from turnserver.ops.http.credentials import parse_ttl


class AdminError(Exception):
    """A server refused a request or could not be reached (with what was read anyway)."""

    def __init__(self, message: str, partial: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.partial = partial or []


def _call(
    server: str, token: str, method: str, path: str, body: Any = None, insecure: bool = False
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        server.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    ctx = None
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=10, context=ctx) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise AdminError(f"{server}: {exc.code} {message}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"{server}: cannot reach the admin API: {reason}") from None


def _allocations(server: str, token: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = ""
    while True:
        query = {"limit": "1000", "cursor": cursor}
        if args.user:
            query["user"] = args.user
        if args.tenant:
            query["tenant"] = args.tenant
        if args.fleet:  # the node fans out to every node of the registry (no paging)
            query = {k: v for k, v in query.items() if k != "cursor"} | {"fleet": "1"}
        page = _call(
            server,
            token,
            "GET",
            "/admin/v1/allocations?" + urllib.parse.urlencode(query),
            insecure=args.insecure,
        )
        out += [{**a, "server": server} for a in page["allocations"]]
        if page.get("unreachable"):
            raise AdminError(
                f"{server}: nodes that did not answer: {', '.join(page['unreachable'])} "
                f"(the {len(out)} allocations of the others are listed)",
                out,
            )
        cursor = page.get("next_cursor", "")
        if not cursor:
            return out


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("ID", "USER", "TRANSPORT", "CLIENT", "RELAYED", "PERMS", "CHANS", "TX", "RX", "BPS")
    lines = [head]
    for a in rows:
        lines.append(
            (
                a["id"],
                a["user"],
                a["transport"],
                a["client"],
                ",".join(a["relayed"]),
                str(len(a["permissions"])),
                str(len(a["channels"])),
                str(a["bytes_to_peer"]),
                str(a["bytes_to_client"]),
                str(int(a["rate_bps"])),
            )
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines)


# the names `allocations` and `end` had before they said what the API says
ALIASES = {"sessions": "allocations", "kill": "end"}


def run(args: argparse.Namespace) -> int:
    """Run one admin command against every --server; returns the exit code."""
    token = args.token
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as fh:
                token = fh.read().strip().rpartition(":")[2]
        except OSError as exc:
            print(
                f"turnserver admin: cannot read {args.token_file}: {exc.strerror}", file=sys.stderr
            )
            return 2
    if not token:
        print("turnserver admin: give --token or --token-file", file=sys.stderr)
        return 2
    action = ALIASES.get(args.admin_command, args.admin_command)
    servers = args.server or ["http://127.0.0.1:9642"]
    failed = False
    rows: list[dict[str, Any]] = []
    for server in servers:
        try:
            if action == "allocations":
                rows += _allocations(server, token, args)
            elif action == "end":
                _call(
                    server,
                    token,
                    "DELETE",
                    f"/admin/v1/allocations/{args.id}",
                    insecure=args.insecure,
                )
                print(f"{server}: ended {args.id}")
            elif action == "revoke":
                body = {"user": args.user, "for": parse_ttl(args.duration), "reason": args.reason}
                got = _call(server, token, "POST", "/admin/v1/revocations", body, args.insecure)
                note = f" ({got['warning']})" if got.get("warning") else ""
                print(
                    f"{server}: {args.user} revoked until {got['until']}, "
                    f"{got['ended']} allocations ended{note}"
                )
            elif action == "unrevoke":
                path = "/admin/v1/revocations/" + urllib.parse.quote(args.user, safe="")
                _call(server, token, "DELETE", path, insecure=args.insecure)
                print(f"{server}: {args.user} no longer revoked")
            elif action == "summary":
                got = _call(server, token, "GET", "/admin/v1/summary", insecure=args.insecure)
                print(json.dumps({"server": server, **got}, indent=2))
        except (AdminError, ValueError) as exc:
            print(f"turnserver admin: {exc}", file=sys.stderr)
            if isinstance(exc, AdminError) and action == "allocations":
                rows += exc.partial
            failed = True
    if action == "allocations":
        print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 1 if failed else 0


def add_parser(sub: Any) -> None:
    """The `admin` subcommand's arguments."""
    p = sub.add_parser(
        "admin",
        help="list, end and revoke allocations through the admin API (one server or a fleet)",
        description="Talk to the admin API of one server or several (repeat --server).",
    )
    p.add_argument(
        "--server",
        action="append",
        metavar="URL",
        help="admin API base URL, repeatable (default http://127.0.0.1:9642)",
    )
    p.add_argument("--token", metavar="T", help="admin token")
    p.add_argument("--token-file", metavar="F", help="read the admin token from this file")
    p.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
    cmds = p.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)
    s = cmds.add_parser(
        "allocations",
        aliases=[k for k, v in ALIASES.items() if v == "allocations"],
        help="live allocations, like ps",
    )
    s.add_argument("--user", help="only this user (static user or REST user part)")
    s.add_argument("--tenant", help="only this tenant's allocations (tenants:)")
    s.add_argument("--json", action="store_true", help="a JSON list of objects")
    s.add_argument(
        "--fleet",
        action="store_true",
        help="every node's allocations, through the node --server names (fleet.redis); "
        "ids name their node, and `end` with one reaches that node from any node",
    )
    k = cmds.add_parser(
        "end", aliases=[k for k, v in ALIASES.items() if v == "end"], help="end one allocation now"
    )
    k.add_argument("id")
    r = cmds.add_parser("revoke", help="end a user's allocations and refuse them until a time")
    r.add_argument("user")
    r.add_argument("--for", dest="duration", required=True, help="how long: 600, 30m, 2h, 1d")
    r.add_argument("--reason", default="", help="kept with the revocation and logged")
    u = cmds.add_parser("unrevoke", help="lift a revocation")
    u.add_argument("user")
    cmds.add_parser("summary", help="counts by transport, top users, ports free, workers")
