"""Shared pieces of the Hugging Face conversion tests (no tests here): tiny models saved as real checkpoints, greedy
decoding with our own model, and loading an export with transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from data.config import DataConfig
from model.config import ModelConfig, MoEConfig, RouterConfig
from model.transformer import Decoder
from tools.hf.checkpoint_io import world_of_one
from train.checkpoint import Checkpointer
from train.config import Config
from train.optim import build_optimizer

# Before transformers is imported (it reads this once): the tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

# fp32 logits of the export against our model: the modeling file repeats our arithmetic, so the two agree to
# rounding (measured 0.0 for the MoE++ layouts, 6e-8 for Mixtral, whose RoPE tables are computed in fp32).
ATOL = RTOL = 1e-5
VOCAB = 96


def tiny(
    zc: tuple[int, int, int] = (1, 1, 2),
    convention: str = "release",
    every_n_layers: int = 1,
    residual: bool = True,
    **moe_fields,
) -> tuple[ModelConfig, MoEConfig]:
    """3 layers, GQA (4 heads / 2 kv heads), expert width 24 != dense width 48; zc = zero/copy/constant experts."""
    router = RouterConfig(
        gate_convention=convention,
        logits_std_norm=moe_fields.pop("logits_std_norm", False),
        two_layer=moe_fields.pop("two_layer", False),
    )
    model = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=32
    )
    moe = MoEConfig(
        num_experts=moe_fields.pop("num_experts", 4),
        num_zero_experts=zc[0],
        num_copy_experts=zc[1],
        num_constant_experts=zc[2],
        expert_ffn_hidden_size=24,
        every_n_layers=every_n_layers,
        gating_residual=residual,
        router=router,
        **moe_fields,
    )
    return model, moe


def spiced(model: Decoder) -> Decoder:
    """Sharper routers and a strong gating residual than a fresh init gives, so that routing decisions (and so any
    mistake in the router, the residual or the zero-computation experts) change the logits visibly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router.wg" in name:
                p.mul_(8.0)
            elif "gate_map" in name:
                p.normal_(0.0, 0.5)
    return model


def save_run(run_dir: Path, model_cfg: ModelConfig, moe_cfg: MoEConfig, tokenizer: Path | None = None) -> Decoder:
    """A run directory with one checkpoint (step 7) of a seeded, spiced model, as the trainer writes it."""
    torch.manual_seed(0)
    model = spiced(Decoder(model_cfg, moe_cfg))
    cfg = Config(model=model_cfg, moe=moe_cfg, data=DataConfig(tokenizer=str(tokenizer) if tokenizer else None))
    meta = {"consumed_samples": 0, "config": cfg.to_dict()}
    Checkpointer(run_dir / "checkpoints", world_of_one(), keep_last=1).save(
        7, model, build_optimizer(model, cfg.optim), meta
    )
    return model.eval()


def tokens(batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy(model: Decoder, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by a full forward of our model over the whole sequence at every step (no cache)."""
    seq = prompt
    for _ in range(new_tokens):
        seq = torch.cat([seq, model(seq).logits_BSV[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def load_hf(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def routed_experts(model: Decoder, x: torch.Tensor) -> set[int]:
    """Experts any token of x was routed to in any MoE layer."""
    with torch.no_grad():
        out = model(x)
    return {e for aux in out.moe_layers for e, n in enumerate(aux.stats.expert_counts_E.tolist()) if n}
