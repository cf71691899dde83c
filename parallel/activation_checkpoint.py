"""Activation checkpointing (`train.activation_checkpointing`): regions of the model keep only their inputs for
the backward pass and recompute the rest there.

- `full`: every decoder block (its inputs: the residual stream and, after an MoE layer, the router logits that
  feed the next gating residual);
- `moe`: the FFN experts of every MoE layer (between dispatch and combine, so no all-to-all is recomputed);
- `attention`: the attention of every block (after its norm);
- `none`: nothing.

Built on torch.utils.checkpoint without reentrant autograd. Applied to the plain model after the rest of
`parallel/` (tensor, expert, pipeline parallelism), by swapping each region's class for a subclass whose forward
runs the original one under checkpoint: parameter names, state dicts and module hooks stay as they were, so
checkpoints, gradient reduction and FSDP see the same model. A recomputed `full` block re-runs its expert-parallel
all-to-alls, on every rank of the group in the same backward order (the graph is the same on every rank, and early
stopping is off, so every rank recomputes the whole block). Router side effects (step accumulators, the
global-batch all-reduce, ETR's all-gather) run once per forward: model/recompute.py replays them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from model.experts import FFNExperts
from model.recompute import Tape
from model.transformer import Attention, Block

MODES = ("none", "full", "moe", "attention")
_REGION = {"full": Block, "moe": FFNExperts, "attention": Attention}


def apply_activation_checkpointing(model: nn.Module, mode: str) -> list[str]:
    """Checkpoint the regions `mode` names, in place; returns their module names."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return []
    region = _REGION[mode]
    names = []
    for name, module in model.named_modules():
        if isinstance(module, region) and not is_checkpointed(module):
            module.__class__ = _checkpointed_class(type(module))
            names.append(name)
    return names


def is_checkpointed(module: nn.Module) -> bool:
    return getattr(type(module), "_checkpointed_forward_of", None) is not None


@functools.cache
def _checkpointed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of cls whose forward is cls.forward under non-reentrant checkpoint."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing is saved, nothing to recompute
            return cls.forward(self, *args, **kwargs)
        tape = Tape()
        # Early stopping would end a recomputation after its last saved tensor; off, every rank recomputes the
        # whole region, so the collectives inside it run the same on all ranks whatever a rank's data.
        with set_checkpoint_early_stop(False):
            return checkpoint(
                cls.forward,
                self,
                *args,
                use_reentrant=False,
                context_fn=lambda: (tape.recording(), tape.replaying()),
                **kwargs,
            )

    return type(
        f"Checkpointed{cls.__name__}",
        (cls,),
        {"forward": forward, "_checkpointed_forward_of": cls, "__module__": __name__},
    )
