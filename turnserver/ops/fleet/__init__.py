"""Several servers as one service, with Redis as the shared state: the registry of nodes
(`registry`), this node's membership, shared revocations and Redis client (`node`) and the
per-user allocation quota across the fleet (`quota`)."""
