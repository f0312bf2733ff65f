"""Settings that several nodes serving the same clients must share, and the warning
a node gives at start when one is left empty while other nodes are in view."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from turnserver.ops.config.settings import Settings

# setting -> (Settings field, what an empty one costs: each node makes its own value)


SHARED_ACROSS_NODES = {
    "auth.nonce_secret": (
        "nonce_secret",
        "each node makes its own random nonce key, so a client that reaches another node "
        "(a load balancer, DNS, a restart) is answered 438 Stale Nonce and must retry; "
        "the health probe's credential differs per node too",
    ),
}


def other_nodes_in_view(environ: Mapping[str, str]) -> str | None:
    """Why this server may share its clients with other nodes, or None when nothing
    says so. Kubernetes: a DaemonSet or Deployment runs one server per node or replica."""
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return "it runs in Kubernetes (KUBERNETES_SERVICE_HOST is set)"
    return None


def cross_node_warnings(s: Settings, environ: Mapping[str, str]) -> list[str]:
    """A warning for each setting that must match across nodes and is left empty, when
    other nodes are in view."""
    why = other_nodes_in_view(environ)
    if why is None:
        return []
    return [
        f"{key} is empty and {why}: {cost}; set the same {key} (or {key}_file) on every node"
        for key, (attr, cost) in SHARED_ACROSS_NODES.items()
        if not getattr(s, attr)
    ]
