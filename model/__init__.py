"""Plain single-device MoE++ / MoE decoder (no torch.distributed in this package)."""

from model.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from model.moe import MoELayer, RoutingStats
from model.transformer import Decoder, ModelOutput

__all__ = [
    "ConfigError",
    "Decoder",
    "MoEConfig",
    "MoELayer",
    "ModelConfig",
    "ModelOutput",
    "RouterConfig",
    "RoutingStats",
]
