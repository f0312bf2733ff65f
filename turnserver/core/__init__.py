"""TURN state, sans I/O: allocations, permissions, channels, nonces, auth, policy.

Nothing here imports asyncio, socket, time or the io/ops layers; every entry point
takes `now`, and what happened is reported as events.
"""
