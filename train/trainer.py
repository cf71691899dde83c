"""The training loop: batch -> train_step -> log -> evaluate -> checkpoint, on one process or a torchrun world."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from data.loader import build_data
from data.packing import DocumentPacking
from model.config import ConfigError
from model.dispatch import AllToAllBytes
from model.errors import UserError
from model.moe import RoutingStats
from model.routers import EtrRouter, Router
from model.transformer import Decoder
from parallel import pipeline_schedule
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.data_parallel import check_mixed_precision
from parallel.grads import GradSync
from parallel.init import build_model
from parallel.mesh import ParallelContext, init_parallel
from train.checkpoint import Checkpointer, load_training_state
from train.checkpoint_meta import check_compatible, find_latest, read_meta
from train.config import Config, micro_batches_per_step
from train.evaluate import evaluate, evaluate_pipeline
from train.flops import device_peak_tflops, flops_per_token, tflops_per_device
from train.memory import PeakMemory, check_fits, device_capacity, plan_for
from train.metrics import MetricsLogger, format_duration, routing_summary
from train.optim import build_optimizer, lr_at, set_lr
from train.signals import ShutdownRequest
from train.step import StepResult, autocast_context, state_is_finite, train_step, use_bf16_autocast


class NonFiniteStateError(RuntimeError):
    """The run stopped on non-finite values (a state that was not saved, or too many non-finite steps in a row);
    the message says which and names the last good checkpoint. Printed as one line by `python -m train`."""


def resolve_device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is visible; use train.device=cpu")
    return name


def reduce_for_logging(ctx: ParallelContext, values: torch.Tensor, routing: list[RoutingStats]) -> list[RoutingStats]:
    """Average `values` over data-parallel ranks in place and sum routing counters over them, so the log shows the
    global batch whatever the layout. Collectives: logging intervals only."""
    if not ctx.distributed:
        return routing
    if ctx.dims.pp > 1:  # the CE lives on the last stage and each stage holds its own layers' balance loss
        dist.all_reduce(values, group=ctx.group("pp"))
    if ctx.dims.dp > 1:
        dist.all_reduce(values, group=ctx.group("dp"))
        values /= ctx.dims.dp
    # Ranks whose MoE layers routed different tokens: data-parallel ranks, and tp ranks under sequence parallelism.
    groups = [g for g, n in (("dp", ctx.dims.dp), ("tp", ctx.dims.tp if ctx.dims.sp else 1)) if n > 1]
    if not routing or not groups:
        return routing
    ranks = ctx.dims.dp * (ctx.dims.tp if ctx.dims.sp else 1)
    counts = torch.stack([torch.cat([s.expert_counts_E, s.dropped.view(1)]) for s in routing])
    # A2A bytes are reported per rank: the mean over those ranks (float64 holds these integers exactly).
    moved = torch.tensor([dataclasses.astuple(s.a2a) for s in routing], dtype=torch.float64, device=values.device)
    for name in groups:
        dist.all_reduce(counts, group=ctx.group(name))
        dist.all_reduce(moved, group=ctx.group(name))
    return [
        RoutingStats(c[:-1], c[-1], s.num_tokens * ranks, AllToAllBytes(*(int(b) // ranks for b in m)))
        for c, s, m in zip(counts, routing, moved.tolist(), strict=True)
    ]


def run(cfg: Config) -> dict[str, Any]:
    """Train according to cfg; returns the last logged record (rank 0's view; every rank returns it)."""
    counts = _param_counts(cfg)
    cfg.data.check_corpus_fits_model(counts[0])
    ctx = init_parallel(cfg.parallel, resolve_device_type(cfg.train.device))
    device = ctx.device
    tc = cfg.train
    if ctx.dims.sharded:
        check_mixed_precision(cfg.parallel.mixed_precision, device.type, use_bf16_autocast(device, tc.dtype))
    n_micro = micro_batches_per_step(cfg, ctx.dims.dp)
    # Before anything is allocated: what each rank will hold, against what its device has.
    plan = plan_for(cfg, ctx.dims.world_size, device.type)
    if ctx.is_logging_rank:
        print(plan.table(), flush=True)
    check_fits(plan, *device_capacity(device))
    torch.manual_seed(tc.seed)
    # Parameters start on the meta device; each rank allocates and initialises only its shard, with values that do
    # not depend on the layout (parallel/init.py).
    model = build_model(cfg.model, cfg.moe, ctx, tc.seed, compile_backend="inductor" if tc.compile else None)
    apply_activation_checkpointing(model, tc.activation_checkpointing)
    pipeline = pipeline_schedule(model, ctx)
    optimizer = build_optimizer(model, cfg.optim)
    grad_sync = GradSync(model, ctx)
    data = build_data(cfg.data, tc.seed, cfg.model.vocab_size)
    documents = cfg.data.packing()
    amp = autocast_context(device, tc.dtype)
    checkpointer = Checkpointer(
        cfg.checkpoint_dir, ctx, cfg.checkpoint.keep_last, cfg.checkpoint.async_, verify=cfg.checkpoint.verify
    )

    start_step, consumed = 0, 0
    resume_from, resume_note = resume_path(cfg)
    if resume_from is not None:
        check_compatible(read_meta(resume_from), cfg.to_dict(), resume_from)
        meta = load_training_state(resume_from, model, optimizer, ctx, verify=cfg.checkpoint.verify)
        start_step, consumed = meta["step"], meta["consumed_samples"]

    run_dir = cfg.run_dir
    if ctx.is_logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(run_dir / "metrics.jsonl", start_step)  # first: it may refuse a damaged file
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    tokens_per_step = tc.global_batch_size * cfg.data.seq_len
    valid_batches = [b.to(device) for b in data.valid_batches(tc.micro_batch_size, tc.eval_batches)]
    logger = MetricsLogger(
        run_dir,
        tc.last_step,  # the ETA and the progress bar count to the step the run stops at
        start_step,
        cfg.logging.progress_bar,
        ctx.is_logging_rank,
        wandb=cfg.logging.wandb,
        run_config=cfg.to_dict(),
        name=cfg.name,
    )
    entropy = data.corpus.entropy_per_token if data.corpus is not None else None
    counts = _param_counts(cfg)
    d = ctx.dims
    if resume_note:
        logger.write(f"resume: {resume_note}")
    logger.write(
        f"{cfg.name}: {counts[0] / 1e6:.2f}M parameters ({counts[1] / 1e6:.2f}M active at most), "
        f"{tc.max_steps} steps x {tokens_per_step} tokens on {device}, world {d.world_size} = "
        f"pp {d.pp} x tp {d.tp} x dp {d.dp} (ep {d.ep}), {d.data_parallel} data parallelism, {n_micro} "
        f"micro-batch(es) of {tc.micro_batch_size} per rank"
        + (f"; synthetic corpus, entropy {entropy:.4f} nats/token" if entropy is not None else "")
        + (f"; {describe_documents(documents)}" if documents is not None else "")
        + (f"; resumed from {resume_from} (step {start_step})" if resume_from is not None else "")
    )

    last_good = resume_from  # the newest checkpoint of a finite state; saving a non-finite one never happens
    result: StepResult | None = None

    def save(step: int) -> bool:
        """Save unless the state is non-finite (then nothing is written, published or pruned)."""
        nonlocal last_good
        if not state_is_finite(model, optimizer, result, ctx.distributed):
            logger.write(f"step {step}: non-finite loss, gradients or model/optimizer state, no checkpoint; {good()}")
            return False
        meta = {"consumed_samples": consumed, "config": cfg.to_dict(), "layout": dataclasses.asdict(d)}
        last_good = checkpointer.save(step, model, optimizer, meta)
        logger.write(f"checkpoint: {last_good}" + (" (writing in the background)" if checkpointer.async_save else ""))
        return True

    def good() -> str:
        return f"the last good checkpoint, {last_good}, is intact" if last_good else "no checkpoint was saved"

    def stop(message: str) -> NonFiniteStateError:
        checkpointer.finish()  # an in-flight save is of a finite state: publish it, so `good()` is true
        return NonFiniteStateError(f"{message}; {good()}; lower optim.lr or check the data, then resume")

    if start_step >= (tc.exit_at_step or tc.max_steps):
        logger.write(
            f"nothing to do: {resume_from} is at step {start_step}; raise train.max_steps to continue or "
            "set train.resume=never to start over"
        )
    shutdown = ShutdownRequest()
    peak_memory = PeakMemory(device, ctx.distributed)
    model.train()
    record: dict[str, Any] = {}
    nonfinite_in_a_row, skipped_total = 0, 0
    interval_start, interval_steps = time.perf_counter(), 0
    last_step = tc.last_step
    step = start_step
    try:
        while step < last_step:
            step += 1
            lr = lr_at(step - 1, cfg.optim, tc.max_steps)
            set_lr(optimizer, lr)
            batch = data.global_batch(consumed, tc.global_batch_size, ctx.dp_rank, d.dp).to(device)
            consumed += tc.global_batch_size
            micro = list(batch.split(tc.micro_batch_size))
            result = train_step(model, optimizer, micro, cfg.optim.clip_grad, amp, grad_sync, pipeline, documents)
            interval_steps += 1
            logger.advance()
            if result.skipped:
                nonfinite_in_a_row, skipped_total = nonfinite_in_a_row + 1, skipped_total + 1
                logger.write(
                    f"step {step}: non-finite loss or gradient norm, update skipped "
                    f"({nonfinite_in_a_row} in a row, {skipped_total} in total)"
                )
                if nonfinite_in_a_row >= tc.max_nonfinite_steps:
                    raise stop(
                        f"train.max_nonfinite_steps: {nonfinite_in_a_row} non-finite steps in a row at step {step}"
                    )
            else:
                nonfinite_in_a_row = 0

            if step % cfg.logging.interval == 0 or step in (tc.max_steps, last_step):
                record = log_step(
                    cfg,
                    ctx,
                    logger,
                    result,
                    step,
                    lr,
                    consumed,
                    skipped_total,
                    interval_steps * tokens_per_step / (time.perf_counter() - interval_start),
                    router_states(model),
                )
                record.update(peak_memory.read())
                if tc.eval_interval and (step % tc.eval_interval == 0 or step == tc.max_steps):
                    if pipeline is not None:
                        record.update(evaluate_pipeline(pipeline, valid_batches, amp, ctx.group("pp"), documents))
                    else:
                        shard = (ctx.tp_rank, d.tp) if d.sp else None
                        record.update(evaluate(model, valid_batches, amp, data.corpus, shard, documents))
                if entropy is not None:  # what a perfect model's expected loss is on this corpus (plots draw it)
                    record["corpus_entropy"] = entropy
                logger.log(record, console=format_line(record, tc.max_steps, entropy))
                interval_start, interval_steps = time.perf_counter(), 0

            if shutdown.requested(ctx.distributed, device):
                logger.write(f"step {step}: {shutdown.signal_name or 'signal on another rank'}, saving and exiting")
                break
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step != last_step:
                save(step)
        if (step > start_step or resume_from is None) and not save(step):
            raise stop(f"train: the state at step {step}, the last of this run, is non-finite and was not saved")
        checkpointer.finish()
    finally:
        shutdown.restore()
        logger.close()
    return record


def describe_documents(documents: DocumentPacking) -> str:
    parts = [
        "attention within documents" if documents.mask_attention else "attention across documents",
        *(["positions reset per document"] if documents.reset_positions else []),
        *(["no loss on EOD -> next document"] if documents.mask_loss else []),
    ]
    return f"EOD {documents.eod_id}: " + ", ".join(parts)


def resume_path(cfg: Config) -> tuple[Path | None, str | None]:
    """train.resume: auto (latest in the checkpoint dir, if any), never, or a step directory; with a note for the
    console when auto did not find what `latest` names (missing or stale: the newest complete step is used)."""
    if cfg.train.resume == "never":
        return None, None
    if cfg.train.resume == "auto":
        return find_latest(cfg.checkpoint_dir)
    return Path(cfg.train.resume), None


def truncate_metrics(path: Path, start_step: int) -> None:
    """Keep the records up to the resumed step (a run that died after its last checkpoint logged further). A last
    line without its newline is a record a kill cut short and goes too; any other line that is not a record is
    refused, naming it, and the file is left as it was."""
    if start_step == 0 or not path.is_file():
        path.write_text("")
        return
    lines = path.read_bytes().split(b"\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        step = _record_step(line)
        if step is None:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not a metrics record; remove the line (or the file) and resume")
        if step <= start_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in kept))
    os.replace(tmp, path)  # a kill while rewriting leaves the old file, never a shorter one


def _record_step(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:  # also undecodable bytes (UnicodeDecodeError)
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def log_step(
    cfg: Config,
    ctx: ParallelContext,
    logger: MetricsLogger,
    result: StepResult,
    step: int,
    lr: float,
    consumed: int,
    skipped_total: int,
    tokens_per_s: float,
    routers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    # Each balance term unweighted, summed over MoE layers, mean over micro-batches (and, below, over dp ranks).
    names = balance_term_names(cfg)
    n_micro = micro_batches_per_step(cfg, ctx.dims.dp)
    zero = result.loss.new_zeros(())
    terms = [sum((s.aux_terms.get(k, zero) for s in result.routing), zero) / n_micro for k in names]
    values = torch.stack([result.loss, result.aux_loss, *terms]).float()
    routing = reduce_for_logging(ctx, values, result.routing)
    loss, aux, *term_values = values.tolist()  # host-device sync, once per logging interval
    record: dict[str, Any] = {
        "step": step,
        "loss": loss if math.isfinite(loss) else None,
        "aux_loss": aux if math.isfinite(aux) else None,
        **{f"balance_{k}": _finite_or_none(v) for k, v in zip(names, term_values, strict=True)},
        "lr": lr,
        "grad_norm": _finite_or_none(result.grad_norm.item()),
        "tokens_per_s": tokens_per_s,
        "consumed_samples": consumed,
        "skipped_steps": skipped_total,
    }
    summary = routing_summary(routing, cfg.moe)
    for layer, state in zip(summary["layers"], routers or [], strict=False):
        layer.update(state)
    if ctx.dims.pp > 1:  # every stage summarised its own layers; the log lists all of them in order
        stages: list = [None] * ctx.dims.pp
        dist.all_gather_object(stages, summary["layers"], group=ctx.group("pp"))
        summary["layers"] = [layer for stage in stages for layer in stage]
        if summary["layers"]:
            n = len(summary["layers"])
            summary["ffn_per_token"] = sum(x["ffn_per_token"] for x in summary["layers"]) / n
            summary["share_zero_computation"] = sum(1 - x["share_ffn"] - x["dropped"] for x in summary["layers"]) / n
    if "ffn_per_token" in summary:
        record["ffn_per_token"] = summary["ffn_per_token"]
        record["share_zero_computation"] = summary["share_zero_computation"]
    # Model FLOPs with each MoE layer's FFN experts per token as this step routed them (MoE++ computes fewer).
    flops = flops_per_token(
        cfg.model, cfg.moe, cfg.data.seq_len, [x["ffn_per_token"] for x in summary["layers"]] or None
    )
    record["tflops"] = tflops_per_device(flops, tokens_per_s, ctx.dims.world_size)
    if (peak := device_peak_tflops(ctx.device, cfg.logging.peak_tflops)) is not None:
        record["mfu"] = record["tflops"] / peak
    record["eta_s"] = logger.eta(step)
    record["routing"] = summary["layers"]
    return record


def router_states(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Between-step router state of this rank's MoE layers, in layer order: the aux-free bias per expert and the
    ETR capacity factor, where the config has them (host-device sync: logging intervals only)."""
    states = []
    for router in (m for m in model.modules() if isinstance(m, Router)):
        state: dict[str, Any] = {}
        if router.bias_rate is not None:
            state["expert_bias"] = router.expert_bias_E.tolist()
        if isinstance(router, EtrRouter) and router.schedule:
            state["etr_capacity_factor"] = float(router.etr_state[0])
        states.append(state)
    return states


def balance_term_names(cfg: Config) -> list[str]:
    """The loss terms the routers compute, in a fixed order (every rank and pipeline stage agrees)."""
    names = [t.kind for t in cfg.moe.balance if t.kind != "aux_free_bias"] if cfg.moe.enabled else []
    if cfg.moe.enabled and cfg.moe.router.kind == "etr" and cfg.moe.router.etr.locality_coeff > 0:
        names.append("locality")
    return names


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _param_counts(cfg: Config) -> tuple[int, int]:
    """(total, active) parameters of the unsharded model, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = Decoder(cfg.model, cfg.moe)
    return model.num_params(), model.num_params(active_only=True)


def format_line(r: dict[str, Any], max_steps: int, entropy: float | None) -> str:
    loss = f"{r['loss']:.4f}" if r["loss"] is not None else "nan"
    parts = [f"step {r['step']:>6}/{max_steps}", f"loss {loss}"]
    if entropy is not None:  # the corpus's entropy rate: a batch's loss can fall below it, the expectation cannot
        parts.append(f"entropy {entropy:.3f}")
    parts += [f"lr {r['lr']:.2e}", f"tok/s {r['tokens_per_s']:,.0f}"]
    if "tflops" in r:
        parts.append(f"TFLOP/s {r['tflops']:.3g}")
    if "mfu" in r:
        parts.append(f"MFU {r['mfu']:.1%}")
    if "ffn_per_token" in r:
        parts.append(f"ffn/tok {r['ffn_per_token']:.2f}")
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}")
    if "ffn_per_token_easy" in r:
        parts.append(f"ffn/tok easy {r['ffn_per_token_easy']:.2f} hard {r['ffn_per_token_hard']:.2f}")
    if "mem_peak_gib" in r:
        reserved = f" ({r['mem_reserved_gib']:.2f} reserved)" if "mem_reserved_gib" in r else ""
        parts.append(f"mem {r['mem_peak_gib']:.2f} GiB{reserved}")
    parts.append(f"eta {format_duration(r['eta_s'])}" if r["eta_s"] == r["eta_s"] else "eta ?")
    return " | ".join(parts)
