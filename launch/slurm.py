"""An sbatch script that runs `python -m launch` once per node: srun starts one task per node, each execs torchrun,
and the rendezvous is on the allocation's first node."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from launch.config import split_endpoint
from launch.plan import log_dir, rendezvous_id
from train.config import Config

DEFAULT_PORT = 29400  # torchrun's c10d default


def script_path(cfg: Config) -> Path:
    return Path(cfg.cluster.slurm.script) if cfg.cluster.slurm.script else log_dir(cfg) / f"{cfg.name}.sbatch"


def sbatch_script(
    cfg: Config, config_path: str, overrides: list[str], workdir: Path, python: str = sys.executable
) -> str:
    """The script text. Relative paths (config, run and log directories) are taken from `workdir`, which the job
    changes into, so it behaves as the command typed there."""
    cluster, slurm = cfg.cluster, cfg.cluster.slurm
    endpoint = cluster.rendezvous_endpoint
    port = split_endpoint(endpoint)[1] if endpoint else DEFAULT_PORT
    logs = workdir / log_dir(cfg)
    typed = shlex.join(["python", "-m", "launch", config_path, "--slurm", *overrides])
    lines = [
        "#!/bin/bash",
        f"# {cfg.name}: {cluster.nnodes} node(s) x {cluster.nproc_per_node} process(es), one torchrun agent per node.",
        f"# Written by `{typed}`; submit with `sbatch {script_path(cfg)}`.",
        f"#SBATCH --job-name={slurm.job_name or cfg.name}",
        f"#SBATCH --nodes={cluster.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={logs}/slurm-%j.out",
    ]
    for option, value in (
        ("partition", slurm.partition),
        ("account", slurm.account),
        ("time", slurm.time),
        ("gpus-per-node", slurm.gpus_per_node),
        ("cpus-per-task", slurm.cpus_per_task),
    ):
        if value is not None:
            lines.append(f"#SBATCH --{option}={value}")
    srun = ["srun", f"--nodes={cluster.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if slurm.cpus_per_task is not None:
        srun.append(f"--cpus-per-task={slurm.cpus_per_task}")  # srun no longer inherits it from sbatch
    launch = [python, "-m", "launch", config_path, *overrides, "cluster.node_rank=null"]
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        "# Node 0 is the allocation's first node and hosts the rendezvous; each node's launcher reads its rank from",
        "# SLURM_NODEID. The job id keeps the rendezvous of two jobs apart.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        " ".join(srun) + " \\",
        "  " + shlex.join(launch) + " \\",
        f'  "cluster.rendezvous_endpoint=${{head_node}}:{port}" \\',
        f'  "cluster.rendezvous_id={rendezvous_id(cfg)}-${{SLURM_JOB_ID}}"',
        "",
    ]
    return "\n".join(lines)
