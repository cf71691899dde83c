"""Process bodies for the multi-process tests (importable, so torch.multiprocessing can spawn them)."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from model.config import ModelConfig, MoEConfig
from model.transformer import Decoder
from parallel import parallelize
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.config import ParallelConfig
from parallel.grads import GradSync, full_tensors
from parallel.loss import lm_loss, loss_context
from parallel.mesh import init_parallel
from train.config import OptimConfig
from train.optim import build_optimizer
from train.step import train_step

# fp32 everywhere; the parallel model sums the same numbers in a different order (all-reduce, split matmuls).
RTOL, ATOL = 1e-4, 1e-5
# After AdamW steps: Adam divides by sqrt(v), which turns the ~1e-8 summation-order differences of near-zero
# gradients into visible differences of the update. The test's AdamW uses eps=1e-5 (damping only gradients below
# ~1e-5) and parameters get atol 1e-4 (1% of one lr=1e-2 step). Gradient scale errors cannot hide here: the step
# also clips by the global norm, which a double-counted gradient would change.
PARAM_RTOL, PARAM_ATOL = 1e-3, 1e-4
ADAM_EPS = 1e-5


def tiny_model_configs(vanilla: bool = False, capacity: float | None = None) -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=16
    )
    zc = (0, 0, 0) if vanilla else (1, 1, 2)
    # every_n_layers=2: layers 0 and 2 are MoE, layer 1 is dense, so the gating residual crosses a dense layer.
    moe = MoEConfig(
        num_experts=8,
        num_zero_experts=zc[0],
        num_copy_experts=zc[1],
        num_constant_experts=zc[2],
        top_k=2,
        expert_ffn_hidden_size=24,
        every_n_layers=2,
        gating_residual=not vanilla,
        capacity_factor=capacity,
    )
    return model, moe


def _close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _check_compiled(compile_backend: str | None) -> None:
    """With a backend, the blocks really ran compiled (an eager model would pass every comparison trivially)."""
    if compile_backend is not None:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "no block was compiled"


def _reduce_and_compare_grads(par, ref, ctx, sync: GradSync) -> dict[str, torch.Tensor]:
    """Reduce the parallel model's gradients and compare every one with the reference's; returns the latter."""
    sync.reduce()
    grads = full_tensors(par, grads=True)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
    for name, want in ref_grads.items():
        _close(f"grad {name}", grads[name], want)
    return ref_grads


def equivalence(
    rank: int,
    world: int,
    tp: int,
    ep: int,
    capacity: float | None,
    steps: int,
    sp: bool = False,
    compile_backend: str | None = None,
    ac: str = "none",
) -> None:
    """The parallel model (its blocks compiled by `compile_backend`, activation checkpointing `ac`) against the
    eager single-process one."""
    check_equivalence(ParallelConfig(tp=tp, ep=ep, sequence_parallel=sp), capacity, steps, ac, compile_backend)


def layouts(rank: int, world: int, cases: dict[str, dict]) -> None:
    """Several layouts in one world, one after the other (each builds its own meshes from the same process group):
    {name: ParallelConfig keys, plus "pipeline": (num_layers, every_n_layers) for a pipeline case and "ac": an
    activation checkpointing mode}."""
    for name, case in cases.items():
        case = dict(case)
        pipeline = case.pop("pipeline", None)
        bf16 = case.pop("bf16", False)
        ac = case.pop("ac", "none")
        try:
            if bf16:
                check_bf16_step(ParallelConfig(**case, mixed_precision="bf16"))
            elif pipeline is None:
                check_equivalence(ParallelConfig(**case), None, 3, ac)
            else:
                check_pipeline(ParallelConfig(**case), *pipeline, ac=ac)
        except Exception as e:
            e.add_note(f"in layout {name}")
            raise


def check_sharded_state(par, opt_par, ref, ctx) -> None:
    """Parameters + AdamW moments under fsdp/hsdp: every element is held by exactly one rank of a shard group (the
    local sizes add up to the single-process total), so each rank holds ~1/dp_shard of it; FFN experts are split
    over ep x their expert shard group."""
    dims = ctx.dims
    mine = 0
    for p in par.parameters():
        state = opt_par.state[p]
        mine += sum(t.to_local().numel() for t in (p, state["exp_avg"], state["exp_avg_sq"]))
    total = 3 * sum(p.numel() for p in ref.parameters())
    dense = ctx.meshes["dense"]
    shard_group = dense.get_group() if dense.ndim == 1 else dense["dp_shard"].get_group()
    held = torch.tensor([mine])
    dist.all_reduce(held, group=shard_group)
    assert held.item() == total, (held.item(), total)
    assert mine <= 1.05 * total / dims.dp_shard, (mine, total, dims.dp_shard)
    for m in par.modules():
        if hasattr(m, "w_up") and isinstance(m.w_up, torch.distributed.tensor.DTensor):
            # num_experts / (ep x edp_shard) experts per rank (or that share of each when they do not split)
            local = m.w_up.to_local()
            assert local.numel() * dims.ep * dims.edp_shard == m.w_up.numel(), (local.shape, m.w_up.shape)


def check_bf16_step(pcfg: ParallelConfig) -> None:
    """Mixed precision: the layers compute with bf16 copies of the parameters while the sharded parameters (the
    optimizer's master weights) and the reduced gradients stay fp32. Loss and gradients are those of the fp32
    single-process model under bf16 autocast, to bf16 accuracy (loss rtol 2e-2, each gradient within 5% of its
    norm). The weights start bf16-representable, so both models route alike (a token changing expert over a
    rounding difference would move that expert's gradient by far more than rounding)."""
    ctx = init_parallel(pcfg, "cpu")
    dp = ctx.dims.dp
    mcfg, moecfg = tiny_model_configs()
    torch.manual_seed(0)
    ref = Decoder(mcfg, moecfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16())
    par = parallelize(copy.deepcopy(ref), ctx)
    batch = torch.randint(0, mcfg.vocab_size, (2 * dp, 13), generator=torch.Generator().manual_seed(1))
    shard = batch.chunk(dp)[ctx.dp_rank]
    seen = []
    par.layers["0"].attention.wq.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    with amp:
        out = par(shard[:, :-1])
    loss = lm_loss(out, shard[:, 1:]) + out.aux_loss
    loss.backward()
    GradSync(par, ctx).reduce()
    with amp:
        out_ref = ref(shard[:, :-1])
    ref_loss = lm_loss(out_ref, shard[:, 1:]) + out_ref.aux_loss
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=2e-2, atol=0)
    assert seen == [torch.bfloat16], seen
    with amp:  # the reference's gradient: the mean loss over the dp shards
        outs = [ref(s[:, :-1]) for s in batch.chunk(dp)]
    ref.zero_grad()
    sum((lm_loss(o, s[:, 1:]) + o.aux_loss) / dp for o, s in zip(outs, batch.chunk(dp), strict=True)).backward()
    grads = full_tensors(par, grads=True)
    for name, p in par.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, (name, p.dtype, p.grad.dtype)
    for name, want in ref.named_parameters():
        err = (grads[name] - want.grad).norm() / want.grad.norm().clamp_min(1e-12)
        assert err < 0.05, (name, float(err))


def check_equivalence(
    pcfg: ParallelConfig, capacity: float | None, steps: int, ac: str = "none", compile_backend: str | None = None
) -> None:
    """The layout's model (with activation checkpointing `ac`, its blocks compiled by `compile_backend`) against the
    eager single-process model with the same weights and no checkpointing: logits, loss, every gradient and the
    global norm of step 0, then the parameters after `steps` AdamW steps (plus the sharded state under fsdp/hsdp)."""
    ctx = init_parallel(pcfg, "cpu")
    dp = ctx.dims.dp
    mcfg, moecfg = tiny_model_configs(capacity=capacity)
    torch.manual_seed(0)
    ref = Decoder(mcfg, moecfg)
    par = parallelize(copy.deepcopy(ref), ctx, compile_backend=compile_backend)
    assert (ac == "none") == (not apply_activation_checkpointing(par, ac))  # regions were found and wrapped
    g = torch.Generator().manual_seed(1)
    # Two sequences per data-parallel rank; rank d takes shard d (tp ranks of one replica share it).
    batches = [torch.randint(0, mcfg.vocab_size, (2 * dp, 13), generator=g) for _ in range(steps + 1)]
    shards = [list(b.chunk(dp)) for b in batches]
    mine = ctx.dp_rank

    # Forward/backward of step 0: logits and loss of this rank's shard, and every reduced gradient.
    ref_losses = []
    for shard in shards[0]:
        out = ref(shard[:, :-1])
        loss = lm_loss(out, shard[:, 1:]) + out.aux_loss
        (loss / dp).backward()
        ref_losses.append((out.logits_BSV.detach(), loss.detach()))
    out = par(shards[0][mine][:, :-1])
    if capacity is not None:  # the capacity case must really drop something to test dropping
        dropped = torch.stack([a.stats.dropped for a in out.moe_layers]).sum()
        dist.all_reduce(dropped)
        assert dropped > 0
    loss = lm_loss(out, shards[0][mine][:, 1:]) + out.aux_loss
    with loss_context(out):
        loss.backward()
    logits = out.logits_BSV
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    _close("logits", logits.detach(), ref_losses[mine][0])
    _close("loss", loss.detach(), ref_losses[mine][1])
    sync = GradSync(par, ctx)
    ref_grads = _reduce_and_compare_grads(par, ref, ctx, sync)
    # Global norm (clipping) equals the single-process norm of the full gradient.
    want_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref_grads.values()]))
    _close("grad norm", sync.clip_(0.0), want_norm)
    ref.zero_grad(set_to_none=True)
    par.zero_grad(set_to_none=True)

    # Optimizer steps with gradient accumulation over two micro-batches of one sequence per rank; the reference
    # sees every rank's micro-batches as its own (same per-micro-batch statistics).
    optim_cfg = OptimConfig(lr=1e-2, weight_decay=0.1, eps=ADAM_EPS)
    opt_ref, opt_par = build_optimizer(ref, optim_cfg), build_optimizer(par, optim_cfg)
    for step in range(1, steps + 1):
        r = train_step(ref, opt_ref, list(batches[step].split(1)), clip_grad=0.05)
        p = train_step(par, opt_par, list(shards[step][mine].split(1)), clip_grad=0.05, grad_sync=sync)
        _close(f"step {step} grad norm", p.grad_norm, r.grad_norm)
    params = full_tensors(par)
    for name, want in ref.named_parameters():
        _close(f"param {name} after {steps} steps", params[name], want.detach(), PARAM_RTOL, PARAM_ATOL)
    if ctx.dims.data_parallel != "replicate" and ctx.dims.tp == 1:
        check_sharded_state(par, opt_par, ref, ctx)
    _check_compiled(compile_backend)


def a2a_volume(rank: int, world: int) -> None:
    """All-to-all bytes are the rows handed to the collectives (no double counting): over the ep group each
    collective moves exactly FFN assignments x row bytes, the remote part excludes each rank's own chunk, and an
    MoE++ model's volume = FFN share x that of the vanilla twin."""
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(rank))
    results = {}
    for vanilla in (False, True):
        mcfg, moecfg = tiny_model_configs(vanilla=vanilla)
        torch.manual_seed(0)
        model = parallelize(Decoder(mcfg, moecfg), ctx)
        out = model(tokens)
        a2a = [s.stats.a2a for s in out.moe_layers]
        field_names = ("dispatch_sent", "dispatch_received", "combine_sent", "combine_received")
        per_rank = torch.tensor([[getattr(t, f) for f in field_names] for t in a2a])
        remote = torch.tensor([[t.dispatch_sent_remote, t.dispatch_received_remote] for t in a2a])
        counts = torch.stack([s.stats.expert_counts_E for s in out.moe_layers])
        ffn = counts[:, : moecfg.num_experts].sum(1)
        # Rows a rank routes to its own experts: they stay home.
        local = moecfg.num_experts // world
        own = counts[:, rank * local : (rank + 1) * local].sum(1)
        row_bytes = mcfg.hidden_size * 4  # fp32
        assert torch.equal(per_rank[:, 0], ffn * row_bytes)  # a rank sends each of its FFN assignments once
        assert torch.equal(per_rank[:, 3], ffn * row_bytes)  # and gets each one back
        assert torch.equal(remote[:, 0], (ffn - own) * row_bytes)
        assert all(t.sent == t.dispatch_sent + t.combine_sent for t in a2a)
        sent = torch.tensor([t.sent for t in a2a])
        total = torch.tensor([s.stats.num_tokens * moecfg.top_k for s in out.moe_layers])
        for t in (per_rank, remote, sent, ffn, total):
            dist.all_reduce(t, group=ctx.group("ep"))
        # Over the group, what is sent is received, in each collective and for the remote part.
        assert torch.equal(per_rank[:, 0], per_rank[:, 1]) and torch.equal(per_rank[:, 2], per_rank[:, 3])
        assert torch.equal(per_rank[:, 0], per_rank[:, 2]) and torch.equal(remote[:, 0], remote[:, 1])
        assert torch.equal(sent, 2 * ffn * row_bytes)  # dispatch + combine, nothing counted twice
        results[vanilla] = (sent, ffn, total)
    sent_pp, ffn_pp, total_pp = results[False]
    sent_van, ffn_van, total_van = results[True]
    assert torch.equal(ffn_van, total_van)  # vanilla: every assignment is an FFN assignment
    assert (ffn_pp < total_pp).all()  # MoE++ sent some tokens to zero-computation experts
    # bytes_pp / bytes_vanilla == ffn_pp / total_pp, exactly, in integers
    assert torch.equal(sent_pp * total_pp, sent_van * ffn_pp), (sent_pp, sent_van, ffn_pp, total_pp)


class CollectivePayloads(TorchDispatchMode):
    """Records the dtype of every floating-point tensor an all-to-all moves, forward and backward alike."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "all_to_all" in name or "alltoall" in name:
            moved = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            self.dtypes += [a.dtype for a in moved[-1:]]  # the input (the last tensor argument)
        return func(*args, **(kwargs or {}))


def bf16_payload(rank: int, world: int) -> None:
    """Under bf16 autocast the all-to-alls move bf16 rows in both directions, forward and backward (the byte counts
    say so too), and the layer's output and fp32 gradients match the single-process layer's under autocast."""
    from model.moe import MoELayer
    from parallel.data_parallel import apply_data_parallel
    from parallel.expert_parallel import apply_expert_parallel

    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    _, moecfg = tiny_model_configs()
    torch.manual_seed(0)
    ref = MoELayer(32, moecfg, ffn_hidden_size=16, has_residual=False)
    par = copy.deepcopy(ref)
    apply_expert_parallel(par, ctx.mesh["ep"])
    apply_data_parallel(par, ctx)  # the router's gradients are averaged over the ranks
    xs = [torch.randn(10, 32, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out = [ref(x, None)[0] for x in xs]
    (torch.stack(ref_out).float().square().sum() / world).backward()

    x = xs[rank].clone().requires_grad_()
    payloads = CollectivePayloads()
    with payloads:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _, _, stats = par(x, None)
        out.float().square().sum().backward()
    # dispatch and combine forward, then their gradients in the backward
    assert payloads.dtypes == [torch.bfloat16] * 4, payloads.dtypes
    ffn = int(stats.expert_counts_E[: moecfg.num_experts].sum())
    assert stats.a2a.dispatch_sent == stats.a2a.combine_received == ffn * 32 * 2  # 2 bytes per bf16 element
    assert out.dtype == torch.float32 and x.grad.dtype == torch.float32
    # The same arithmetic as one process under autocast (bf16 GEMMs, fp32 sums): equal up to summation order.
    _close("output", out.detach(), ref_out[rank].detach(), rtol=1e-2, atol=1e-3)
    GradSync(par, ctx).reduce()
    grads = full_tensors(par, grads=True)
    for name, p in ref.named_parameters():
        assert grads[name].dtype == torch.float32, name
        _close(f"grad {name}", grads[name], p.grad, rtol=2e-2, atol=1e-3)


def empty_rank(rank: int, world: int) -> None:
    """All tokens pick experts 0 and 1 (both on ep rank 0): rank 1 receives nothing, six experts get no token.
    Output and gradients still equal the single-process layer's."""
    from model.moe import MoELayer

    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    _, moecfg = tiny_model_configs()
    torch.manual_seed(0)
    ref = MoELayer(16, moecfg, ffn_hidden_size=8, has_residual=False)
    with torch.no_grad():
        ref.router.wg.weight.fill_(-1.0)
        ref.router.wg.weight[:2] = 1.0
    par = copy.deepcopy(ref)
    from parallel.data_parallel import apply_data_parallel
    from parallel.expert_parallel import apply_expert_parallel

    apply_expert_parallel(par, ctx.mesh["ep"])
    apply_data_parallel(par, ctx)
    x = torch.rand(6, 16, generator=torch.Generator().manual_seed(rank)) + 0.1  # positive: experts 0, 1 win
    xs = [torch.rand(6, 16, generator=torch.Generator().manual_seed(r)) + 0.1 for r in range(world)]
    ref_out = [ref(xi, None)[0] for xi in xs]
    (torch.stack(ref_out).square().sum() / world).backward()
    out, _, _, stats = par(x, None)
    assert stats.expert_counts_E[:2].sum() == 12 and stats.expert_counts_E[2:].sum() == 0
    _close("output", out, ref_out[rank].detach())
    out.square().sum().backward()
    GradSync(par, ctx).reduce()
    grads = full_tensors(par, grads=True)
    for name, p in ref.named_parameters():
        _close(f"grad {name}", grads[name], p.grad)


def _fixed_tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens).logits_BSV
    return (logits.full_tensor() if hasattr(logits, "full_tensor") else logits).detach()


def _full_optimizer_state(model, opt) -> dict[str, torch.Tensor]:
    """AdamW moments by parameter name as full tensors (a collective)."""
    out = {}
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            t = opt.state[p][key]
            out[f"{name}.{key}"] = t.full_tensor() if hasattr(t, "full_tensor") else t
    return out


def save_layout(rank: int, world: int, tp: int, ep: int, ckpt_dir: str) -> None:
    save_in(rank, world, {"tp": tp, "ep": ep}, ckpt_dir)


def save_in(rank: int, world: int, layout: dict, ckpt_dir: str) -> None:
    """One training step in this layout (ParallelConfig keys), then a DCP checkpoint, the full logits it gives
    (logits.pt) and its full AdamW moments (optim.pt)."""
    import dataclasses
    from pathlib import Path

    from train.checkpoint import Checkpointer

    ctx = init_parallel(ParallelConfig(**layout), "cpu")
    mcfg, moecfg = tiny_model_configs()
    torch.manual_seed(0)
    model = parallelize(Decoder(mcfg, moecfg), ctx)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    batch = torch.randint(0, 64, (2 * ctx.dims.dp, 13), generator=torch.Generator().manual_seed(3))
    train_step(model, opt, [batch.chunk(ctx.dims.dp)[ctx.dp_rank]], 1.0, grad_sync=GradSync(model, ctx))
    meta = {"consumed_samples": 0, "config": {"model": dataclasses.asdict(mcfg), "moe": dataclasses.asdict(moecfg)}}
    Checkpointer(Path(ckpt_dir), ctx, keep_last=1).save(1, model, opt, meta)
    logits = _full_logits(model, _fixed_tokens())
    moments = _full_optimizer_state(model, opt)
    if rank == 0:
        torch.save(logits, Path(ckpt_dir) / "logits.pt")
        torch.save(moments, Path(ckpt_dir) / "optim.pt")


def load_layout(rank: int, world: int, tp: int, ep: int, ckpt_dir: str) -> None:
    load_in(rank, world, [{"tp": tp, "ep": ep}], ckpt_dir)


def load_in(rank: int, world: int, layouts: list[dict], ckpt_dir: str) -> None:
    """In each layout, a differently initialised model loads the checkpoint: the same logits, and the saved AdamW
    state (every moment, as full tensors, and the step count)."""
    from pathlib import Path

    from train.checkpoint import load_training_state

    want_logits = torch.load(Path(ckpt_dir) / "logits.pt")
    want_moments = torch.load(Path(ckpt_dir) / "optim.pt")
    for layout in layouts:
        ctx = init_parallel(ParallelConfig(**layout), "cpu")
        mcfg, moecfg = tiny_model_configs()
        torch.manual_seed(123)  # different weights: everything must come from the checkpoint
        model = parallelize(Decoder(mcfg, moecfg), ctx)
        opt = build_optimizer(model, OptimConfig(lr=1e-2))
        meta = load_training_state(Path(ckpt_dir) / "step_00000001", model, opt, ctx)
        assert meta["step"] == 1
        _close(f"logits after reload in {layout}", _full_logits(model, _fixed_tokens()), want_logits)
        moments = _full_optimizer_state(model, opt)
        assert moments.keys() == want_moments.keys()
        for key, want in want_moments.items():
            _close(f"{key} after reload in {layout}", moments[key], want)
        steps = {float(s["step"]) for s in opt.state.values()}
        assert steps == {1.0}, steps


def resume_exact(rank: int, world: int, layout: dict, ckpt_dir: str) -> None:
    """Four steps straight, against two steps, a checkpoint, and a differently initialised model that loads it and
    takes the other two: the same losses, gradient norms and final parameters, bit for bit."""
    import dataclasses
    from pathlib import Path

    from train.checkpoint import Checkpointer, load_training_state

    ctx = init_parallel(ParallelConfig(**layout), "cpu")
    mcfg, moecfg = tiny_model_configs()
    meta = {"consumed_samples": 0, "config": {"model": dataclasses.asdict(mcfg), "moe": dataclasses.asdict(moecfg)}}
    dp = ctx.dims.dp
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 64, (2 * dp, 13), generator=g).chunk(dp)[ctx.dp_rank] for _ in range(4)]

    def fresh(seed: int):
        torch.manual_seed(seed)
        model = parallelize(Decoder(mcfg, moecfg), ctx)
        return model, build_optimizer(model, OptimConfig(lr=1e-2, eps=ADAM_EPS)), GradSync(model, ctx)

    def step(model, opt, sync, i: int):
        return train_step(model, opt, list(batches[i].split(1)), 0.5, grad_sync=sync)

    model, opt, sync = fresh(0)
    straight = []
    for i in range(4):
        if i == 2:
            Checkpointer(Path(ckpt_dir), ctx, keep_last=1).save(2, model, opt, meta)
        straight.append(step(model, opt, sync, i))
    resumed_model, resumed_opt, resumed_sync = fresh(123)
    load_training_state(Path(ckpt_dir) / "step_00000002", resumed_model, resumed_opt, ctx)
    for i in (2, 3):
        r = step(resumed_model, resumed_opt, resumed_sync, i)
        assert torch.equal(r.loss, straight[i].loss), (i, r.loss, straight[i].loss)
        assert torch.equal(r.grad_norm, straight[i].grad_norm), (i, r.grad_norm, straight[i].grad_norm)
    want, got = full_tensors(model), full_tensors(resumed_model)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


def pipeline_equivalence(
    rank: int,
    world: int,
    pp: int,
    tp: int,
    ep: int,
    num_layers: int,
    every_n: int,
    pp_layers: list[int] | None,
    vanilla: bool = False,
    compile_backend: str | None = None,
    ac: str = "none",
    global_balance: bool = False,
) -> None:
    pcfg = ParallelConfig(pp=pp, tp=tp, ep=ep, pp_layers=pp_layers)
    check_pipeline(
        pcfg, num_layers, every_n, vanilla, ac=ac, global_balance=global_balance, compile_backend=compile_backend
    )


def check_pipeline(
    pcfg: ParallelConfig,
    num_layers: int,
    every_n: int,
    vanilla: bool = False,
    ac: str = "none",
    global_balance: bool = False,
    compile_backend: str | None = None,
) -> None:
    """Pipeline stages (1F1B, 3 micro-batches per rank) with activation checkpointing `ac` and blocks compiled by
    `compile_backend` against the eager single-process model without checkpointing: loss, balance loss, every
    gradient and the parameters after 3 steps. global_balance: the balance loss takes f from the step's
    micro-batches so far (a stage runs later micro-batches' forwards before an earlier one's backward) and the
    aux-free bias moves after each step."""
    import dataclasses

    from model.config import BalanceTerm
    from parallel import pipeline_schedule

    ctx = init_parallel(pcfg, "cpu")
    dp, n_micro = ctx.dims.dp, 3
    mcfg, moecfg = tiny_model_configs(vanilla=vanilla)
    mcfg = dataclasses.replace(mcfg, num_layers=num_layers)
    moecfg = dataclasses.replace(moecfg, every_n_layers=every_n)
    if global_balance:
        moecfg.balance_scope = "global_batch"
        moecfg.balance = [BalanceTerm("heterogeneous", 0.01), BalanceTerm("aux_free_bias", 0.01)]
    torch.manual_seed(0)
    ref = Decoder(mcfg, moecfg)
    par = parallelize(copy.deepcopy(ref), ctx, compile_backend=compile_backend)
    assert (ac == "none") == (not apply_activation_checkpointing(par, ac))  # regions were found and wrapped
    sched = pipeline_schedule(par, ctx)
    sync = GradSync(par, ctx)
    g = torch.Generator().manual_seed(1)
    # One sequence per micro-batch; the reference sees every rank's micro-batches as its own micro-batches.
    steps = [torch.randint(0, mcfg.vocab_size, (dp * n_micro, 13), generator=g) for _ in range(4)]

    def mine(batch: torch.Tensor) -> list[torch.Tensor]:
        return list(batch[ctx.dp_rank * n_micro : (ctx.dp_rank + 1) * n_micro].split(1))

    from train.step import local_forward_backward

    no_amp = contextlib.nullcontext()
    ce_ref, bal_ref, _ = local_forward_backward(ref, list(steps[0].split(1)), no_amp)
    stage = sched.forward_backward(mine(steps[0]), no_amp)
    # ce_sum: this rank's mean CE over its micro-batches (every one has as many positions); aux_sum: a sum.
    values = torch.stack([stage.ce_sum, stage.aux_sum / n_micro])
    dist.all_reduce(values, group=ctx.group("pp"))  # CE lives on the last stage, L_b on every stage
    if dp > 1:
        dist.all_reduce(values, group=ctx.group("dp"))
        values /= dp
    _close("loss", values[0], ce_ref)
    _close("balance loss", values[1], bal_ref / (dp * n_micro))
    sync.reduce()
    grads = full_tensors(par, grads=True)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert set(grads) <= set(ref_grads)
    for name, got in grads.items():
        _close(f"grad {name}", got, ref_grads[name])
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, sorted(grads))
    assert set().union(*map(set, seen)) == set(ref_grads)  # the stages together hold every parameter
    ref.zero_grad(set_to_none=True)
    par.zero_grad(set_to_none=True)

    optim_cfg = OptimConfig(lr=1e-2, weight_decay=0.1, eps=ADAM_EPS)
    opt_ref, opt_par = build_optimizer(ref, optim_cfg), build_optimizer(par, optim_cfg)
    for step in range(1, 4):
        r = train_step(ref, opt_ref, list(steps[step].split(1)), clip_grad=0.05)
        p = train_step(par, opt_par, mine(steps[step]), clip_grad=0.05, grad_sync=sync, pipeline=sched)
        _close(f"step {step} grad norm", p.grad_norm, r.grad_norm)
    params = full_tensors(par)
    ref_params = dict(ref.named_parameters())
    for name, got in params.items():
        _close(f"param {name} after 3 steps", got, ref_params[name].detach(), PARAM_RTOL, PARAM_ATOL)
    _check_compiled(compile_backend)


def router_family_configs(variant: str) -> tuple[ModelConfig, MoEConfig]:
    """etr: Expert-Token Resonance with expert-choice capacity, Switch + z-loss over the global batch and the
    aux-free bias. moepp-global: MoE++ with shared experts, the heterogeneous loss over the global batch,
    z-loss, the sequence-wise loss and the aux-free bias."""
    from model.config import BalanceTerm, RouterConfig

    model, moe = tiny_model_configs()
    moe.balance_scope = "global_batch"
    if variant == "etr":
        moe.router = RouterConfig(kind="etr")
        moe.gating_residual = False
        moe.capacity_factor = 0.7
        moe.balance = [BalanceTerm("switch", 0.01), BalanceTerm("zloss", 1e-3), BalanceTerm("aux_free_bias", 0.01)]
    else:
        moe.shared_experts = 1
        moe.balance = [
            BalanceTerm("heterogeneous", 0.01),
            BalanceTerm("zloss", 1e-3),
            BalanceTerm("seq", 1e-2),
            BalanceTerm("aux_free_bias", 0.01),
        ]
    return model, moe


def router_family(
    rank: int,
    world: int,
    tp: int,
    ep: int,
    sp: bool,
    variant: str,
    compile_backend: str | None = None,
    ac: str = "none",
) -> None:
    """The parallel model on its data-parallel shard against the single-process model on the concatenated batch:
    with global-batch balance the mean of the ranks' losses is the whole batch's loss, ETR's expert choice ranks the
    whole data-parallel batch's tokens, and the aux-free bias moves by the whole step's load."""
    from model.routers import Router
    from train.step import after_optimizer_step

    ctx = init_parallel(ParallelConfig(tp=tp, ep=ep, sequence_parallel=sp), "cpu")
    dp = ctx.dims.dp
    mcfg, moecfg = router_family_configs(variant)
    torch.manual_seed(0)
    ref = Decoder(mcfg, moecfg)
    par = parallelize(copy.deepcopy(ref), ctx, compile_backend=compile_backend)
    assert (ac == "none") == (not apply_activation_checkpointing(par, ac))  # regions were found and wrapped
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, mcfg.vocab_size, (2 * dp, 13), generator=g)
    shard = batch.chunk(dp)[ctx.dp_rank]

    out_ref = ref(batch[:, :-1])
    loss_ref = lm_loss(out_ref, batch[:, 1:]) + out_ref.aux_loss
    loss_ref.backward()
    out = par(shard[:, :-1])
    loss = lm_loss(out, shard[:, 1:]) + out.aux_loss
    with loss_context(out):
        loss.backward()
    logits = out.logits_BSV
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    mine = slice(2 * ctx.dp_rank, 2 * ctx.dp_rank + 2)
    _close("logits", logits.detach(), out_ref.logits_BSV.detach()[mine])
    mean_loss = loss.detach().clone()
    if dp > 1:
        dist.all_reduce(mean_loss, group=ctx.group("dp"))
    _close("mean loss over dp ranks", mean_loss / dp, loss_ref.detach())

    # Routing decisions are identical: kept assignments per expert, summed over the ranks that hold other tokens.
    groups = [ctx.group(n) for n, on in (("dp", dp > 1), ("tp", ctx.dims.sp)) if on]
    for got, want in zip(out.moe_layers, out_ref.moe_layers, strict=True):
        counts = got.stats.expert_counts_E.clone()
        for grp in groups:
            dist.all_reduce(counts, group=grp)
        assert torch.equal(counts, want.stats.expert_counts_E), (counts, want.stats.expert_counts_E)
    if variant == "etr":  # the capacity must really bind for the test to mean anything
        assert sum(int(a.stats.dropped) for a in out_ref.moe_layers) > 0

    _reduce_and_compare_grads(par, ref, ctx, GradSync(par, ctx))

    after_optimizer_step(ref, stepped=True)
    after_optimizer_step(par, stepped=True)
    ref_routers = [m for m in ref.modules() if isinstance(m, Router)]
    par_routers = [m for m in par.modules() if isinstance(m, Router)]
    for r, p in zip(ref_routers, par_routers, strict=True):
        assert r.expert_bias_E.abs().sum() > 0
        assert torch.equal(p.expert_bias_E, r.expert_bias_E), (p.expert_bias_E, r.expert_bias_E)
    _check_compiled(compile_backend)


DOC_EOD = 5


def _packed_windows(rows: int, g: torch.Generator) -> torch.Tensor:
    """Windows of 13 tokens, window r with 1 + r % 3 EODs among its inputs: several documents per window, and
    different numbers of masked positions in the micro-batches."""
    tokens = torch.randint(0, 64, (rows, 13), generator=g)
    tokens[tokens == DOC_EOD] = DOC_EOD + 1
    for r in range(rows):
        tokens[r, torch.randperm(12, generator=g)[: 1 + r % 3]] = DOC_EOD
    return tokens


def document_equivalence(
    rank: int, world: int, tp: int, ep: int, pp: int, sp: bool, compile_backend: str | None = None
) -> None:
    """Block-causal document attention, per-document positions and the EOD loss mask in a parallel layout against
    the single-process model, which sees every rank's micro-batches as its own: logits, the step's loss (the mean
    over the unmasked positions of the global batch), every gradient, and after 2 AdamW steps the parameters."""
    from data.packing import DocumentPacking
    from parallel import pipeline_schedule
    from train.step import ce_scale, local_forward_backward

    ctx = init_parallel(ParallelConfig(tp=tp, ep=ep, pp=pp, sequence_parallel=sp), "cpu")
    dp, n_micro = ctx.dims.dp, 2
    mcfg, moecfg = tiny_model_configs()
    torch.manual_seed(0)
    ref = Decoder(mcfg, moecfg)
    par = parallelize(copy.deepcopy(ref), ctx, compile_backend=compile_backend)
    sched = pipeline_schedule(par, ctx)
    sync = GradSync(par, ctx)
    packing = DocumentPacking(DOC_EOD, mask_attention=True, reset_positions=True, mask_loss=True)
    g = torch.Generator().manual_seed(1)
    steps = [_packed_windows(dp * n_micro, g) for _ in range(3)]
    masked_per_window = (steps[0][:, :-1] == DOC_EOD).sum(1)
    assert masked_per_window.min() > 0 and len(set(masked_per_window.tolist())) > 1

    def mine(batch: torch.Tensor) -> list[torch.Tensor]:
        return list(batch[ctx.dp_rank * n_micro : (ctx.dp_rank + 1) * n_micro].split(1))

    def global_loss(rank_loss: torch.Tensor) -> torch.Tensor:
        loss = rank_loss.detach().clone()
        if pp > 1:  # the CE lives on the last stage
            dist.all_reduce(loss, group=ctx.group("pp"))
        if dp > 1:
            dist.all_reduce(loss, group=ctx.group("dp"))
        return loss / dp

    no_amp = contextlib.nullcontext()
    window = torch.cat(mine(steps[0]))
    inputs = window[:, :-1]
    with torch.no_grad():
        want = ref(inputs, **packing.model_inputs(inputs)).logits_BSV
        if sched is not None:
            out = sched.forward_only(window, no_amp, packing)
            logits = out.logits_BSV if sched.is_last else None
        else:
            logits = par(inputs, **packing.model_inputs(inputs)).logits_BSV
    if logits is not None:
        _close("logits", logits.full_tensor() if hasattr(logits, "full_tensor") else logits, want)

    ce_ref, _, _ = local_forward_backward(ref, list(steps[0].split(1)), no_amp, packing)
    scale = ce_scale(mine(steps[0]), packing, sync)
    if sched is not None:
        ce = sched.forward_backward(mine(steps[0]), no_amp, packing, scale).ce_sum
    else:
        ce, _, _ = local_forward_backward(par, mine(steps[0]), no_amp, packing, scale)
    _close("loss (mean over the unmasked positions of the global batch)", global_loss(ce), ce_ref)
    sync.reduce()
    grads = full_tensors(par, grads=True)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, got in grads.items():
        _close(f"grad {name}", got, ref_grads[name])
    seen = [None] * world
    dist.all_gather_object(seen, sorted(grads))
    assert set().union(*map(set, seen)) == set(ref_grads)  # every parameter was compared on some rank
    ref.zero_grad(set_to_none=True)
    par.zero_grad(set_to_none=True)

    optim_cfg = OptimConfig(lr=1e-2, weight_decay=0.1, eps=ADAM_EPS)
    opt_ref, opt_par = build_optimizer(ref, optim_cfg), build_optimizer(par, optim_cfg)
    for step in (1, 2):
        r = train_step(ref, opt_ref, list(steps[step].split(1)), clip_grad=0.05, documents=packing)
        p = train_step(
            par, opt_par, mine(steps[step]), clip_grad=0.05, grad_sync=sync, pipeline=sched, documents=packing
        )
        _close(f"step {step} loss", global_loss(p.loss), r.loss)
        _close(f"step {step} grad norm", p.grad_norm, r.grad_norm)
    params = full_tensors(par)
    ref_params = dict(ref.named_parameters())
    for name, got in params.items():
        _close(f"param {name} after 2 steps", got, ref_params[name].detach(), PARAM_RTOL, PARAM_ATOL)
    _check_compiled(compile_backend)


def host_syncs(rank: int, world: int) -> None:
    """One training step under expert parallelism reads the device from the host exactly once per MoE layer and
    micro-batch (the all-to-all split sizes) plus once per step (the finite-gradient check), forward and backward,
    dropless and with capacity."""
    from tests.host_syncs import HostSyncCounter

    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    for capacity in (None, 0.8):
        mcfg, moecfg = tiny_model_configs(capacity=capacity)
        torch.manual_seed(0)
        model = parallelize(Decoder(mcfg, moecfg), ctx)
        opt = build_optimizer(model, OptimConfig(lr=1e-2))
        sync = GradSync(model, ctx)
        batch = torch.randint(0, mcfg.vocab_size, (4, 13), generator=torch.Generator().manual_seed(rank))
        micro = list(batch.split(2))
        train_step(model, opt, micro, 1.0, grad_sync=sync)  # warm-up: first-call work is not the steady state
        with HostSyncCounter() as syncs:
            train_step(model, opt, micro, 1.0, grad_sync=sync)
        moe_layers = sum(moecfg.is_moe_layer(i) for i in range(mcfg.num_layers))
        expected = {
            "tolist @ parallel/expert_parallel.py": moe_layers * len(micro),
            "_local_scalar_dense @ train/step.py": 1,
        }
        assert syncs.by_file() == expected, dict(syncs.where)


class _Mark(torch.autograd.Function):
    """Identity that notes when autograd reaches it in the backward."""

    @staticmethod
    def forward(ctx, x, events, name):
        ctx.events, ctx.name = events, name
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.events.append(ctx.name)
        return grad, None, None


def overlap_order(rank: int, world: int) -> None:
    """Under expert parallelism the zero-computation experts run while the dispatch all-to-all is in flight and the
    shared experts while the combine is, in the forward, and their backward while the gradients' all-to-alls are;
    overlap=False serialises. Output and gradients are the same either way."""
    from model.moe import MoELayer
    from parallel import async_all_to_all
    from parallel.expert_parallel import apply_expert_parallel

    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    _, moecfg = tiny_model_configs()
    moecfg.shared_experts = 1
    events: list[str] = []
    names: dict[int, str] = {}
    flight_cls = async_all_to_all.AsyncAllToAll

    def spy(method, what):
        def run(self, *args):
            # The first all-to-all of a forward is the dispatch, the second the combine.
            names.setdefault(id(self), "dispatch" if len(names) % 2 == 0 else "combine")
            events.append(f"{what} {names[id(self)]}")
            return method(self, *args)

        return run

    originals = {m: getattr(flight_cls, m) for m in ("start", "finish", "start_grad", "finish_grad")}
    labels = {"start": "launch", "finish": "wait", "start_grad": "launch grad", "finish_grad": "wait grad"}
    for m, f in originals.items():
        setattr(flight_cls, m, spy(f, labels[m]))
    results = {}
    try:
        for overlap in (True, False):
            torch.manual_seed(0)
            layer = MoELayer(32, moecfg, ffn_hidden_size=16, has_residual=False)
            apply_expert_parallel(layer, ctx.mesh["ep"])
            layer.dispatcher.overlap = overlap
            zc = layer.zero_computation_output

            def zc_marked(*args, zc=zc):
                events.append("zero-computation")
                return _Mark.apply(zc(*args), events, "zero-computation backward")

            layer.zero_computation_output = zc_marked

            def shared_marked(module, inputs, output):
                events.append("shared")
                return _Mark.apply(output, events, "shared backward")

            layer.shared.register_forward_hook(shared_marked)
            x = torch.randn(10, 32, generator=torch.Generator().manual_seed(rank), requires_grad=True)
            events.clear()
            names.clear()
            out = layer(x, None)[0]
            forward = list(events)
            events.clear()
            out.square().sum().backward()
            results[overlap] = (forward, list(events), out.detach(), x.grad, layer.experts.w_up.grad)
    finally:
        for m, f in originals.items():
            setattr(flight_cls, m, f)
    forward, backward = results[True][:2]
    assert forward == [
        "launch dispatch",
        "zero-computation",
        "wait dispatch",
        "launch combine",
        "shared",
        "wait combine",
    ], forward
    assert backward == [
        "launch grad combine",
        "shared backward",
        "wait grad combine",
        "launch grad dispatch",
        "zero-computation backward",
        "wait grad dispatch",
    ], backward
    forward, backward = results[False][:2]
    assert forward == [
        "launch dispatch",
        "wait dispatch",
        "zero-computation",
        "launch combine",
        "wait combine",
        "shared",
    ], forward
    for got, want in zip(results[True][2:], results[False][2:], strict=True):
        assert torch.equal(got, want)


def activation_checkpointing(rank: int, world: int, modes: list[str]) -> None:
    """Every checkpointing mode in tensor (tp=2), expert (ep=2, plain and with global-batch balance, the aux-free
    bias and ETR's expert choice over the data-parallel batch) and pipeline (pp=2, router logits crossing the stage
    boundary) parallelism, against the single-process model without checkpointing. One world of 2 for all."""
    assert world == 2
    cases = {
        "tp2": (equivalence, (2, 1, None, 2), {}),
        "ep2": (equivalence, (1, 2, None, 2), {}),
        "ep2-global-balance": (router_family, (1, 2, False, "moepp-global"), {}),
        "ep2-etr": (router_family, (1, 2, False, "etr"), {}),
        "pp2": (pipeline_equivalence, (2, 1, 1, 4, 1, None), {}),
        "pp2-global-balance": (pipeline_equivalence, (2, 1, 1, 4, 1, None), {"global_balance": True}),
    }
    for ac in modes:
        for name, (fn, args, kwargs) in cases.items():
            try:
                fn(rank, world, *args, ac=ac, **kwargs)
            except AssertionError as e:
                raise AssertionError(f"{name} with activation_checkpointing={ac}: {e}") from None


def _local_bytes(tensors) -> int:
    return sum(4 * (t.to_local() if hasattr(t, "to_local") else t).numel() for t in tensors)


def _storage_bytes(tensors) -> int:
    """Bytes of the storages behind the local tensors, each once (FSDP keeps a shard in a storage padded to the
    largest shard of its group)."""
    storages = {}
    for t in tensors:
        storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def memory_plan_matches_tensors(rank: int, world: int, layouts: dict[str, dict]) -> None:
    """The memory plan's parameters, gradients and AdamW state of this rank's pipeline stage equal the bytes of the
    local tensors after parallelize and one optimizer step, for each layout (ParallelConfig keys, plus "experts": FFN
    experts per MoE layer). The plan counts a rank's share as the largest of its group, as FSDP pads it: parameters
    are compared as their (padded) storage on every rank, AdamW moments (unpadded) as the largest over dp ranks."""
    import dataclasses

    from parallel import pipeline_schedule
    from parallel.memory import plan_memory
    from parallel.mesh import ParallelDims

    for name, keys in layouts.items():
        keys = dict(keys)
        mcfg, moecfg = tiny_model_configs()
        # shared experts are tensor-parallel too
        moecfg = dataclasses.replace(moecfg, shared_experts=1, num_experts=keys.pop("experts", moecfg.num_experts))
        mcfg = dataclasses.replace(mcfg, num_layers=4)
        pcfg = ParallelConfig(**keys)
        ctx = init_parallel(pcfg, "cpu")
        torch.manual_seed(0)
        model = parallelize(Decoder(mcfg, moecfg), ctx)
        opt = build_optimizer(model, OptimConfig(lr=1e-2))
        tokens = torch.randint(0, mcfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(rank))
        sched = pipeline_schedule(model, ctx)
        train_step(model, opt, list(tokens.split(1)), 1.0, grad_sync=GradSync(model, ctx), pipeline=sched)
        plan = plan_memory(mcfg, moecfg, ParallelDims.from_config(pcfg, world), 1, 12, 2).stages[ctx.pp_rank]
        params = list(model.parameters())
        state = torch.tensor(_local_bytes([t for p in params for k, t in opt.state[p].items() if k != "step"]))
        if ctx.dims.dp > 1:
            dist.all_reduce(state, op=dist.ReduceOp.MAX, group=ctx.group("dp"))
        got = {"params": _storage_bytes(params), "optimizer": int(state)}
        want = {"params": plan.params, "optimizer": plan.optimizer}
        assert got == want, (name, got, want)
        assert plan.grads == plan.params  # a gradient has its parameter's local shape and dtype


def streamed_init(rank: int, world: int, layouts: dict[str, dict]) -> None:
    """Meta-device initialisation in each layout (ParallelConfig keys) gives exactly the single-process weights
    (and buffers), holds at most this rank's shard plus the largest full parameter while doing it, and then trains
    like the single-process model: parameters after 2 AdamW steps (tolerances above)."""
    import dataclasses

    from parallel import pipeline_schedule
    from parallel.init import build_model
    from parallel.mesh import ParallelContext, ParallelDims
    from tests.memory_tracking import LiveStorage

    mcfg, moecfg = tiny_model_configs()
    moecfg = dataclasses.replace(moecfg, shared_experts=1)
    mcfg = dataclasses.replace(mcfg, num_layers=4)
    one = ParallelContext(ParallelDims(tp=1, ep=1, pp=1, dp=1), 0, torch.device("cpu"))
    ref_model = build_model(mcfg, moecfg, one, seed=7)
    full_bytes = sum(4 * p.numel() for p in ref_model.parameters())
    largest = max(4 * p.numel() for p in ref_model.parameters())
    for name, keys in layouts.items():
        ctx = init_parallel(ParallelConfig(**keys), "cpu")
        with LiveStorage() as live:
            par = build_model(mcfg, moecfg, ctx, seed=7)
        shard = _storage_bytes(par.parameters()) + sum(b.untyped_storage().nbytes() for b in par.buffers())
        # 4 KiB: small temporaries (the mesh coordinate, RoPE tables, buffers to_empty makes and the init replaces).
        bound = shard + largest + 4096
        assert live.peak <= bound < full_bytes, (name, live.peak, shard, largest, full_bytes)
        ref = copy.deepcopy(ref_model)
        got = full_tensors(par)
        for pname, want in ref.named_parameters():
            if pname in got:  # a pipeline stage holds its own layers
                assert torch.equal(got[pname], want), (name, pname)
        seen = [None] * world
        dist.all_gather_object(seen, sorted(got))
        assert set().union(*map(set, seen)) == {n for n, _ in ref.named_parameters()}, name
        ref_buffers = dict(ref.named_buffers())
        for bname, b in par.named_buffers():
            assert torch.equal(b, ref_buffers[bname]), (name, bname)

        optim_cfg = OptimConfig(lr=1e-2, weight_decay=0.1, eps=ADAM_EPS)
        opt_ref, opt_par = build_optimizer(ref, optim_cfg), build_optimizer(par, optim_cfg)
        sync, sched, dp = GradSync(par, ctx), pipeline_schedule(par, ctx), ctx.dims.dp
        g = torch.Generator().manual_seed(1)
        for step in range(2):
            batch = torch.randint(0, mcfg.vocab_size, (2 * dp, 13), generator=g)
            mine = list(batch.chunk(dp)[ctx.dp_rank].split(1))
            r = train_step(ref, opt_ref, list(batch.split(1)), clip_grad=0.05)
            p = train_step(par, opt_par, mine, clip_grad=0.05, grad_sync=sync, pipeline=sched)
            _close(f"{name} step {step} grad norm", p.grad_norm, r.grad_norm)
        ref_params = dict(ref.named_parameters())
        for pname, t in full_tensors(par).items():
            _close(f"{name} param {pname} after 2 steps", t, ref_params[pname].detach(), PARAM_RTOL, PARAM_ATOL)
