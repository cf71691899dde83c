"""Layout validation against WORLD_SIZE (no processes needed)."""

import pytest

from model.config import ConfigError
from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims
from train.config import micro_batches_per_step
from train.config_load import load_config


def test_dp_defaults_to_world_over_tp_pp():
    dims = ParallelDims.from_config(ParallelConfig(tp=2, ep=2), world_size=8)
    assert (dims.dp, dims.edp, dims.world_size) == (4, 2, 8)


@pytest.mark.parametrize(
    ("cfg", "world", "message"),
    [
        (ParallelConfig(tp=3), 4, "parallel.tp: tp x pp = 3 x 1 = 3 does not divide WORLD_SIZE=4"),
        (ParallelConfig(ep=4), 6, "parallel.ep: ep=4 does not divide dp=6"),
        (ParallelConfig(ep=4), 2, "parallel.ep: ep=4 does not divide dp=2"),
        (ParallelConfig(dp=3), 4, "parallel.dp: pp x dp x tp = 1 x 3 x 1 = 3 != WORLD_SIZE=4"),
        (ParallelConfig(tp=0), 4, "parallel.tp: must be >= 1"),
    ],
)
def test_impossible_layouts_are_one_line_errors(cfg, world, message):
    with pytest.raises(ConfigError) as info:
        ParallelDims.from_config(cfg, world)
    assert str(info.value).startswith(message)


def test_tiny_cpu_runs_as_is_under_tp2_and_ep_1_2_4():
    for overrides, world in (
        ([], 1),
        (["parallel.tp=2"], 2),
        (["parallel.ep=2"], 2),
        (["parallel.ep=4"], 4),
        (["parallel.tp=2", "parallel.ep=2"], 4),
    ):
        cfg = load_config("configs/tiny-cpu.yaml", overrides)
        dims = ParallelDims.from_config(cfg.parallel, world)
        assert micro_batches_per_step(cfg, dims.dp) >= 1


def test_global_batch_must_split_over_dp_and_micro_batches():
    cfg = load_config("configs/tiny-cpu.yaml", ["train.global_batch_size=12"])
    with pytest.raises(ConfigError, match="train.global_batch_size: 12 is not a multiple of micro_batch_size x dp"):
        micro_batches_per_step(cfg, 4)


def test_pipeline_stage_split():
    from model.config import MoEConfig
    from parallel.pipeline import residual_crosses, stage_layer_counts

    assert stage_layer_counts(6, 4, None) == [2, 2, 1, 1]
    assert stage_layer_counts(5, 2, [4, 1]) == [4, 1]
    with pytest.raises(ConfigError, match=r"parallel.pp_layers: \[3, 1\] must list 2 positive counts summing to"):
        stage_layer_counts(5, 2, [3, 1])
    with pytest.raises(ConfigError, match="parallel.pp: 4 stages for model.num_layers=3"):
        stage_layer_counts(3, 4, None)
    moe = MoEConfig(every_n_layers=2)
    assert not residual_crosses(moe, 0) and residual_crosses(moe, 1)
    assert not residual_crosses(MoEConfig(gating_residual=False), 3)


def test_pipeline_and_sequence_parallel_are_exclusive():
    with pytest.raises(ConfigError, match="parallel.sequence_parallel: not supported together with pipeline"):
        ParallelDims.from_config(ParallelConfig(pp=2, tp=2, sequence_parallel=True), 4)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be a positive number of seconds"),
        ("-5", "must be a positive number of seconds"),
        (".inf", "expected a finite number, got inf"),
        (".nan", "expected a finite number, got nan"),
    ],
)
def test_timeout_must_be_a_positive_finite_number_of_seconds(value, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny-cpu.yaml", [f"parallel.timeout_s={value}"])
    assert str(info.value).startswith(f"parallel.timeout_s: {message}")


def test_data_parallel_modes_split_dp_into_replicas_and_shards():
    def dims(**kw):
        return ParallelDims.from_config(ParallelConfig(**kw), 8)

    assert (dims().dp_replicate, dims().dp_shard, dims().edp_shard) == (8, 1, 1)
    fsdp = dims(data_parallel="fsdp", ep=2)
    assert (fsdp.dp_replicate, fsdp.dp_shard, fsdp.edp, fsdp.edp_shard) == (1, 8, 4, 4)
    hsdp = dims(data_parallel="hsdp", dp_shard=4, ep=2)
    assert (hsdp.dp_replicate, hsdp.dp_shard, hsdp.edp_shard) == (2, 4, 2)
    assert not ParallelDims.from_config(ParallelConfig(), 1).sharded  # one process stays plain tensors
    assert ParallelDims.from_config(ParallelConfig(data_parallel="fsdp"), 1).sharded


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.data_parallel=zero3"], 4, "parallel.data_parallel: 'zero3' is not one of replicate, fsdp, hsdp"),
        (["parallel.data_parallel=hsdp"], 4, "parallel.dp_shard: hsdp needs the shard group size"),
        (["parallel.data_parallel=hsdp", "parallel.dp_shard=3"], 4, "parallel.dp_shard: 3 does not divide dp=4"),
        (["parallel.data_parallel=hsdp", "parallel.dp_shard=0"], 4, "parallel.dp_shard: must be >= 1"),
        (
            ["parallel.data_parallel=hsdp", "parallel.dp_shard=2", "parallel.ep=4"],
            4,
            "parallel.ep: ep=4 does not divide parallel.dp_shard=2 (hsdp keeps each expert-parallel group inside",
        ),
        (["parallel.data_parallel=fsdp", "parallel.dp_shard=2"], 4, "parallel.dp_shard: only used with"),
        (["parallel.mixed_precision=fp16"], 4, "parallel.mixed_precision: 'fp16' is not one of auto, bf16, fp32"),
        (["parallel.reshard_after_forward=maybe"], 4, "parallel.reshard_after_forward: expected true or false"),
    ],
)
def test_bad_data_parallel_settings_are_one_line_errors(overrides, world, message):
    with pytest.raises(ConfigError) as info:
        cfg = load_config("configs/tiny-cpu.yaml", overrides)
        ParallelDims.from_config(cfg.parallel, world)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_bf16_parameters_need_bf16_autocast():
    from parallel.data_parallel import check_mixed_precision

    check_mixed_precision("auto", "cpu", autocast_bf16=False)  # fp32 on CPU
    check_mixed_precision("bf16", "cpu", autocast_bf16=True)
    for setting, device in (("bf16", "cpu"), ("auto", "cuda")):
        with pytest.raises(ConfigError, match=r"^parallel.mixed_precision: .* set train.dtype=bf16 or parallel"):
            check_mixed_precision(setting, device, autocast_bf16=False)
