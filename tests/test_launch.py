"""`python -m launch`: per-node torchrun commands, sbatch scripts, one-line errors, node logs, and two torchrun
agents on one machine giving the same losses as one agent with the same number of processes."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch import tee
from launch.__main__ import main
from launch.command import node_command
from launch.plan import resolve_node_rank
from launch.rendezvous import is_rendezvous_failure
from model.config import ConfigError
from train.config_load import load_config

ROOT = Path(__file__).resolve().parents[1]
TWO_NODES = str(ROOT / "configs/tiny-cpu-2node.yaml")
TINY = str(ROOT / "configs/tiny-cpu.yaml")
# One node with torchrun --standalone (a private store on a free port).
ONE_NODE = ["cluster.nnodes=1", "cluster.rendezvous_endpoint=null"]
SHORT = ["model.num_layers=2", "train.max_steps=4", "train.eval_interval=0", "logging.interval=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


# ---------------------------------------------------------------------------------------------------------------
# --dry-run


def test_dry_run_prints_each_nodes_torchrun_command(capsys):
    assert main([TWO_NODES, "--dry-run", "train.max_steps=7", "cluster.env.NCCL_IB_DISABLE=x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(";")[0] for line in lines[::2]] == ["# node 0 of 2, hosts the rendezvous", "# node 1 of 2"]
    commands = lines[1::2]
    for rank, line in enumerate(commands):
        words = shlex.split(line)
        python = words.index(sys.executable)  # the launcher's own interpreter (a venv's python stays a venv's)
        env = dict(w.split("=", 1) for w in words[:python])
        assert env["NCCL_DEBUG"] == "WARN" and env["NCCL_IB_DISABLE"] == "x"  # cluster.env, YAML and override
        assert env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] == "[rank${rank}]: "
        argv = words[python:]
        assert argv[1:3] == ["-m", "torch.distributed.run"]
        assert {"--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--tee=3"} <= set(argv)
        assert "--rdzv-endpoint=127.0.0.1:29400" in argv and "--rdzv-id=tiny-cpu-2node" in argv
        assert f"--rdzv-conf=is_host={int(rank == 0)},join_timeout=120,read_timeout=120" in argv
        assert f"--log-dir=runs/tiny-cpu-2node/logs/node{rank}" in argv
        # The trainer gets the config and the overrides it reads; cluster.* is the launcher's alone.
        assert argv[argv.index("train") - 1 :] == ["-m", "train", TWO_NODES, "train.max_steps=7"]
        # What is printed is what runs: the same argv the launcher execs.
        cfg = load_config(TWO_NODES, ["train.max_steps=7", "cluster.env.NCCL_IB_DISABLE=x"])
        assert node_command(cfg, TWO_NODES, ["train.max_steps=7", "cluster.env.NCCL_IB_DISABLE=x"], rank).argv == argv


def test_dry_run_of_one_node_static_backend_and_single_node(capsys):
    assert main([TWO_NODES, "--dry-run", "--node-rank", "1", "cluster.rendezvous_backend=static"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("# node 1 of 2")
    assert "--rdzv-backend=static" in out[1] and "--node-rank=1" in out[1] and "--rdzv-conf=timeout=120" in out[1]
    assert main([TINY, "--dry-run", "cluster.nproc_per_node=4", "parallel.ep=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "--standalone" in out[1] and "--nnodes=1 --nproc-per-node=4" in out[1]
    assert "--rdzv" not in out[1]


# ---------------------------------------------------------------------------------------------------------------
# --slurm


def test_sbatch_script_runs_the_launcher_once_per_node(tmp_path, capsys):
    logs = tmp_path / "logs"
    assert main([TWO_NODES, "--slurm", f"cluster.log_dir={logs}", "train.max_steps=9"]) == 0
    out = capsys.readouterr().out.strip()
    script = logs / "tiny-cpu-2node.sbatch"
    assert out == f"wrote {script}; submit with: sbatch {script}"
    text = script.read_text()
    assert os.access(script, os.X_OK) and text.startswith("#!/bin/bash\n")
    for line in (
        "#SBATCH --job-name=tiny-cpu-2node",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={logs}/slurm-%j.out",
        "#SBATCH --time=00:30:00",
        "#SBATCH --cpus-per-task=4",
        f"cd {shlex.quote(str(Path.cwd()))}",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
    ):
        assert line in text.splitlines(), line
    assert "#SBATCH --partition" not in text  # unset options are left to the cluster
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # Run it with stand-ins for scontrol and srun: srun receives one launcher command for all nodes, with the
    # rendezvous on the allocation's first node and each node's rank left to SLURM_NODEID.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/srun.args\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-a[17-18]"}
    subprocess.run(["bash", str(script)], env={**env, "SLURM_JOB_ID": "4242"}, check=True)
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:4] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=4"]
    launch = args[4:]
    assert launch[:4] == [sys.executable, "-m", "launch", TWO_NODES]
    assert launch[4:] == [
        f"cluster.log_dir={logs}",
        "train.max_steps=9",
        "cluster.node_rank=null",
        "cluster.rendezvous_endpoint=gpu-a17:29400",
        "cluster.rendezvous_id=tiny-cpu-2node-4242",
    ]
    # What one node's launcher then makes of it, with SLURM's variables.
    cfg = load_config(TWO_NODES, launch[4:])
    assert resolve_node_rank(cfg, None, {"SLURM_NODEID": "1", "SLURM_PROCID": "1"}) == (1, "SLURM_NODEID")


def test_slurm_dry_run_prints_the_script(capsys):
    assert main([TWO_NODES, "--slurm", "--dry-run", "cluster.slurm.gpus_per_node=8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --gpus-per-node=8" in out


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before anything starts


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["cluster.nnodes=3", "cluster.nproc_per_node=1", "parallel.tp=2"],
            "config error: parallel.tp: tp x pp = 2 x 1 = 2 does not divide WORLD_SIZE=3 (cluster.nnodes x "
            "cluster.nproc_per_node = 3 x 1); change tp/pp or the number of processes",
        ),
        (["parallel.ep=8"], "config error: parallel.ep: ep=8 does not divide dp=4"),
        (["parallel.dp=2"], "config error: parallel.dp: pp x dp x tp = 1 x 2 x 1 = 2 != WORLD_SIZE=4 (cluster."),
        (["train.global_batch_size=8"], "config error: train.global_batch_size: 8 is not a multiple of"),
        (["cluster.rendezvous_endpoint=null"], "config error: cluster.rendezvous_endpoint: required with"),
        (["cluster.rendezvous_endpoint=node0"], "config error: cluster.rendezvous_endpoint: 'node0' is not host:port"),
        (["--node-rank", "2"], "config error: cluster.node_rank: 2 (from --node-rank) is not in [0, cluster.nnodes=2)"),
        (["cluster.node_rank=5"], "config error: cluster.node_rank: 5 is not in [0, cluster.nnodes=2)"),
        (["cluster.env.NCCL_IB_DISABLE=1"], "config error: cluster.env.NCCL_IB_DISABLE: expected a string, got 1"),
        (["cluster.env.1BAD=x"], "config error: cluster.env.1BAD: is not an environment variable name"),
        (["cluster.rendezvous_timeout_s=0"], "config error: cluster.rendezvous_timeout_s: must be positive"),
        (["--slurm", "--node-rank", "0"], "config error: --node-rank: not used with --slurm"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, expected):
    assert _one_line_error(capsys, [TWO_NODES, *argv]).startswith(expected)


def test_the_launcher_plans_without_importing_the_trainer():
    # A dry run and a refused batch split: the layout and divisibility checks come from the config modules alone.
    code = (
        "import contextlib, io, json, sys; from launch.__main__ import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:\n"
        f"    assert main([{TWO_NODES!r}, '--dry-run']) == 0\n"
        f"    assert main([{TWO_NODES!r}, '--dry-run', 'train.global_batch_size=8']) == 2\n"
        "assert 'is not a multiple of' in err.getvalue(), err.getvalue()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('train.'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "train.config" in loaded
    assert not loaded & {"train.trainer", "train.step", "train.checkpoint", "train.evaluate", "train.metrics"}


def test_node_rank_comes_from_the_flag_the_config_or_the_scheduler(monkeypatch, capsys):
    cfg = load_config(TWO_NODES)
    env = {"SLURM_NODEID": "1"}
    assert resolve_node_rank(cfg, None, env) == (1, "SLURM_NODEID")
    assert resolve_node_rank(cfg, 0, env) == (0, "--node-rank")
    assert resolve_node_rank(load_config(TWO_NODES, ["cluster.node_rank=0"]), None, env) == (0, "cluster.node_rank")
    assert resolve_node_rank(cfg, None, {"OMPI_COMM_WORLD_RANK": "1"}) == (1, "OMPI_COMM_WORLD_RANK")
    with pytest.raises(ConfigError, match="cluster.node_rank: not set and no scheduler variable"):
        resolve_node_rank(cfg, None, {})
    for name in ("SLURM_NODEID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert _one_line_error(capsys, [TWO_NODES]).startswith("config error: cluster.node_rank: not set")


def test_missing_config_is_one_line_from_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "configs/nope.yaml", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "config error: configs/nope.yaml: config file not found; pass an existing YAML file such as "
        "configs/tiny-cpu.yaml\n"
    )


def test_unreachable_rendezvous_times_out_in_one_line(tmp_path, capsys):
    port = _free_port()  # nothing listens there
    argv = [TWO_NODES, "--node-rank", "1", f"cluster.rendezvous_endpoint=127.0.0.1:{port}"]
    argv += ["cluster.rendezvous_timeout_s=1", f"cluster.log_dir={tmp_path}"]
    line = _one_line_error(capsys, argv, code=1)
    assert line == (
        f"rendezvous error: cluster.rendezvous_endpoint: 127.0.0.1:{port} did not answer node 1 within 1s "
        "(cluster.rendezvous_timeout_s); start node 0 first, check the address, port and firewall, or raise the "
        "timeout"
    )
    assert (tmp_path / "node1.log").read_text() == line + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The node log tee


def _tee(tmp_path: Path, capfd, out: bytes, err: bytes, message: str = "MSG") -> tuple[str, str, str]:
    log = tmp_path / "node0.log"
    proc, out_w, err_w = tee.start(log, message)
    os.write(out_w, out[:5])
    proc.send_signal(signal.SIGTERM)  # a job being stopped: the copy outlives torchrun's last words
    os.write(out_w, out[5:])
    os.write(err_w, err)
    os.close(out_w)
    os.close(err_w)
    assert proc.wait(timeout=60) == 0
    captured = capfd.readouterr()
    return captured.out, captured.err, log.read_text()


def test_tee_copies_the_console_to_the_node_log(tmp_path, capfd):
    out, err, log = _tee(tmp_path, capfd, b"[rank0]: step 1\n[rank0]: step 2\n", b"[rank1]: warning\n")
    assert out == "[rank0]: step 1\n[rank0]: step 2\n" and err == "[rank1]: warning\n"
    assert sorted(log.splitlines()) == ["[rank0]: step 1", "[rank0]: step 2", "[rank1]: warning"]


def test_tee_ends_a_rendezvous_traceback_with_one_line(tmp_path, capfd):
    traceback = b'Traceback (most recent call last):\n  File "run.py"\ntorch.distributed.elastic.rendezvous.api.'
    traceback += b"RendezvousTimeoutError\n"
    _, err, log = _tee(tmp_path, capfd, b"hello world\n", traceback, "rendezvous error: cluster.rendezvous_endpoint: x")
    assert err.splitlines()[-1] == "rendezvous error: cluster.rendezvous_endpoint: x"
    assert log.splitlines()[-1] == "rendezvous error: cluster.rendezvous_endpoint: x"
    # A worker's own network error (prefixed with its rank) is not the rendezvous failing.
    assert not is_rendezvous_failure("[rank3]: torch.distributed.DistNetworkError: connection reset\n")
    assert is_rendezvous_failure("x\ntorch.distributed.elastic.rendezvous.api.RendezvousConnectionError: The c\n")


# ---------------------------------------------------------------------------------------------------------------
# Multi-process (slow)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(argv: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch", TWO_NODES, *SHORT, *argv]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    # On failure show the workers' own lines (tracebacks), which torchrun's summary would push out of the tail.
    workers = "\n".join(line for line in err.splitlines() if line.startswith("[rank"))
    assert proc.returncode == 0, out[-2000:] + workers[-4000:] + err[-2000:]
    return out, err


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_agents_give_the_losses_of_one(tmp_path):
    """nnodes=2 x nproc_per_node=2 (c10d on 127.0.0.1, two launchers) == nnodes=1 x nproc_per_node=4, ep=2."""
    two = tmp_path / "two"
    endpoint = f"cluster.rendezvous_endpoint=127.0.0.1:{_free_port()}"
    common = [f"train.run_dir={two}", endpoint, "cluster.rendezvous_timeout_s=300"]
    nodes = [_launch(["--node-rank", str(rank), *common]) for rank in (0, 1)]
    out0, out1 = (_finish(p)[0] for p in nodes)

    one = tmp_path / "one"
    _finish(_launch([f"train.run_dir={one}", *ONE_NODE, "cluster.nproc_per_node=4"]))

    assert len(_losses(two)) == 4
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-6)
    # Node 0 printed the resolved config, once; each node's console is in its log; worker lines carry their rank.
    assert (out0 + out1).count("resolved config") == 1 and "cluster:\n  nnodes: 2" in out0
    assert "world 4 = " in out0 + out1 and "(ep 2)" in out0 + out1 and "[rank0]: " in out0 + out1
    for rank, out in ((0, out0), (1, out1)):
        log = (two / "logs" / f"node{rank}.log").read_text()
        assert f"node {rank} of 2 (rank from --node-rank)" in log
        assert out.splitlines()[-1] in log


@pytest.mark.slow
def test_every_failing_rank_is_named_on_the_console(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")  # exists (the config is valid) but holds no documents: every rank fails loading it
    proc = _launch([*ONE_NODE, f"train.run_dir={tmp_path}", f"data.path={empty}", "model.vocab_size=512"])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "[rank0]: error: " in out + err  # the trainer's own one-line message, from rank 0
    # torchrun's summary names every rank of the node, failed or stopped because another one failed.
    for rank in (0, 1):
        assert f"rank      : {rank} (local_rank: {rank})" in err
    assert "[rank0]: error: " in (tmp_path / "logs" / "node0.log").read_text()
