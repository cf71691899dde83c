"""The torchrun command line for one node, as argv plus the environment it adds."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

from launch.plan import log_dir, rendezvous_id
from train.config import Config

# torchrun prefixes every worker line it tees to the console with this; the global rank (not the local one) is what
# tells apart two nodes' failures in a merged console.
LOG_LINE_PREFIX = "[rank${rank}]: "


@dataclass(frozen=True)
class NodeCommand:
    node_rank: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the caller's environment

    def shell(self) -> str:
        """The command as one line a shell runs verbatim."""
        assignments = [f"{name}={shlex.quote(value)}" for name, value in self.env.items()]
        return " ".join([*assignments, shlex.join(self.argv)])


def train_overrides(overrides: list[str]) -> list[str]:
    """The overrides the trainer needs: all but cluster.*, which only the launcher reads."""
    return [o for o in overrides if not o.startswith("cluster.")]


def node_command(
    cfg: Config, config_path: str, overrides: list[str], node_rank: int, python: str = sys.executable
) -> NodeCommand:
    """torchrun (from this interpreter, so a venv's torch is the one used) running `-m train` on node `node_rank`."""
    cluster = cfg.cluster
    argv = [python, "-m", "torch.distributed.run", f"--nnodes={cluster.nnodes}"]
    argv.append(f"--nproc-per-node={cluster.nproc_per_node}")
    timeout = cluster.rendezvous_timeout_s
    if cluster.rendezvous_endpoint is None:  # one node (plan.require_endpoint): a private store on a free port
        argv.append("--standalone")
    else:
        argv += [
            f"--rdzv-backend={cluster.rendezvous_backend}",
            f"--rdzv-endpoint={cluster.rendezvous_endpoint}",
            f"--rdzv-id={rendezvous_id(cfg)}",
        ]
        if cluster.rendezvous_backend == "c10d":
            # Node 0 hosts the store: said explicitly, because guessing from the hostname fails when every node
            # resolves the endpoint to itself (127.0.0.1 in the tests) or to an address it does not own.
            is_host = int(node_rank == 0)
            argv.append(f"--rdzv-conf=is_host={is_host},join_timeout={timeout},read_timeout={timeout}")
        else:
            argv += [f"--node-rank={node_rank}", f"--rdzv-conf=timeout={timeout}"]
    argv += [
        f"--max-restarts={cluster.max_restarts}",
        # Per-rank stdout/stderr files under node{R}/, and the same lines on the console with the rank prefix.
        f"--log-dir={log_dir(cfg) / f'node{node_rank}'}",
        "--tee=3",
        "-m",
        "train",
        config_path,
        *train_overrides(overrides),
    ]
    env = {
        # torchrun's console is a pipe into the node log; unbuffered, lines arrive when they are written.
        "PYTHONUNBUFFERED": "1",
        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": LOG_LINE_PREFIX,
        **cluster.env,
    }
    return NodeCommand(node_rank, argv, env)
