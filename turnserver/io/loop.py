"""Event loop selection by name, uvloop when available (like uvicorn's LOOP_FACTORIES)."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
from collections.abc import Callable

LOOP_CHOICES = ("auto", "uvloop", "asyncio")


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(name: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Return (effective name, factory) for 'auto', 'uvloop' or 'asyncio'."""
    if name not in LOOP_CHOICES:
        raise ValueError(f"unknown loop {name!r}; choose one of {', '.join(LOOP_CHOICES)}")
    if name in ("auto", "uvloop") and uvloop_available():
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return "uvloop", factory
    if name == "uvloop":
        raise RuntimeError("--loop uvloop was asked for but uvloop is not installed")
    return "asyncio", asyncio.new_event_loop


def tune_gc() -> None:
    """Allocations are long-lived objects made in thousands: with the default gen-0
    threshold (700) the collector ran every few setups and scanned them all, 18 % of the
    core's CPU per setup at 10,000 live allocations (benchmarks/README.md)."""
    gc.set_threshold(20_000, 50, 100)
