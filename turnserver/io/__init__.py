"""asyncio/uvloop adapters: listeners, relay sockets, the one core timer."""
