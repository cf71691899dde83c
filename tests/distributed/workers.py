"""Process bodies for the multi-process tests (importable, so torch.multiprocessing can spawn them)."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist

from model.config import ModelConfig, MoEConfig
from model.transformer import Decoder
from parallel import parallelize
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.config import ParallelConfig
from parallel.grads import GradSync, full_tensors
from parallel.mesh import init_parallel
from train.config import OptimConfig
from train.optim import build_optimizer
from train.step import lm_loss, loss_context, train_step

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


def _reduce_and_compare_grads(par, ref, ctx, sync: GradSync) -> dict[str, torch.Tensor]:
    """Reduce the parallel model's gradients and compare every one with the reference's; returns the latter."""
    sync.reduce()
    grads = full_tensors(par, ctx, grads=True)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
    for name, want in ref_grads.items():
        _close(f"grad {name}", grads[name], want)
    return ref_grads


def equivalence(
    rank: int, world: int, tp: int, ep: int, capacity: float | None, steps: int, sp: bool = False, ac: str = "none"
) -> None:
    ctx = init_parallel(ParallelConfig(tp=tp, ep=ep, sequence_parallel=sp), "cpu")
    dp = ctx.dims.dp
    mcfg, moecfg = tiny_model_configs(capacity=capacity)
    torch.manual_seed(0)
    ref = Decoder(mcfg, moecfg)
    par = parallelize(copy.deepcopy(ref), ctx)
    apply_activation_checkpointing(par, ac)
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

    # Optimizer steps: the reference sees the dp shards as micro-batches (same per-micro-batch statistics).
    optim_cfg = OptimConfig(lr=1e-2, weight_decay=0.1, eps=ADAM_EPS)
    opt_ref, opt_par = build_optimizer(ref, optim_cfg), build_optimizer(par, optim_cfg)
    for step in range(1, steps + 1):
        r = train_step(ref, opt_ref, shards[step], clip_grad=0.05)
        p = train_step(par, opt_par, [shards[step][mine]], clip_grad=0.05, grad_sync=sync)
        _close(f"step {step} grad norm", p.grad_norm, r.grad_norm)
    params = full_tensors(par, ctx)
    for name, want in ref.named_parameters():
        _close(f"param {name} after {steps} steps", params[name], want.detach(), PARAM_RTOL, PARAM_ATOL)


def a2a_volume(rank: int, world: int) -> None:
    """All-to-all bytes of an MoE++ model = FFN share x those of the vanilla twin, over the ep group."""
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(rank))
    results = {}
    for vanilla in (False, True):
        mcfg, moecfg = tiny_model_configs(vanilla=vanilla)
        torch.manual_seed(0)
        model = parallelize(Decoder(mcfg, moecfg), ctx)
        out = model(tokens)
        sent = torch.tensor([s.stats.bytes_sent for s in out.moe_layers])
        received = torch.tensor([s.stats.bytes_received for s in out.moe_layers])
        ffn = torch.stack([s.stats.expert_counts_E[: moecfg.num_experts].sum() for s in out.moe_layers])
        total = torch.tensor([s.stats.num_tokens * moecfg.top_k for s in out.moe_layers])
        for t in (sent, received, ffn, total):
            dist.all_reduce(t, group=ctx.group("ep"))
        assert torch.equal(sent, received)
        results[vanilla] = (sent, ffn, total)
    sent_pp, ffn_pp, total_pp = results[False]
    sent_van, ffn_van, total_van = results[True]
    assert torch.equal(ffn_van, total_van)  # vanilla: every assignment is an FFN assignment
    assert (ffn_pp < total_pp).all()  # MoE++ sent some tokens to zero-computation experts
    # bytes_pp / bytes_vanilla == ffn_pp / total_pp, exactly, in integers
    assert torch.equal(sent_pp * total_pp, sent_van * ffn_pp), (sent_pp, sent_van, ffn_pp, total_pp)


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
    from parallel.expert_parallel import apply_expert_parallel

    apply_expert_parallel(par, ctx.group("ep"))
    x = torch.rand(6, 16, generator=torch.Generator().manual_seed(rank)) + 0.1  # positive: experts 0, 1 win
    xs = [torch.rand(6, 16, generator=torch.Generator().manual_seed(r)) + 0.1 for r in range(world)]
    ref_out = [ref(xi, None)[0] for xi in xs]
    (torch.stack(ref_out).square().sum() / world).backward()
    out, _, _, stats = par(x, None)
    assert stats.expert_counts_E[:2].sum() == 12 and stats.expert_counts_E[2:].sum() == 0
    _close("output", out, ref_out[rank].detach())
    out.square().sum().backward()
    GradSync(par, ctx).reduce()
    grads = full_tensors(par, ctx, grads=True)
    for name, p in ref.named_parameters():
        _close(f"grad {name}", grads[name], p.grad)


def _fixed_tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))


def _full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens).logits_BSV
    return (logits.full_tensor() if hasattr(logits, "full_tensor") else logits).detach()


def save_layout(rank: int, world: int, tp: int, ep: int, ckpt_dir: str) -> None:
    """One training step in this layout, then a DCP checkpoint and the full logits it gives (logits.pt)."""
    import dataclasses
    from pathlib import Path

    from train.checkpoint import Checkpointer

    ctx = init_parallel(ParallelConfig(tp=tp, ep=ep), "cpu")
    mcfg, moecfg = tiny_model_configs()
    torch.manual_seed(0)
    model = parallelize(Decoder(mcfg, moecfg), ctx)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    batch = torch.randint(0, 64, (2 * ctx.dims.dp, 13), generator=torch.Generator().manual_seed(3))
    train_step(model, opt, [batch.chunk(ctx.dims.dp)[ctx.dp_rank]], 1.0, grad_sync=GradSync(model, ctx))
    meta = {"consumed_samples": 0, "config": {"model": dataclasses.asdict(mcfg), "moe": dataclasses.asdict(moecfg)}}
    Checkpointer(Path(ckpt_dir), ctx, keep_last=1).save(1, model, opt, meta)
    logits = _full_logits(model, _fixed_tokens())
    if rank == 0:
        torch.save(logits, Path(ckpt_dir) / "logits.pt")


def load_layout(rank: int, world: int, tp: int, ep: int, ckpt_dir: str) -> None:
    """A differently initialised model in another layout loads the checkpoint and gives the same logits; its
    optimizer state is the saved one too (the next step matches a step taken from the saved layout's state)."""
    from pathlib import Path

    from train.checkpoint import load_training_state

    ctx = init_parallel(ParallelConfig(tp=tp, ep=ep), "cpu")
    mcfg, moecfg = tiny_model_configs()
    torch.manual_seed(123)  # different weights: everything must come from the checkpoint
    model = parallelize(Decoder(mcfg, moecfg), ctx)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    meta = load_training_state(Path(ckpt_dir) / "step_00000001", model, opt, ctx)
    assert meta["step"] == 1
    _close("logits after reload", _full_logits(model, _fixed_tokens()), torch.load(Path(ckpt_dir) / "logits.pt"))
    steps = {float(s["step"]) for s in opt.state.values()}
    assert steps == {1.0}, steps


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
    ac: str = "none",
    global_balance: bool = False,
) -> None:
    """Pipeline stages (1F1B, 3 micro-batches per rank) against the single-process model: loss, balance loss,
    every gradient and the parameters after 3 steps. global_balance: the balance loss takes f from the step's
    micro-batches so far (a stage runs later micro-batches' forwards before an earlier one's backward) and the
    aux-free bias moves after each step."""
    import dataclasses

    from model.config import BalanceTerm
    from parallel import pipeline_schedule

    ctx = init_parallel(ParallelConfig(pp=pp, tp=tp, ep=ep, pp_layers=pp_layers), "cpu")
    dp, n_micro = ctx.dims.dp, 3
    mcfg, moecfg = tiny_model_configs(vanilla=vanilla)
    mcfg = dataclasses.replace(mcfg, num_layers=num_layers)
    moecfg = dataclasses.replace(moecfg, every_n_layers=every_n)
    if global_balance:
        moecfg.balance_scope = "global_batch"
        moecfg.balance = [BalanceTerm("heterogeneous", 0.01), BalanceTerm("aux_free_bias", 0.01)]
    torch.manual_seed(0)
    ref = Decoder(mcfg, moecfg)
    par = parallelize(copy.deepcopy(ref), ctx)
    apply_activation_checkpointing(par, ac)
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
    values = torch.stack([stage.ce_sum, stage.aux_sum]) / n_micro
    dist.all_reduce(values, group=ctx.group("pp"))  # CE lives on the last stage, L_b on every stage
    if dp > 1:
        dist.all_reduce(values, group=ctx.group("dp"))
        values /= dp
    _close("loss", values[0], ce_ref / (dp * n_micro))
    _close("balance loss", values[1], bal_ref / (dp * n_micro))
    sync.reduce()
    grads = full_tensors(par, ctx, grads=True)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert set(grads) <= set(ref_grads)
    for name, got in grads.items():
        _close(f"grad {name}", got, ref_grads[name])
    seen = [None] * world
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
    params = full_tensors(par, ctx)
    ref_params = dict(ref.named_parameters())
    for name, got in params.items():
        _close(f"param {name} after 3 steps", got, ref_params[name].detach(), PARAM_RTOL, PARAM_ATOL)


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


def router_family(rank: int, world: int, tp: int, ep: int, sp: bool, variant: str, ac: str = "none") -> None:
    """The parallel model on its data-parallel shard against the single-process model on the concatenated batch:
    with global-batch balance the mean of the ranks' losses is the whole batch's loss, ETR's expert choice ranks the
    whole data-parallel batch's tokens, and the aux-free bias moves by the whole step's load."""
    from model.router import Router
    from train.step import after_optimizer_step

    ctx = init_parallel(ParallelConfig(tp=tp, ep=ep, sequence_parallel=sp), "cpu")
    dp = ctx.dims.dp
    mcfg, moecfg = router_family_configs(variant)
    torch.manual_seed(0)
    ref = Decoder(mcfg, moecfg)
    par = parallelize(copy.deepcopy(ref), ctx)
    apply_activation_checkpointing(par, ac)
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


def memory_plan_matches_tensors(rank: int, world: int, layouts: dict[str, dict]) -> None:
    """The memory plan's parameters, gradients and AdamW state of this rank's pipeline stage equal the bytes of the
    local tensors after parallelize and one optimizer step, for each layout (ParallelConfig keys)."""
    import dataclasses

    from parallel import pipeline_schedule
    from parallel.memory import Layout, plan_memory

    for name, keys in layouts.items():
        pcfg = ParallelConfig(**keys)
        ctx = init_parallel(pcfg, "cpu")
        mcfg, moecfg = tiny_model_configs()
        moecfg = dataclasses.replace(moecfg, shared_experts=1)  # shared experts are tensor-parallel too
        mcfg = dataclasses.replace(mcfg, num_layers=4)
        torch.manual_seed(0)
        model = parallelize(Decoder(mcfg, moecfg), ctx)
        opt = build_optimizer(model, OptimConfig(lr=1e-2))
        tokens = torch.randint(0, mcfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(rank))
        sched = pipeline_schedule(model, ctx)
        train_step(model, opt, list(tokens.split(1)), 1.0, grad_sync=GradSync(model, ctx), pipeline=sched)
        plan = plan_memory(mcfg, moecfg, Layout.from_config(pcfg, world), 1, 12, 2).stages[ctx.pp_rank]
        params = list(model.parameters())
        state = [t for p in params for k, t in opt.state[p].items() if k != "step"]
        got = {"params": _local_bytes(params), "optimizer": _local_bytes(state)}
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
        shard = _local_bytes(par.parameters()) + sum(b.untyped_storage().nbytes() for b in par.buffers())
        # 4 KiB: small temporaries (the mesh coordinate, RoPE tables, buffers to_empty makes and the init replaces).
        bound = shard + largest + 4096
        assert live.peak <= bound < full_bytes, (name, live.peak, shard, largest, full_bytes)
        ref = copy.deepcopy(ref_model)
        got = full_tensors(par, ctx)
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
        for pname, t in full_tensors(par, ctx).items():
            _close(f"{name} param {pname} after 2 steps", t, ref_params[pname].detach(), PARAM_RTOL, PARAM_ATOL)
