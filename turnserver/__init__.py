"""turnserver: a self-hosted TURN/STUN relay with health monitoring."""

__version__ = "0.1.0"
SOFTWARE = f"turnserver/{__version__}"
