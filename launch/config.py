"""The `cluster:` section of a run config: how many nodes and processes, how they meet, what they export.

Only `python -m launch` reads it; the training code ignores it. Checks here need nothing but the section itself;
the checks against `parallel:` (world size) and the scheduler's environment live in launch/plan.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from model.config import require

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RDZV_ID = re.compile(r"[A-Za-z0-9_.-]+")


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' (or '[v6 address]:port') -> (host, port); ValueError when it is not one."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(endpoint)
    return host.strip("[]"), int(port)


def _is_endpoint(text: str) -> bool:
    try:
        split_endpoint(text)
    except ValueError:
        return False
    return True


@dataclass
class SlurmConfig:
    """What `python -m launch CONFIG --slurm` puts in the #SBATCH header; null leaves the cluster's default."""

    job_name: str | None = None  # null: the config name
    partition: str | None = None  # #SBATCH --partition
    account: str | None = None  # #SBATCH --account
    time: str | None = None  # e.g. "24:00:00"
    gpus_per_node: int | None = None  # usually cluster.nproc_per_node on GPU nodes; null requests none
    cpus_per_task: int | None = None  # the one task per node runs torchrun and all its workers
    script: str | None = None  # where to write it; null: <log_dir>/<name>.sbatch

    def validate(self) -> None:
        for name in ("gpus_per_node", "cpus_per_task"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"cluster.slurm.{name}", f"must be >= 1 or null, got {value}")


@dataclass
class ClusterConfig:
    """`cluster:` nodes, processes per node and rendezvous for `python -m launch` (torchrun, Slurm)."""

    nnodes: int = 1  # nodes in the job
    nproc_per_node: int = 1  # one process per GPU (or per CPU worker)
    # null: `--node-rank R`, else the scheduler's environment (SLURM_NODEID, SLURM_PROCID, OMPI_COMM_WORLD_RANK).
    node_rank: int | None = None
    # c10d: torchrun's own store, hosted by node 0. static: fixed node ranks, node 0 is the master.
    rendezvous_backend: Literal["c10d", "static"] = "c10d"
    # host:port on node 0. null: one node uses torchrun --standalone; --slurm takes the allocation's first node.
    rendezvous_endpoint: str | None = None
    rendezvous_id: str | None = None  # null: the config name
    # How long a node waits to reach node 0 and for all nodes to join before it gives up with one line.
    rendezvous_timeout_s: int = 300
    max_restarts: int = 0  # torchrun restarts of the whole worker group after a failure
    # Exported to torchrun and every worker (NCCL_*, TORCH_*, ...). Quote numbers in YAML: "1", not 1.
    env: dict[str, str] = field(default_factory=dict)
    log_dir: str | None = None  # node{R}.log and torchrun's per-rank logs; null: <run_dir>/logs
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def validate(self) -> None:
        require(self.nnodes >= 1, "cluster.nnodes", f"must be >= 1, got {self.nnodes}")
        require(self.nproc_per_node >= 1, "cluster.nproc_per_node", f"must be >= 1, got {self.nproc_per_node}")
        if self.node_rank is not None:
            require(
                0 <= self.node_rank < self.nnodes,
                "cluster.node_rank",
                f"{self.node_rank} is not in [0, cluster.nnodes={self.nnodes}); node ranks count from 0",
            )
        if self.rendezvous_endpoint is not None:
            require(
                _is_endpoint(self.rendezvous_endpoint),
                "cluster.rendezvous_endpoint",
                f"{self.rendezvous_endpoint!r} is not host:port; give node 0's address, e.g. 10.0.0.1:29400",
            )
        if self.rendezvous_id is not None:
            require(
                _RDZV_ID.fullmatch(self.rendezvous_id) is not None,
                "cluster.rendezvous_id",
                f"{self.rendezvous_id!r} may only use letters, digits, '_', '.' and '-'",
            )
        require(
            self.rendezvous_timeout_s > 0,
            "cluster.rendezvous_timeout_s",
            f"must be positive, got {self.rendezvous_timeout_s}",
        )
        require(self.max_restarts >= 0, "cluster.max_restarts", f"must be >= 0, got {self.max_restarts}")
        for name in self.env:
            require(
                _ENV_NAME.fullmatch(name) is not None,
                f"cluster.env.{name}",
                "is not an environment variable name (letters, digits and '_', not starting with a digit)",
            )
        self.slurm.validate()
