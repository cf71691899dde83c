"""Typed run configuration: the sections a YAML config holds, as dataclasses, validated once before anything runs
(train/config_load.py reads the YAML and overrides into them).

Every error is a `ConfigError` whose message is one line naming the dotted key, the reason and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data.config import DataConfig
from launch.config import ClusterConfig
from model.config import ConfigError, ModelConfig, MoEConfig, require
from parallel.config import ParallelConfig
from train.memory_fit import check_memory


@dataclass
class OptimConfig:
    """`optim:` AdamW and the learning-rate schedule."""

    lr: float = 3e-3  # peak learning rate (AdamW), reached after the warmup
    min_lr: float = 3e-4  # learning rate at train.max_steps
    warmup_steps: int = 20  # linear warmup from warmup_init_lr to lr
    warmup_init_lr: float = 0.0  # learning rate of the first warmup step
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # from lr to min_lr after the warmup
    weight_decay: float = 0.1  # decoupled (AdamW), on weight matrices only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    clip_grad: float = 1.0  # global gradient-norm clipping threshold; 0 disables clipping

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(0 <= self.warmup_init_lr <= self.lr, "optim.warmup_init_lr", "must be in [0, optim.lr]")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        require(self.eps > 0, "optim.eps", "must be positive")
        require(self.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    """`train:` steps, batch sizes, device and precision, evaluation, resuming."""

    max_steps: int = 300  # optimizer steps; the learning-rate schedule ends here
    global_batch_size: int = 16  # sequences per optimizer step, across all data-parallel ranks and micro-batches
    micro_batch_size: int = 16  # sequences per forward/backward on one rank
    seed: int = 1234  # seeds the initial weights and the data order
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    run_dir: str | None = None  # null: runs/<config file name>
    eval_interval: int = 100  # 0 disables evaluation
    eval_batches: int = 4  # validation batches per evaluation
    # auto: continue from <checkpoint dir>/latest when there is one; never: start fresh; or a step directory.
    resume: str = "auto"
    # Save at this step and exit, leaving the LR schedule defined by max_steps (Megatron's exit interval).
    exit_at_step: int | None = None
    # Steps whose loss or gradient norm is NaN/inf are skipped; this many in a row stop the run.
    max_nonfinite_steps: int = 5
    # torch.compile each transformer block (inductor, static shapes); the MoE dispatch-to-combine section stays
    # eager (parallel/compile.py says where the graphs break). The first steps pay the compile time.
    compile: bool = False
    # Recompute activations in the backward pass instead of keeping them: full (every decoder block keeps only its
    # inputs), moe (the FFN experts), attention, or none (parallel/activation_checkpoint.py).
    activation_checkpointing: Literal["none", "full", "moe", "attention"] = "none"

    @property
    def last_step(self) -> int:
        """The step this run stops at: exit_at_step when set (it never exceeds max_steps), else max_steps."""
        return min(self.max_steps, self.exit_at_step or self.max_steps)

    def validate(self) -> None:
        require(self.max_steps > 0, "train.max_steps", f"must be positive, got {self.max_steps}")
        if self.exit_at_step is not None:
            require(
                0 < self.exit_at_step <= self.max_steps,
                "train.exit_at_step",
                f"must be in [1, train.max_steps={self.max_steps}] or null, got {self.exit_at_step}",
            )
        require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
        require(
            not (self.compile and self.activation_checkpointing == "full"),
            "train.activation_checkpointing",
            "full does not compose with train.compile (a checkpointed block would run uncompiled); use moe or "
            "attention, or set train.compile=false",
        )
        if self.resume not in ("auto", "never"):
            require(
                Path(self.resume).is_dir(),
                "train.resume",
                f"{self.resume} is not a checkpoint directory; use auto, never or an existing step directory",
            )
        require(self.global_batch_size > 0, "train.global_batch_size", "must be positive")
        require(self.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        require(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.global_batch_size",
            f"{self.global_batch_size} is not a multiple of train.micro_batch_size={self.micro_batch_size}",
        )
        require(self.eval_interval >= 0, "train.eval_interval", "must be >= 0")
        require(self.eval_batches > 0, "train.eval_batches", "must be positive")


@dataclass
class CheckpointConfig:
    """`checkpoint:` where, how often and how checkpoints are written (torch.distributed.checkpoint)."""

    dir: str | None = None  # null: <run_dir>/checkpoints
    interval: int = 0  # steps between checkpoints; 0: only the final one
    keep_last: int = 2  # completed checkpoints kept; older ones are deleted after a save
    # YAML key `async`: stage tensors and write them in the background (dcp.async_save).
    async_: bool = False
    # Record the size and CRC-32 of every shard in meta.json at save and compare them on load. Costs an extra read
    # of the checkpoint per save and per load (docs/benchmarks.md, "Checkpoint I/O").
    verify: bool = True

    def validate(self) -> None:
        require(self.interval >= 0, "checkpoint.interval", "must be >= 0")
        require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass
class WandbConfig:
    """Weights & Biases mirror of metrics.jsonl. wandb is optional: without it (or with mode disabled) the run
    logs to metrics.jsonl only; offline (the default) writes under <run_dir>/wandb and never needs a network."""

    project: str = "moepp"  # wandb project name
    mode: Literal["offline", "online", "disabled"] = "offline"  # wandb mode; disabled: metrics.jsonl only
    # null: the config's name.
    run_name: str | None = None

    def validate(self) -> None:
        require(bool(self.project), "logging.wandb.project", "must be a non-empty string")


@dataclass
class LoggingConfig:
    """`logging:` the console line, metrics.jsonl and the optional wandb mirror."""

    interval: int = 10  # steps between console lines / metrics.jsonl records
    progress_bar: bool = True  # a live progress bar on a terminal (rich); plain lines otherwise
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Dense bf16 peak TFLOP/s of one device, for MFU; null = the known CUDA devices' (train/flops.py), none on CPU.
    peak_tflops: float | None = None

    def validate(self) -> None:
        require(self.interval >= 1, "logging.interval", "must be >= 1")
        require(
            self.peak_tflops is None or self.peak_tflops > 0,
            "logging.peak_tflops",
            f"must be positive TFLOP/s per device (or null for the known devices' peak), got {self.peak_tflops}",
        )
        self.wandb.validate()


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # read by `python -m launch` only
    # The preset's name (config file stem); names the default run directory.
    name: str = "run"

    def validate(self) -> Config:
        for section in (
            self.model,
            self.moe,
            self.parallel,
            self.data,
            self.optim,
            self.train,
            self.checkpoint,
            self.logging,
        ):
            section.validate()
        self.cluster.validate()
        require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"{self.data.seq_len} > model.max_seq_len={self.model.max_seq_len}; raise max_seq_len or shorten seq_len",
        )
        if self.moe.enabled:
            require(
                self.moe.num_experts % self.parallel.ep == 0,
                "parallel.ep",
                f"moe.num_experts={self.moe.num_experts} is not divisible by ep={self.parallel.ep}",
            )
        else:
            require(self.parallel.ep == 1, "parallel.ep", "must be 1 when moe.num_experts is 0 (no experts to shard)")
        tp = self.parallel.tp
        if self.parallel.sequence_parallel and tp > 1:
            require(
                self.data.seq_len % tp == 0,
                "data.seq_len",
                f"{self.data.seq_len} is not divisible by parallel.tp={tp} (sequence parallelism splits it)",
            )
            require(
                self.moe.capacity_factor is None,
                "moe.capacity_factor",
                "capacity dropping is not supported with parallel.sequence_parallel; set it to null",
            )
        for key, value in (
            ("model.num_heads", self.model.num_heads),
            ("model.num_kv_heads", self.model.kv_heads),
            ("model.vocab_size", self.model.vocab_size),
            ("model.ffn_hidden_size", self.model.ffn_hidden_size),
            ("moe.shared_experts", self.moe.shared_ffn_hidden_size(self.model.ffn_hidden_size)),
        ):
            require(value % tp == 0, key, f"{value} is not divisible by parallel.tp={tp}")
        require(
            self.train.activation_checkpointing != "moe" or self.moe.enabled,
            "train.activation_checkpointing",
            "moe checkpoints the FFN experts, but moe.num_experts is 0; use full or attention",
        )
        self.data.validate_vocab(self.model.vocab_size)
        check_memory(self.model, self.data)
        self.data.validate_documents(self.model.vocab_size)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.name}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def micro_batches_per_step(cfg: Config, dp: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step; a global batch that dp ranks cannot split
    into whole micro-batches is a ConfigError. The trainer and the launcher (before any process starts) both ask."""
    tc = cfg.train
    per_rank, rest = divmod(tc.global_batch_size, dp)
    if rest or per_rank % tc.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size: {tc.global_batch_size} is not a multiple of micro_batch_size x dp = "
            f"{tc.micro_batch_size} x {dp}; pick a global batch divisible by {tc.micro_batch_size * dp}"
        )
    return per_rank // tc.micro_batch_size
