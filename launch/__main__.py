"""`python -m launch CONFIG.yaml [--node-rank R] [--dry-run] [--slurm] [dotted.key=value ...]`

Validates the config and its `cluster:` section against the parallel layout, then execs torchrun on this node
(node 0 prints the resolved config first). --dry-run prints every node's command instead; --slurm writes an sbatch
script that runs this on every node (with --dry-run: prints it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import yaml

from model.config import ConfigError

if TYPE_CHECKING:
    from launch.command import NodeCommand
    from train.config import Config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch", description=__doc__.strip().split("\n\n")[1], allow_abbrev=False
    )
    p.add_argument("config", help="run config YAML with a cluster: section")
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="dotted.key=value", help="overrides, as for python -m train"
    )
    p.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="this node's rank (default: cluster.node_rank, else SLURM_NODEID / SLURM_PROCID / OMPI_COMM_WORLD_RANK)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command of every node (or --node-rank's)")
    p.add_argument("--slurm", action="store_true", help="write an sbatch script for the whole job")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    from launch import plan
    from train.config_load import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        plan.check_layout(cfg)
        if args.slurm:
            if args.node_rank is not None:
                raise ConfigError("--node-rank: not used with --slurm (every node reads SLURM_NODEID); drop it")
            return _slurm(cfg, args)
        plan.require_endpoint(cfg)
        if args.dry_run:
            # Every node's command, or only the one asked for (checked like a real run's, minus the environment).
            ranks = [plan.resolve_node_rank(cfg, args.node_rank, {})[0]] if args.node_rank is not None else None
            return _dry_run(cfg, args, ranks or range(cfg.cluster.nnodes))
        node_rank, source = plan.resolve_node_rank(cfg, args.node_rank, os.environ)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return _run(cfg, args, node_rank, source)


def _dry_run(cfg: Config, args: argparse.Namespace, ranks: Iterable[int]) -> int:
    from launch.command import node_command
    from launch.plan import log_dir

    n = cfg.cluster.nnodes
    for rank in ranks:
        role = ", hosts the rendezvous" if n > 1 and rank == 0 else ""
        print(f"# node {rank} of {n}{role}; console also to {log_dir(cfg) / f'node{rank}.log'}")
        print(node_command(cfg, args.config, args.overrides, rank).shell())
    return 0


def _slurm(cfg: Config, args: argparse.Namespace) -> int:
    from launch.plan import log_dir
    from launch.slurm import sbatch_script, script_path

    text = sbatch_script(cfg, args.config, args.overrides, Path.cwd())
    if args.dry_run:
        print(text, end="")
        return 0
    path = script_path(cfg)
    log_dir(cfg).mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    print(f"wrote {path}; submit with: sbatch {path}")
    return 0


def _run(cfg: Config, args: argparse.Namespace, node_rank: int, source: str) -> int:
    from launch import plan, rendezvous
    from launch.command import node_command

    cluster = cfg.cluster
    command = node_command(cfg, args.config, args.overrides, node_rank)
    logs = plan.log_dir(cfg)
    logs.mkdir(parents=True, exist_ok=True)
    node_log = logs / f"node{node_rank}.log"
    endpoint = cluster.rendezvous_endpoint
    if endpoint is not None and node_rank != 0:
        # Fail in one line, before torchrun's traceback, when node 0 cannot be reached at all.
        from launch.config import split_endpoint

        host, port = split_endpoint(endpoint)
        if not rendezvous.wait_until_reachable(host, port, cluster.rendezvous_timeout_s):
            message = rendezvous.unreachable_message(endpoint, node_rank, cluster.rendezvous_timeout_s)
            node_log.write_text(message + "\n")
            print(message, file=sys.stderr)
            return 1
    hint = (
        rendezvous.incomplete_message(endpoint, plan.rendezvous_id(cfg), cluster.nnodes, cluster.rendezvous_timeout_s)
        if endpoint is not None
        else None
    )
    _tee_console(node_log, hint)
    if node_rank == 0:
        # Once per job: what every rank is about to run, with the launcher's defaults filled in.
        resolved = dataclasses.replace(
            cluster, log_dir=str(logs), rendezvous_id=plan.rendezvous_id(cfg), node_rank=None
        )
        text = yaml.safe_dump(dataclasses.replace(cfg, cluster=resolved).to_dict(), sort_keys=False)
        print(f"resolved config ({' '.join([args.config, *args.overrides])}):\n{text}".rstrip())
    print(f"node {node_rank} of {cluster.nnodes} (rank from {source}), log {node_log}: {command.shell()}", flush=True)
    _exec(command)


def _tee_console(node_log: Path, hint: str | None) -> None:
    """From here on this process's stdout and stderr (and, after exec, torchrun's) also go to node_log."""
    from launch import tee

    _, out_w, err_w = tee.start(node_log, hint)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)


def _exec(command: NodeCommand) -> NoReturn:
    env = {**os.environ, **command.env}
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: torchrun keeps this process id, so srun, the terminal and `kill` signal it directly.
    os.execve(command.argv[0], command.argv, env)


if __name__ == "__main__":
    sys.exit(main())
