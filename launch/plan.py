"""What runs where, decided before any process starts: this node's rank and a layout that fits the cluster."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from model.config import ConfigError, require
from parallel.mesh import ParallelDims
from train.config import Config, micro_batches_per_step

# Where schedulers put a node's index when they start one task per node (first match wins).
SCHEDULER_NODE_RANK = ("SLURM_NODEID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def resolve_node_rank(cfg: Config, cli_rank: int | None, environ: Mapping[str, str]) -> tuple[int, str]:
    """(node rank, where it came from): --node-rank, then cluster.node_rank, then the scheduler's environment."""
    cluster = cfg.cluster
    if cli_rank is not None:
        rank, source = cli_rank, "--node-rank"
    elif cluster.node_rank is not None:
        rank, source = cluster.node_rank, "cluster.node_rank"
    else:
        found = next((name for name in SCHEDULER_NODE_RANK if environ.get(name, "").strip()), None)
        if found is not None:
            value = environ[found].strip()
            require(
                value.isascii() and value.isdigit(),
                found,
                f"{environ[found]!r} is malformed, expected a node index (0, 1, ...); fix or unset the variable, "
                "or pass --node-rank R",
            )
            rank, source = int(value), found
        elif cluster.nnodes == 1:
            rank, source = 0, "single node"
        else:
            raise ConfigError(
                f"cluster.node_rank: not set and no scheduler variable ({', '.join(SCHEDULER_NODE_RANK)}) in the "
                f"environment; pass --node-rank R (0..{cluster.nnodes - 1}) on each node or use --slurm"
            )
    require(
        0 <= rank < cluster.nnodes,
        "cluster.node_rank",
        f"{rank} (from {source}) is not in [0, cluster.nnodes={cluster.nnodes}); node ranks count from 0",
    )
    return rank, source


def check_layout(cfg: Config) -> ParallelDims:
    """parallel.* and the batch split against WORLD_SIZE = nnodes x nproc_per_node, as torchrun will set it."""
    cluster = cfg.cluster
    world = cluster.nnodes * cluster.nproc_per_node
    try:
        dims = ParallelDims.from_config(cfg.parallel, world)
        micro_batches_per_step(cfg, dims.dp)
    except ConfigError as e:
        # Name where WORLD_SIZE comes from: the messages are written for torchrun, which sets it.
        where = f"WORLD_SIZE={world} (cluster.nnodes x cluster.nproc_per_node = {cluster.nnodes} x "
        raise ConfigError(str(e).replace(f"WORLD_SIZE={world}", where + f"{cluster.nproc_per_node})", 1)) from None
    return dims


def require_endpoint(cfg: Config) -> None:
    """Several nodes must be told where node 0 is (--slurm fills it in from the allocation instead)."""
    cluster = cfg.cluster
    require(
        cluster.nnodes == 1 or cluster.rendezvous_endpoint is not None,
        "cluster.rendezvous_endpoint",
        f"required with cluster.nnodes={cluster.nnodes}; set host:port of node 0 (e.g. 10.0.0.1:29400) "
        "or use --slurm, which takes the allocation's first node",
    )


def log_dir(cfg: Config) -> Path:
    return Path(cfg.cluster.log_dir) if cfg.cluster.log_dir else cfg.run_dir / "logs"


def rendezvous_id(cfg: Config) -> str:
    return cfg.cluster.rendezvous_id or cfg.name
