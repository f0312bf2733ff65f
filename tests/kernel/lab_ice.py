"""One ICE agent (aioice) inside a lab namespace, talking to the test over stdin/stdout.

Prints its candidates as one JSON line, reads the other side's, connects, exchanges a
message, and prints the result as a JSON line."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys

import aioice


async def main() -> None:
    args = json.loads(sys.argv[1])
    turn = args.get("turn")
    kwargs: dict[str, object] = {
        "ice_controlling": args["controlling"],
        "components": 1,
        "use_ipv6": False,
        "stun_server": tuple(args["stun"]),
    }
    if turn:
        kwargs.update(
            turn_server=tuple(turn["server"]),
            turn_username=turn["username"],
            turn_password=turn["password"],
            turn_transport=turn["transport"],
        )
        if turn.get("tls"):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            kwargs["turn_ssl"] = ctx
    conn = aioice.Connection(**kwargs)  # type: ignore[arg-type]
    await asyncio.wait_for(conn.gather_candidates(), 15)
    cands = [c.to_sdp() for c in conn.local_candidates]
    if args.get("relay_only"):
        cands = [c for c in cands if " typ relay" in c]
    print(
        json.dumps({"ufrag": conn.local_username, "pwd": conn.local_password, "candidates": cands}),
        flush=True,
    )
    remote = json.loads(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
    conn.remote_username = remote["ufrag"]
    conn.remote_password = remote["pwd"]
    for sdp in remote["candidates"]:
        await conn.add_remote_candidate(aioice.Candidate.from_sdp(sdp))
    await conn.add_remote_candidate(None)
    result: dict[str, object] = {"ok": False}
    try:
        await asyncio.wait_for(conn.connect(), args.get("timeout", 10))
        await conn.send(b"hello from " + args["name"].encode())
        data = await asyncio.wait_for(conn.recv(), 5)
        pair = conn._nominated.get(1)
        result = {
            "ok": True,
            "received": data.decode(),
            "local": pair.local_candidate.type if pair else None,
            "remote": pair.remote_candidate.type if pair else None,
        }
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    await asyncio.sleep(1)  # let the other side receive
    await conn.close()


asyncio.run(main())
