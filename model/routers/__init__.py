"""Routers: one class per policy behind the interface of model/routers/base.py.

| file | what |
|---|---|
| `base.py` | `Router` (the interface and the forward every policy shares), `RouterOutput` |
| `moepp.py` | `MoEppRouter`: joint softmax over FFN and zero-computation experts, gating residual, gate conventions |
| `topk.py` | `TopKRouter`: vanilla top-k, Mixtral gating |
| `etr.py` | `EtrRouter`: Expert-Token Resonance (GrAP cosine affinity, expert choice, capacity schedule) |
| `capacity.py` | MoE++'s heterogeneous token-choice capacity and expert choice |
| `statistics.py` | balance statistics and terms, the step's routing totals |
| `comm.py` | `RouterComm`: the reductions and the gather a router needs from other ranks (identity in one process) |
"""

from __future__ import annotations

from model.config import MoEConfig
from model.routers.base import Router, RouterOutput
from model.routers.comm import RouterComm
from model.routers.etr import EtrRouter
from model.routers.moepp import MoEppRouter
from model.routers.topk import TopKRouter

__all__ = ["EtrRouter", "MoEppRouter", "Router", "RouterComm", "RouterOutput", "TopKRouter", "build_router"]


def build_router(hidden_size: int, cfg: MoEConfig, has_residual: bool) -> Router:
    """The router of `cfg.router.kind` for one MoE layer; has_residual: it receives the previous MoE layer's logits."""
    kind = cfg.router.kind
    if kind == "etr":
        if has_residual:
            raise ValueError("the etr router has no gating residual; build its layer with has_residual=False")
        return EtrRouter(hidden_size, cfg)
    if kind == "topk":
        return TopKRouter(hidden_size, cfg, has_residual)
    return MoEppRouter(hidden_size, cfg, has_residual)
