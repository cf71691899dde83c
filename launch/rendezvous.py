"""Rendezvous failures as one line: an unreachable node 0 is found before torchrun starts; a rendezvous that
times out inside torchrun is recognised in its stderr. Standard library only (the log tee imports this)."""

from __future__ import annotations

import re
import socket
import time

# The last line of torchrun's traceback when its rendezvous fails (worker lines carry a "[rankN]: " prefix and
# cannot match at the start of a line).
_FAILURE = re.compile(
    r"^torch\.distributed\.(elastic\.rendezvous\.api\.Rendezvous\w*Error|DistNetworkError|DistStoreError)",
    re.MULTILINE,
)


def wait_until_reachable(host: str, port: int, timeout_s: float) -> bool:
    """True once a TCP connection to host:port opens; False when none did within timeout_s. Node 0 may start
    after this node, so refused connections are retried."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, left))):
                return True
        except OSError:
            if time.monotonic() + 0.25 >= deadline:
                return False
            time.sleep(0.25)


def unreachable_message(endpoint: str, node_rank: int, timeout_s: int) -> str:
    return (
        f"rendezvous error: cluster.rendezvous_endpoint: {endpoint} did not answer node {node_rank} within "
        f"{timeout_s}s (cluster.rendezvous_timeout_s); start node 0 first, check the address, port and firewall, "
        "or raise the timeout"
    )


def incomplete_message(endpoint: str, rdzv_id: str, nnodes: int, timeout_s: int) -> str:
    return (
        f"rendezvous error: cluster.rendezvous_endpoint: the rendezvous at {endpoint} (id {rdzv_id}) did not "
        f"complete within {timeout_s}s (cluster.rendezvous_timeout_s); start all {nnodes} nodes with the same "
        "config, check that node 0 is reachable from every node, or raise the timeout"
    )


def is_rendezvous_failure(stderr_tail: str) -> bool:
    return _FAILURE.search(stderr_tail) is not None
