"""Typed run configuration: YAML + `dotted.key=value` overrides -> dataclasses, validated once before anything runs.

Every error is a `ConfigError` whose message is one line naming the dotted key, the reason and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.indexed import bin_path, idx_path, normalize_prefix
from data.packing import DocumentPacking
from data.text import EOD_ID as BYTE_EOD_ID
from data.text import VOCAB_SIZE as BYTE_VOCAB_SIZE
from data.text import is_text_path
from launch.config import ClusterConfig
from model.config import ConfigError, ModelConfig, MoEConfig, require
from model.errors import UserError
from parallel.config import ParallelConfig


@dataclass
class SyntheticConfig:
    """The embedded default corpus (data/synthetic.py): words = a random head token + a fixed, fully determined
    tail, so hard and easy tokens are mixed and the loss floor is known exactly."""

    # 64 words with tails of up to 6 tokens use at most 449 token ids: within the default model.vocab_size.
    num_words: int = 64  # distinct words in the corpus
    max_tail: int = 6  # longest fully determined tail of a word, in tokens
    zipf_exponent: float = 1.0  # word frequencies follow rank^-zipf_exponent
    num_tokens: int = 1_000_000  # length of the generated token stream


@dataclass
class DatasetConfig:
    """One entry of `data.datasets`: an indexed dataset prefix (PREFIX.bin + PREFIX.idx, from
    tools/preprocess_data.py) or a .txt/.jsonl file for the byte-level fallback, and its blending weight."""

    path: str = ""
    weight: float = 1.0


SYNTHETIC_MAX_PARAMS = 50_000_000  # a toy model: the largest the synthetic corpus trains without data.allow_synthetic


@dataclass
class DataConfig:
    """`data:` the training corpus, its tokenizer and how documents are packed into windows."""

    # null (and no datasets): the embedded synthetic corpus. Otherwise one dataset: an indexed dataset prefix
    # (PREFIX.bin + PREFIX.idx) or a .txt/.jsonl file tokenised byte-level (ids 0..255, end-of-document 256).
    path: str | None = None
    # Several datasets blended by weight (relative; normalised): [{path: ..., weight: ...}, ...]. Excludes `path`.
    datasets: list[DatasetConfig] = field(default_factory=list)
    # The tokenizer the indexed datasets were built with (a sentencepiece .model, a tokenizer.json or its folder, or
    # a .tiktoken file; data/tokenizer.py); when set, its vocabulary is checked against model.vocab_size before
    # training starts, and the Hugging Face export ships it.
    tokenizer: str | None = None
    jsonl_key: str = "text"  # the field of each .jsonl record that holds its text
    seq_len: int = 128  # tokens per training window
    # Share of documents (the last ones of each dataset) held out for validation.
    valid_fraction: float = 0.01
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Windows are packed across documents; these three treat the documents inside a window apart (data/packing.py).
    # Attention block-causal within each document: no token attends into the previous, unrelated document.
    document_mask: bool = False
    # RoPE positions restart at 0 on the token after each end-of-document token.
    reset_position_ids: bool = False
    # No loss on the prediction made at an end-of-document token (its target is the next document's first token);
    # the step's loss is the mean over the remaining positions of the whole global batch.
    eod_mask_loss: bool = False
    # The end-of-document token id. null: 256 for byte-level .txt/.jsonl data, data.tokenizer's for indexed datasets.
    # Set it for an indexed dataset built without a tokenizer the config names, or with another EOD than its own.
    eod_id: int | None = None
    # The synthetic corpus is for smoke runs: a model larger than a toy (SYNTHETIC_MAX_PARAMS) is refused on it
    # unless this is true.
    allow_synthetic: bool = False

    def validate(self) -> None:
        require(self.seq_len > 0, "data.seq_len", f"must be positive, got {self.seq_len}")
        require(0 <= self.valid_fraction < 1, "data.valid_fraction", "must be in [0, 1)")
        s = self.synthetic
        require(s.num_words >= 2, "data.synthetic.num_words", "must be >= 2")
        require(s.max_tail >= 0, "data.synthetic.max_tail", "must be >= 0")
        require(s.zipf_exponent >= 0, "data.synthetic.zipf_exponent", "must be >= 0")
        require(s.num_tokens > 0, "data.synthetic.num_tokens", "must be positive")
        require(
            self.path is None or not self.datasets,
            "data.datasets",
            "set either data.path (one dataset) or data.datasets (a blend), not both",
        )
        if self.path is not None:
            _check_data_path(self.path, "data.path")
        for i, d in enumerate(self.datasets):
            key = f"data.datasets[{i}]"
            require(bool(d.path), f"{key}.path", "missing; give an indexed dataset prefix or a .txt/.jsonl file")
            require(d.weight > 0, f"{key}.weight", f"must be positive, got {d.weight}")
            _check_data_path(d.path, f"{key}.path")
        kinds = {is_text_path(p) for p in self.paths}
        require(
            len(kinds) <= 1,
            "data.datasets",
            "mixes byte-level .txt/.jsonl files with indexed datasets (different token ids); build indexed datasets "
            "of the text files with tools/preprocess_data.py",
        )
        if self.eod_id is not None:
            require(self.eod_id >= 0, "data.eod_id", f"must be >= 0, got {self.eod_id}")
        if self.tokenizer is not None:
            require(
                Path(self.tokenizer).exists(),
                "data.tokenizer",
                f"{self.tokenizer} does not exist; give a tokenizer from tools/train_tokenizer.py, a tokenizer.json or "
                "its folder, a .tiktoken file, or null",
            )

    @property
    def paths(self) -> list[str]:
        return [self.path] if self.path is not None else [d.path for d in self.datasets]

    def eod_token_id(self) -> int | None:
        """The end-of-document id of the configured data: data.eod_id, else 256 for byte-level files, else
        data.tokenizer's; None for the synthetic corpus (no documents) or an indexed dataset without either."""
        if not self.paths:
            return None
        if self.eod_id is not None:
            return self.eod_id
        if is_text_path(self.paths[0]):
            return BYTE_EOD_ID
        if self.tokenizer is not None:
            from data.tokenizer import load_tokenizer  # the tokenizer library only when one is configured

            try:
                return load_tokenizer(self.tokenizer).eod_id
            except UserError as e:
                raise ConfigError(f"data.tokenizer: {e}") from e
        return None

    def packing(self) -> DocumentPacking | None:
        """What training does with the documents of a window; None when it treats the window as one sequence."""
        if not (self.document_mask or self.reset_position_ids or self.eod_mask_loss):
            return None
        eod = self.eod_token_id()
        assert eod is not None, "validate_documents() rejects document options without an EOD id"
        return DocumentPacking(eod, self.document_mask, self.reset_position_ids, self.eod_mask_loss)

    def validate_documents(self, vocab_size: int) -> None:
        """Cross-section check: the document options need the EOD id, which must be a token of the vocabulary."""
        if self.eod_id is not None:
            require(self.eod_id < vocab_size, "data.eod_id", f"{self.eod_id} >= model.vocab_size={vocab_size}")
            if self.paths and is_text_path(self.paths[0]):
                require(
                    self.eod_id == BYTE_EOD_ID,
                    "data.eod_id",
                    f"byte-level .txt/.jsonl data ends documents with {BYTE_EOD_ID}, not {self.eod_id}; drop "
                    "data.eod_id or set it to 256",
                )
        on = [k for k in ("document_mask", "reset_position_ids", "eod_mask_loss") if getattr(self, k)]
        if not on:
            return
        key = f"data.{on[0]}"
        require(
            bool(self.paths),
            key,
            "the synthetic corpus is one stream without documents; set data.path or data.datasets to data with "
            "end-of-document tokens, or turn it off",
        )
        require(
            self.eod_token_id() is not None,
            key,
            "needs the end-of-document token id, which an indexed dataset does not record; set data.tokenizer (the "
            "tokenizer it was built with) or data.eod_id",
        )

    def check_corpus_fits_model(self, num_params: int) -> None:
        """Refuse to pretrain a model larger than a toy on the synthetic corpus, unless allow_synthetic."""
        require(
            bool(self.paths) or self.allow_synthetic or num_params <= SYNTHETIC_MAX_PARAMS,
            "data.path",
            f"null trains on the embedded synthetic corpus, meant for smoke runs of models up to "
            f"{SYNTHETIC_MAX_PARAMS / 1e6:.0f}M parameters, and this one has {num_params / 1e6:,.0f}M parameters; "
            "set data.path to a dataset from tools/preprocess_data.py, or data.allow_synthetic=true to use it anyway",
        )

    def validate_vocab(self, vocab_size: int) -> None:
        """Cross-section check: the token ids the data can contain must fit model.vocab_size."""
        if not self.paths:
            need = self.synthetic.num_words * (1 + self.synthetic.max_tail) + 1
            require(
                need <= vocab_size,
                "data.synthetic.num_words",
                f"the synthetic corpus may use up to {need} token ids > model.vocab_size={vocab_size}; "
                "use fewer words or a shorter max_tail",
            )
        elif is_text_path(self.paths[0]):
            require(
                vocab_size >= BYTE_VOCAB_SIZE,
                "model.vocab_size",
                f"{vocab_size} < {BYTE_VOCAB_SIZE} needed by the byte-level tokenizer of data.path",
            )
        if self.tokenizer is not None:
            from data.tokenizer import tokenizer_vocab_size  # its library only when a tokenizer is configured

            try:
                n = tokenizer_vocab_size(self.tokenizer)
            except UserError as e:
                raise ConfigError(f"data.tokenizer: {e}") from None
            require(
                n <= vocab_size,
                "data.tokenizer",
                f"vocabulary of {n} tokens > model.vocab_size={vocab_size}; set model.vocab_size >= {n} or use a "
                "smaller tokenizer",
            )


def _check_data_path(path: str, key: str) -> None:
    if is_text_path(path):
        require(
            Path(path).is_file(),
            key,
            f"file {path} does not exist; give an existing .txt/.jsonl file, an indexed dataset prefix, or null "
            "for the synthetic corpus",
        )
        return
    prefix = normalize_prefix(path)
    for p in (idx_path(prefix), bin_path(prefix)):
        require(
            p.is_file(),
            key,
            f"{p} does not exist; build the dataset with tools/preprocess_data.py --output-prefix {prefix}, or "
            "give a .txt/.jsonl file",
        )


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
        check_memory(self)
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


def _yaml_keys(value: Any) -> Any:
    """Python keywords are fields with a trailing underscore (`async_`); YAML spells them without it."""
    if isinstance(value, dict):
        return {(k[:-1] if k.endswith("_") else k): _yaml_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_keys(v) for v in value]
    return value


def config_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(_yaml_keys(cfg.to_dict()), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# Sizes that cannot fit: refused before anything is allocated

# Peak bytes per position x head dimension while the RoPE tables are built (float64 angles, their concatenation and
# the two fp32 tables), and per token of the synthetic corpus (one small array per word before the concatenation,
# then the int64 stream); both measured.
ROPE_BYTES_PER_ENTRY = 24
SYNTHETIC_BYTES_PER_TOKEN = 64


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


def available_memory_bytes() -> int | None:
    """Memory this machine can still give (Linux MemAvailable), else its physical memory; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: Config) -> None:
    """Each tensor a size key makes every process allocate in full (the model is built whole on the host before it
    is sharded or moved) must fit in the memory available, so an absurd size fails here, in one line, instead of
    deep inside an allocation or after minutes of filling swap."""
    available = available_memory_bytes()
    if available is None:
        return
    m = cfg.model
    needs = [
        ("model.vocab_size", m.vocab_size, 2 * m.vocab_size * m.hidden_size * 4, "the fp32 embedding and output head"),
        ("model.max_seq_len", m.max_seq_len, m.max_seq_len * m.head_dim * ROPE_BYTES_PER_ENTRY, "the RoPE tables"),
    ]
    if not cfg.data.paths:
        n = cfg.data.synthetic.num_tokens
        needs.append(("data.synthetic.num_tokens", n, n * SYNTHETIC_BYTES_PER_TOKEN, "the synthetic corpus"))
    for key, value, need, what in needs:
        require(
            need <= available,
            key,
            f"{value} needs {need / 2**30:,.1f} GiB for {what}, more than the {available / 2**30:,.1f} GiB of "
            "memory available; lower it",
        )


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; returns the (possibly converted) value or raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, f"{key}.{k}"): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        number = value
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; accept what Python reads as a number.
            with contextlib.suppress(ValueError):
                number = float(value)
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # a bug in the dataclass, not in the YAML


def _closest_hint(key: str, names: list[str], prefix: str) -> str:
    known = [n[:-1] if n.endswith("_") else n for n in names]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix}{close[0]}? (python -m train --help lists every key)"
    return f"known keys here: {', '.join(known)}"


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types with the dotted key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names and f"{key}_" in names:  # Python keywords (`async`) are fields with a trailing _
            key = f"{key}_"
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; {_closest_hint(key, names, prefix)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like dotted.key=value (e.g. train.max_steps=50)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{text}: an override must look like dotted.key=value (e.g. train.max_steps=50)")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section; cannot set {text}")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """YAML file (or None for all defaults) + overrides -> validated Config."""
    data: dict[str, Any] = {}
    name = "run"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"{path}: config file not found; pass an existing YAML file such as configs/tiny-cpu.yaml"
            )
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r}); save the config "
                "as UTF-8 YAML"
            ) from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, moe:, train:, ...)")
        data = loaded or {}
        name = path.stem
    data = apply_overrides(data, overrides or [])
    data.setdefault("name", name)
    return build(Config, data).validate()
