"""systemd notification (sd_notify) without libsystemd: READY=1 once listeners are bound,
WATCHDOG=1 from the event loop while it is responsive, STOPPING=1 on the way out."""

from __future__ import annotations

import asyncio
import os
import socket


def notify(message: str) -> bool:
    """Send one sd_notify message; False when not run by systemd (no NOTIFY_SOCKET)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of WatchdogSec when systemd asked for keep-alives for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def start_watchdog(loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle | None:
    """Ping the watchdog from the loop itself: a stuck loop stops the pings."""
    interval = watchdog_interval()
    if interval is None:
        return None
    holder: list[asyncio.TimerHandle] = []

    def ping() -> None:
        notify("WATCHDOG=1")
        holder[:] = [loop.call_later(interval, ping)]

    holder.append(loop.call_later(0, ping))
    return holder[0]
