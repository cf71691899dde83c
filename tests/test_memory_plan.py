"""The memory plan: sizes equal the real tensors, the activation formula equals the bytes autograd saves, `--plan`
plans any layout without allocating, and a plan that does not fit (or a large model on the synthetic corpus) stops
the run in one line before anything is built."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from model.config import ConfigError, ModelConfig, MoEConfig
from model.transformer import Decoder
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.config import ParallelConfig
from parallel.memory import ActivationEstimate, plan_memory
from parallel.mesh import ParallelDims
from parallel.saved_tensors import SavedActivationBytes
from train.config import OptimConfig
from train.config_load import load_config
from train.memory import check_fits
from train.optim import build_optimizer
from train.step import lm_loss

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=16
)


def moe_config(vanilla: bool) -> MoEConfig:
    moe = MoEConfig(num_experts=8, top_k=2, expert_ffn_hidden_size=24, every_n_layers=2, shared_experts=1)
    if vanilla:  # every assignment goes to an FFN expert, as the estimate assumes
        moe.num_zero_experts = moe.num_copy_experts = moe.num_constant_experts = 0
        moe.gating_residual = False
    return moe


def single_process() -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(), 1)


def test_state_sizes_equal_the_tensors_of_a_trained_model():
    moe = moe_config(vanilla=False)
    model = Decoder(MODEL, moe)
    opt = build_optimizer(model, OptimConfig())
    tokens = torch.randint(0, 64, (2, 13))
    model(tokens[:, :-1]).logits_BSV.sum().backward()
    grads = sum(4 * p.grad.numel() for p in model.parameters())
    opt.step()
    (plan,) = plan_memory(MODEL, moe, single_process(), 2, 12, 1).stages
    assert plan.params == sum(4 * p.numel() for p in model.parameters())
    assert plan.grads == grads
    assert plan.optimizer == sum(4 * t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")


@pytest.mark.parametrize("vanilla", [True, False])
@pytest.mark.parametrize("mode", ["none", "full", "moe", "attention"])
def test_activation_formula_equals_the_saved_bytes(mode, vanilla):
    """Exact up to the few E-sized vectors of the balance loss for a vanilla MoE (every assignment an FFN one);
    for MoE++ at most 25% above (tokens that pick zero-computation experts save less than the estimate's FFN rows)."""
    moe = moe_config(vanilla)
    model = Decoder(MODEL, moe)
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, 64, (2, 13))
    with SavedActivationBytes(model) as saved:
        out = model(tokens[:, :-1])
        loss = lm_loss(out, tokens[:, 1:]) + out.aux_loss
    estimate = ActivationEstimate(MODEL, moe, single_process(), tokens=24, a=4, grouped_experts=False)
    kept, rebuilt = estimate.stage([0, 1, 2], first=True, last=True, checkpointing=mode)
    logits = 4 * 24 * 64  # held by the output for the loss's backward, not a saved tensor
    ratio = (kept - logits) / saved.total
    if vanilla:
        assert 0.98 < ratio < 1.02, ratio
    else:
        assert 0.98 < ratio < 1.25, ratio
    assert (rebuilt == 0) == (mode == "none")
    loss.backward()


def test_pipeline_stages_split_the_state_and_hold_micro_batches_in_flight():
    moe = moe_config(vanilla=False)
    whole = plan_memory(MODEL, moe, single_process(), 2, 12, 4).stages[0]
    stages = plan_memory(MODEL, moe, ParallelDims.from_config(ParallelConfig(pp=3), 3), 2, 12, 4).stages
    assert sum(s.params for s in stages) == whole.params
    assert [s.in_flight for s in stages] == [3, 2, 1]  # 1F1B warm-up depth
    assert [s.layers for s in stages] == [[0], [1], [2]]


def test_fsdp_shards_dense_state_over_dp_and_experts_over_edp():
    moe = moe_config(vanilla=False)
    whole = plan_memory(MODEL, moe, single_process(), 2, 12, 1).stages[0].params
    fsdp = ParallelDims.from_config(ParallelConfig(dp=4, data_parallel="fsdp"), 4)
    assert plan_memory(MODEL, moe, fsdp, 2, 12, 1).stages[0].params <= 1.05 * whole / 4
    hsdp = ParallelDims.from_config(ParallelConfig(dp=4, ep=2, data_parallel="hsdp", dp_shard=2), 4)
    assert hsdp.edp_shard == 1 and hsdp.dp_shard == 2
    with pytest.raises(ConfigError, match=r"^parallel\.ep: ep=4 does not divide parallel\.dp_shard=2"):
        ParallelDims.from_config(ParallelConfig(dp=8, ep=4, data_parallel="hsdp", dp_shard=2), 8)


def test_fsdp_buffers_follow_what_data_parallelism_keeps_gathered():
    """replicate over dp > 1 keeps FSDP's compute copy of every parameter from the forward into the backward pass;
    fsdp frees a unit after its forward (two units gathered at a time, plus the final norm and head it keeps), unless
    reshard_after_forward is off; bf16 mixed precision gathers 2-byte copies; one process holds none."""
    moe = moe_config(vanilla=False)

    def stage(cuda: bool = False, **keys):
        dims = ParallelDims.from_config(ParallelConfig(**keys), 4)
        return plan_memory(MODEL, moe, dims, 2, 12, 1, cuda=cuda).stages[0]

    assert plan_memory(MODEL, moe, single_process(), 2, 12, 1).stages[0].buffers == 0
    replicate, fsdp = stage(dp=4), stage(dp=4, data_parallel="fsdp")
    assert replicate.buffers > replicate.params  # the whole compute copy plus a unit's gradient buffers
    zero2 = stage(dp=4, data_parallel="fsdp", reshard_after_forward=False)
    # Without freeing after the forward pass every unit stays gathered, as under replicate; fsdp holds two + the head.
    assert fsdp.buffers < zero2.buffers == replicate.buffers
    bf16 = stage(cuda=True, dp=4, data_parallel="fsdp", reshard_after_forward=False, mixed_precision="bf16")
    fp32 = stage(cuda=True, dp=4, data_parallel="fsdp", reshard_after_forward=False, mixed_precision="fp32")
    gathered = 4 * replicate.param_elements  # every unit gathered whole, in fp32
    assert bf16.buffers == fp32.buffers - gathered // 2


def test_a_plan_that_does_not_fit_names_the_keys_to_change():
    plan = plan_memory(MODEL, moe_config(False), single_process(), 2, 12, 1)
    check_fits(plan, plan.peak.total, "exactly enough")
    with pytest.raises(ConfigError) as info:
        check_fits(plan, plan.peak.total - 1, "one byte short")
    message = str(info.value)
    assert "\n" not in message and message.startswith("parallel: the memory plan needs")
    for key in (
        "parallel.tp",
        "parallel.data_parallel=fsdp",
        "train.micro_batch_size",
        "train.activation_checkpointing",
    ):
        assert key in message


class NonMetaBytes(TorchDispatchMode):
    """Bytes of every tensor an operator creates off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.bytes += t.untyped_storage().nbytes()
        return out


def test_plan_flag_plans_64_ranks_of_the_7b_preset_on_meta_tensors(capsys):
    from train.__main__ import main

    with NonMetaBytes() as created:
        rc = main(["configs/moepp-7b.yaml", "--plan", "parallel.dp=64", "parallel.ep=8", "--device-gib", "80"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "world 64 = pp 1 x tp 1 x dp 64 (replicate, ep 8)" in out and "peak:" in out
    assert created.bytes < 1024**2  # the 7.68B parameters (31 GB in fp32) were never allocated
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plan", "parallel.data_parallel=hsdp"], "config error: parallel.dp_shard: hsdp needs the shard group size"),
        (["--plan", "parallel.data_parallel=sharded"], "config error: parallel.data_parallel: 'sharded' is not one of"),
        (["--plan", "--device-gib", "lots"], "usage error: --device-gib: expected a positive number"),
        (["--device-gib", "80"], "usage error: --device-gib: only used with --plan"),
        (["--plann"], "usage error: --plann: unknown option"),
    ],
)
def test_bad_plan_arguments_are_one_line(args, message, capsys):
    from train.__main__ import main

    assert main(["configs/tiny-cpu.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_large_model_on_the_synthetic_corpus_is_refused_before_anything_is_built(tmp_path):
    from train.trainer import run

    cfg = load_config(ROOT / "configs/moepp-0.6b.yaml", [f"train.run_dir={tmp_path}"])
    with NonMetaBytes() as created, pytest.raises(ConfigError) as info:
        run(cfg)
    assert str(info.value).startswith("data.path: null trains on the embedded synthetic corpus")
    assert "data.allow_synthetic=true" in str(info.value) and "582M parameters" in str(info.value)
    assert created.bytes < 1024**2 and not dist.is_initialized()


@pytest.mark.slow
def test_a_run_whose_plan_exceeds_this_machine_stops_in_one_line(tmp_path):
    """The 7B preset on one CPU process needs ~150 GiB: refused at start-up, before any parameter exists."""
    args = ["configs/moepp-7b.yaml", "data.allow_synthetic=true", "train.device=cpu", f"train.run_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("config error: parallel: the memory plan needs") and proc.stderr.count("\n") == 1
    assert "memory plan per rank" in proc.stdout  # the plan was printed first
    assert not (tmp_path / "checkpoints").exists()


def test_plan_is_printed_at_start_up(tmp_path, capsys):
    from train.trainer import run

    overrides = ["train.max_steps=1", "model.num_layers=1", "train.eval_interval=0", "logging.progress_bar=false"]
    cfg = load_config(
        ROOT / "configs/tiny-cpu.yaml", [*overrides, "logging.wandb.mode=disabled", f"train.run_dir={tmp_path}"]
    )
    run(cfg)
    out = capsys.readouterr().out
    assert "memory plan per rank: world 1" in out
    assert out.index("memory plan per rank") < out.index("step")
