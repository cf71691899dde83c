"""The training loop: batch -> train_step -> log -> evaluate -> checkpoint."""

from __future__ import annotations

import time
from typing import Any

import torch
import yaml

from data.loader import build_data
from model.transformer import Decoder
from train.checkpoint import save_checkpoint
from train.config import Config
from train.evaluate import evaluate
from train.metrics import MetricsLogger, format_duration, routing_summary
from train.optim import build_optimizer, lr_at, set_lr
from train.step import autocast_context, train_step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda requested but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


def run(cfg: Config) -> dict[str, Any]:
    """Train according to cfg; returns the last logged record plus final evaluation."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model, cfg.moe).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    data = build_data(cfg.data, cfg.train.seed)
    amp = autocast_context(device, cfg.train.dtype)

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / "metrics.jsonl").write_text("")  # a fresh run starts a fresh log

    tc = cfg.train
    tokens_per_step = tc.global_batch_size * cfg.data.seq_len
    valid_batches = [b.to(device) for b in data.valid_batches(tc.micro_batch_size, tc.eval_batches)]
    logger = MetricsLogger(run_dir, tc.max_steps, progress_bar=cfg.logging.progress_bar)
    floor = data.corpus.entropy_per_token if data.corpus is not None else None
    logger.write(
        f"{cfg.name}: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(active_only=True) / 1e6:.2f}M "
        f"active at most), {tc.max_steps} steps x {tokens_per_step} tokens on {device}"
        + (f"; synthetic corpus, loss floor {floor:.4f} nats" if floor is not None else "")
    )

    model.train()
    consumed = 0
    record: dict[str, Any] = {}
    interval_start, interval_steps = time.perf_counter(), 0
    for step in range(1, tc.max_steps + 1):
        lr = lr_at(step - 1, cfg.optim, tc.max_steps)
        set_lr(optimizer, lr)
        batch = data.global_batch(consumed, tc.global_batch_size).to(device)
        consumed += tc.global_batch_size
        result = train_step(
            model, optimizer, list(batch.split(tc.micro_batch_size)), cfg.moe.balance_coeff, cfg.optim.clip_grad, amp
        )
        interval_steps += 1
        logger.advance()

        if step % cfg.logging.interval == 0 or step == tc.max_steps:
            elapsed = time.perf_counter() - interval_start  # loss.item() below syncs, so this time is honest
            record = {
                "step": step,
                "loss": result.loss.item(),
                "balance_loss": result.balance_loss.item(),
                "lr": lr,
                "grad_norm": result.grad_norm.item(),
                "tokens_per_s": interval_steps * tokens_per_step / elapsed,
                "consumed_samples": consumed,
            }
            routing = routing_summary(result.routing, cfg.moe)
            if "ffn_per_token" in routing:
                record["ffn_per_token"] = routing["ffn_per_token"]
                record["share_zero_computation"] = routing["share_zero_computation"]
            record["eta_s"] = logger.eta(step)
            if tc.eval_interval and (step % tc.eval_interval == 0 or step == tc.max_steps):
                record.update(evaluate(model, valid_batches, amp, data.corpus))
            record["routing"] = routing["layers"]
            logger.log(record, console=format_line(record, tc.max_steps, floor))
            interval_start, interval_steps = time.perf_counter(), 0

        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step != tc.max_steps:
            _save(cfg, model, optimizer, step, consumed)
    path = _save(cfg, model, optimizer, tc.max_steps, consumed)
    logger.write(f"final checkpoint: {path}")
    logger.close()
    return record


def _save(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, consumed: int):
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    meta = {"consumed_samples": consumed, "config": cfg.to_dict()}
    return save_checkpoint(cfg.checkpoint_dir, step, state, meta, cfg.checkpoint.keep_last)


def format_line(r: dict[str, Any], max_steps: int, floor: float | None) -> str:
    parts = [f"step {r['step']:>6}/{max_steps}", f"loss {r['loss']:.4f}"]
    if floor is not None:
        parts.append(f"(floor {floor:.3f})")
    parts += [f"lr {r['lr']:.2e}", f"tok/s {r['tokens_per_s']:,.0f}"]
    if "ffn_per_token" in r:
        parts.append(f"ffn/tok {r['ffn_per_token']:.2f}")
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}")
    if "ffn_per_token_easy" in r:
        parts.append(f"ffn/tok easy {r['ffn_per_token_easy']:.2f} hard {r['ffn_per_token_hard']:.2f}")
    parts.append(f"eta {format_duration(r['eta_s'])}" if r["eta_s"] == r["eta_s"] else "eta ?")
    return " | ".join(parts)
