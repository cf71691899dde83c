"""Memory plan: what one rank will hold for a layout, computed before anything is allocated.

The model is built on the meta device (shapes, no storage) and each parameter's local shape follows the rules the
layout applies: pipeline stage (its blocks; the embedding on the first stage, final norm and head on the last),
tensor parallelism (column-parallel q/k/v, dense and shared-expert gate/up, vocabulary-parallel embedding and head:
dim 0 / tp; row-parallel wo and dense/shared down: dim 1 / tp; norms, router, constant and FFN experts replicated
over tp), expert parallelism (FFN experts: dim 0 / ep) and data parallelism as parallel/data_parallel.py applies it
(`parallel.data_parallel`, `parallel.dp_shard`: ParallelDims.dp_shard and edp_shard): `fsdp` dim 0 / dp, rounded up
as FSDP2 pads it, FFN experts of an expert-parallel layer / edp on top of ep, on dim 0 when the local experts split
evenly, else on dim 1; `hsdp` / dp_shard, those experts / (dp_shard / ep); `replicate` nothing. No process group is
needed, so any layout can be planned from one machine.

Per rank, in bytes (P = local parameter elements):
- parameters 4 P (fp32 master weights), gradients 4 P, optimizer 8 P (AdamW exp_avg and exp_avg_sq, fp32);
- buffers, whenever FSDP manages the parameters (dp > 1, or fsdp/hsdp on one rank): the gathered parameters in the
  compute dtype (`parallel.mixed_precision`) of the units FSDP holds at once (the largest two of those freed after
  the forward pass, and all of those kept until the backward pass: every unit under replicate or
  `reshard_after_forward: false`, else the final norm and head), plus the largest unit's fp32 gradient and
  reduce-scatter buffer (data_parallel_buffers); under sequence parallelism also GradSync's flat all-reduce bucket;
- activations: the bytes autograd keeps for backward per micro-batch (below), times the micro-batches a pipeline
  stage holds at once (1F1B: min(pp - stage, micro-batches)), plus what one checkpointed region rebuilds in the
  backward pass.

Activation formula, per micro-batch of T = b x s tokens (T_r = T / tp on the residual stream under sequence
parallelism, else T), a = bytes of a matmul output (2 under bf16 autocast, else 4), c = the bf16 copy a linear keeps
of its fp32 input (a if a < 4, else 0), A = T_r K FFN assignments (every assignment to an FFN expert, balanced over
ep ranks: an upper bound for MoE++, whose tokens also pick zero-computation experts):
- every norm: T_r (12 D + 4) (input, normalised input, output: fp32; the rms factor);
- attention: T c D + T a (2 H + 2 G) Dh / tp + 4 T H / tp (q and output, k and v, the log-sum-exp);
- dense FFN: T c D + 4 a T F / tp (gate, up, silu(gate), their product);
- MoE layer: T_r (4 E + 23 K + 12 n_const + 4) for routing (+ 4 T_r E for the previous layer's logits when it has a
  gating residual), A (12 D + 8 F_e + 20) for the FFN experts in fp32 (gathered rows, [A, 2 F_e] pre-activation,
  outputs and gated outputs, indices; on CUDA under bf16 A (2 D + 4 a F_e + 8 D + 20)), shared experts as a dense
  FFN of width F_s, and 4 T_r D more under bf16 (the fp32 copy the zero-computation experts read);
- first stage 8 T (token ids); last stage the final norm, T c D and (4 + a) T V / tp (fp32 log-softmax and the
  logits).

Activation checkpointing keeps, instead: `full` 4 T_r D per block (its input) and 4 T_r E per MoE layer whose
logits feed a later block, plus one whole block rebuilt during backward; `moe` drops the [A, 2 F_e] pre-activation
(one layer's rebuilt); `attention` drops the attention terms above (one attention's rebuilt). The formula matches
the bytes tests/test_memory_plan.py counts with saved_tensors_hooks for a vanilla MoE in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from model.config import ConfigError, ModelConfig, MoEConfig
from model.experts import DenseFFN, FFNExperts
from model.transformer import Attention, Decoder
from parallel.data_parallel import param_dtype
from parallel.mesh import ParallelDims
from parallel.pipeline import stage_layer_counts

GIB = 1024**3
BUCKET_BYTES = 4 * 64 * 1024 * 1024  # parallel/grads.py: one flat all-reduce per 64Mi fp32 elements


def describe_layout(dims: ParallelDims) -> str:
    """The layout in one phrase, e.g. `world 8 = pp 1 x tp 2 x dp 4 (hsdp in groups of 2, ep 2)`."""
    mode = dims.data_parallel + (f" in groups of {dims.dp_shard}" if dims.data_parallel == "hsdp" else "")
    sp = ", sequence parallel" if dims.sp else ""
    return f"world {dims.world_size} = pp {dims.pp} x tp {dims.tp} x dp {dims.dp} ({mode}, ep {dims.ep}{sp})"


@dataclass
class StagePlan:
    """Bytes one rank of a pipeline stage holds."""

    stage: int
    layers: list[int]
    params: int
    grads: int
    optimizer: int
    buffers: int
    activations: int  # saved for backward over the micro-batches in flight, plus one recomputed region
    in_flight: int  # micro-batches whose activations the stage holds at once
    param_elements: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers + self.activations


@dataclass
class MemoryPlan:
    dims: ParallelDims
    micro_batch_size: int
    seq_len: int
    activation_bytes: int  # a: 2 under bf16 autocast, 4 in fp32
    checkpointing: str
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def peak(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    def table(self) -> str:
        precision = "bf16" if self.activation_bytes == 2 else "fp32"
        unit, scale = ("GiB", GIB) if self.peak.total >= GIB else ("MiB", 1024**2)
        lines = [
            f"memory plan per rank: {describe_layout(self.dims)}; micro-batch {self.micro_batch_size} x {self.seq_len} "
            f"tokens, {precision} activations, activation checkpointing {self.checkpointing}",
            f"{'stage':>5} {'layers':>7} {'params':>9} {'grads':>9} {'optimizer':>9} {'buffers':>9} "
            f"{'activations':>11} {'total':>9}  ({unit})",
        ]
        for s in self.stages:
            span = f"{s.layers[0]}-{s.layers[-1]}" if s.layers else "-"
            lines.append(
                f"{s.stage:>5} {span:>7} {s.params / scale:>9.2f} {s.grads / scale:>9.2f} "
                f"{s.optimizer / scale:>9.2f} {s.buffers / scale:>9.2f} {s.activations / scale:>11.2f} "
                f"{s.total / scale:>9.2f}" + (f"  ({s.in_flight} micro-batches in flight)" if s.in_flight > 1 else "")
            )
        return "\n".join(lines)


def meta_model(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> Decoder:
    """The full model with shapes only (no storage, no initialisation cost)."""
    with torch.device("meta"):
        return Decoder(model_cfg, moe_cfg)


def tensor_parallel_dims(model: nn.Module) -> dict[str, int]:
    """Parameter name -> the dim tensor parallelism shards (parallel/tensor_parallel.py's plan); absent: replicated."""
    dims: dict[str, int] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Attention):
            dims.update({f"{prefix}w{x}.weight": 0 for x in "qkv"})
            dims[f"{prefix}wo.weight"] = 1
        elif isinstance(module, DenseFFN):
            dims.update({f"{prefix}w_gate.weight": 0, f"{prefix}w_up.weight": 0, f"{prefix}w_down.weight": 1})
    dims["tok_embeddings.weight"] = 0
    dims["output.weight"] = 0
    return dims


def local_shape(shape: tuple[int, ...], tp_dim: int | None, is_expert: bool, dims: ParallelDims) -> tuple[int, ...]:
    """The shape one rank stores of a parameter of `shape` (the largest over ranks, as FSDP2 pads every shard), as
    parallel/data_parallel.py shards it."""
    local = list(shape)
    if tp_dim is not None and dims.tp > 1:
        local[tp_dim] //= dims.tp
    if not dims.sharded:
        return tuple(local)
    if is_expert and dims.ep > 1:
        # FFN experts of an expert-parallel layer: this rank's slice over ep, then FSDP on the expert mesh.
        local[0] //= dims.ep
        n = dims.edp_shard
        if n > 1:
            # The local experts (dim 0) when they split evenly over the expert shard group, else a weight dim.
            dim = 0 if local[0] % n == 0 or local[1] % n else 1
            local[dim] = math.ceil(local[dim] / n)
    elif dims.dp_shard > 1:  # every other parameter (FFN experts too without ep): dim 0 over the shard group
        local[0] = math.ceil(local[0] / dims.dp_shard)
    return tuple(local)


def stage_of(name: str, layer_stage: dict[int, int], num_stages: int) -> int:
    if name.startswith("layers."):
        return layer_stage[int(name.split(".")[1])]
    return 0 if name.startswith("tok_embeddings.") else num_stages - 1


def plan_memory(
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    dims: ParallelDims,
    micro_batch_size: int,
    seq_len: int,
    micro_batches: int,
    bf16: bool = False,
    cuda: bool = False,
    checkpointing: str = "none",
) -> MemoryPlan:
    """The plan of every pipeline stage of `dims` (ranks of one stage hold the same sizes). bf16: bf16 autocast;
    cuda: the device is a GPU (grouped expert GEMMs; `parallel.mixed_precision: auto` means bf16 there)."""
    d = dims
    model = meta_model(model_cfg, moe_cfg)
    counts = stage_layer_counts(model_cfg.num_layers, d.pp, list(d.pp_layers) if d.pp_layers else None)
    layer_stage = {}
    for stage, n in enumerate(counts):
        start = sum(counts[:stage])
        layer_stage.update({i: stage for i in range(start, start + n)})
    tp_dims = tensor_parallel_dims(model)
    experts = {id(p) for m in model.modules() if isinstance(m, FFNExperts) for p in m.parameters()}
    elements = [0] * d.pp
    # FSDP's units (parallel/data_parallel.py), gathered whole one at a time, per stage: a block's parameters (its
    # FFN experts apart under ep), the embedding, the final norm, the head. Sizes unsharded over dp.
    units: list[dict[str, int]] = [{} for _ in range(d.pp)]
    unsharded = dataclasses.replace(d, data_parallel="replicate", dp_shard=1)
    for name, p in model.named_parameters():
        is_expert = id(p) in experts
        stage = stage_of(name, layer_stage, d.pp)
        elements[stage] += math.prod(local_shape(tuple(p.shape), tp_dims.get(name), is_expert, d))
        unit = ".".join(name.split(".")[:2]) if name.startswith("layers.") else name.split(".")[0]
        unit += ".experts" if is_expert and d.ep > 1 else ""  # gathered on their own mesh (the expert mesh)
        whole = math.prod(local_shape(tuple(p.shape), tp_dims.get(name), is_expert, unsharded))
        units[stage][unit] = units[stage].get(unit, 0) + whole
    a = 2 if bf16 else 4
    gathered_bytes = param_dtype(d.mixed_precision, "cuda" if cuda else "cpu").itemsize
    plan = MemoryPlan(d, micro_batch_size, seq_len, a, checkpointing)
    acts = ActivationEstimate(model_cfg, moe_cfg, d, micro_batch_size * seq_len, a, cuda and bf16)
    for stage, n in enumerate(counts):
        start = sum(counts[:stage])
        layers = list(range(start, start + n))
        saved, rebuilt = acts.stage(layers, first=stage == 0, last=stage == d.pp - 1, checkpointing=checkpointing)
        in_flight = min(d.pp - stage, micro_batches)
        p = elements[stage]
        buffers = data_parallel_buffers(units[stage], d, gathered_bytes) if d.sharded else 0
        if d.sp:  # GradSync's flat all-reduce of the gradients that are partial sums over tp
            buffers += min(4 * p, BUCKET_BYTES)
        plan.stages.append(
            StagePlan(stage, layers, 4 * p, 4 * p, 8 * p, buffers, in_flight * saved + rebuilt, in_flight, p)
        )
    return plan


def data_parallel_buffers(units: dict[str, int], dims: ParallelDims, gathered_bytes: int) -> int:
    """FSDP's temporary memory on one stage (units: elements of each FSDP unit, unsharded over dp).

    Gathered parameters, in the compute dtype (`gathered_bytes` each): a unit freed after the forward pass is held
    while it computes and while the next is prefetched (2 of the largest); one kept from the forward into the
    backward pass is held all that time: every unit with shard groups of one rank (replicate: FSDP copies the
    parameters for compute) or `reshard_after_forward: false`, else the final norm and the head. Gradients: one
    unit's unsharded fp32 gradient and its fp32 reduce-scatter buffer.
    """
    if not units:
        return 0
    largest = max(units.values())
    if dims.dp_shard == 1 or not dims.reshard_after_forward:
        gathered = sum(units.values())
    else:
        kept = sum(n for unit, n in units.items() if unit in ("norm", "output"))
        freed = [n for unit, n in units.items() if unit not in ("norm", "output")]
        gathered = kept + sum(sorted(freed)[-2:])
    return gathered_bytes * gathered + 2 * 4 * largest


class ActivationEstimate:
    """The module docstring's formula, per block kind, in bytes per micro-batch on one rank."""

    def __init__(
        self, model: ModelConfig, moe: MoEConfig, dims: ParallelDims, tokens: int, a: int, grouped_experts: bool
    ) -> None:
        d = dims
        self.model, self.moe, self.tp, self.a = model, moe, d.tp, a
        self.c = a if a < 4 else 0
        self.T = tokens
        self.T_r = tokens // d.tp if d.sp else tokens
        self.grouped = grouped_experts

    def norm(self) -> int:
        return self.T_r * (12 * self.model.hidden_size + 4)

    def attention(self) -> int:
        m, T, tp = self.model, self.T, self.tp
        qkv = T * self.a * (2 * m.num_heads + 2 * m.kv_heads) * m.head_dim // tp
        return qkv + 4 * T * m.num_heads // tp

    def attention_input_copy(self) -> int:
        return self.T * self.c * self.model.hidden_size

    def dense_ffn(self, width: int) -> int:
        return self.T * self.c * self.model.hidden_size + 4 * self.a * self.T * width // self.tp

    def expert_hidden(self) -> int:
        """The [A, 2 F_e] pre-activation (looped experts) or its grouped-matmul counterparts: what `moe` drops."""
        f = self.moe.expert_ffn_hidden_size or self.model.ffn_hidden_size
        A = self.T_r * self.moe.top_k
        return A * (4 * self.a * f if self.grouped else 8 * f)

    def moe_layer(self, has_residual: bool) -> int:
        m, moe, T_r = self.model, self.moe, self.T_r
        D, E, K = m.hidden_size, moe.num_total_experts, moe.top_k
        routing = T_r * (4 * E + 23 * K + 12 * moe.num_constant_experts + 4) + (4 * T_r * E if has_residual else 0)
        A = T_r * K
        rows = A * ((2 + 8) * D + 20) if self.grouped else A * (12 * D + 20)
        shared = moe.shared_ffn_hidden_size(m.ffn_hidden_size)
        zc_copy = 4 * T_r * D if self.a < 4 else 0
        return routing + rows + self.expert_hidden() + (self.dense_ffn(shared) if shared else 0) + zc_copy

    def block(self, layer: int) -> tuple[int, int]:
        """(bytes saved without checkpointing, of which attention's)."""
        moe = self.moe
        attention = self.attention() + self.attention_input_copy()
        if moe.is_moe_layer(layer):
            seen_moe = any(moe.is_moe_layer(i) for i in range(layer))
            ffn = self.moe_layer(moe.gating_residual and seen_moe)
        else:
            ffn = self.dense_ffn(self.model.ffn_hidden_size)
        return 2 * self.norm() + attention + ffn, attention

    def logits_producer(self, layer: int, stage_start: int) -> int | None:
        """The MoE layer whose router logits block `layer` receives (on a stage starting at `stage_start`: from an
        earlier stage only when the gating residual carries them across), or None."""
        before = [j for j in range(layer) if self.moe.is_moe_layer(j)]
        if not before or (before[-1] < stage_start and not self.moe.gating_residual):
            return None
        return before[-1]

    def stage(self, layers: list[int], first: bool, last: bool, checkpointing: str) -> tuple[int, int]:
        """(bytes saved for backward per micro-batch, bytes a recomputation rebuilds at once) on this stage."""
        m, moe = self.model, self.moe
        saved = 8 * self.T if first else 0
        if last:
            saved += self.norm() + self.T * self.c * m.hidden_size + (4 + self.a) * self.T * m.vocab_size // self.tp
        blocks = {i: self.block(i) for i in layers}
        rebuilt = 0
        if checkpointing == "full":
            # A block keeps its inputs: the residual stream, and the router logits of the last MoE layer before it
            # (one tensor, kept once however many blocks receive it).
            logits = {p for i in layers if (p := self.logits_producer(i, layers[0])) is not None}
            saved += len(layers) * 4 * self.T_r * m.hidden_size + len(logits) * 4 * self.T_r * moe.num_total_experts
            rebuilt = max((b for b, _ in blocks.values()), default=0)
        elif checkpointing == "moe":
            moe_layers = [i for i in layers if moe.is_moe_layer(i)]
            saved += sum(b for b, _ in blocks.values()) - len(moe_layers) * self.expert_hidden()
            rebuilt = self.expert_hidden() if moe_layers else 0
        elif checkpointing == "attention":
            saved += sum(b - att for b, att in blocks.values())
            rebuilt = self.attention() + self.attention_input_copy() if layers else 0
        elif checkpointing == "none":
            saved += sum(b for b, _ in blocks.values())
        else:
            raise ConfigError(f"train.activation_checkpointing: unknown mode {checkpointing!r}")
        return saved, rebuilt
