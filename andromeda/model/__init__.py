"""The model: `ModelConfig` (plain data) and `Transformer` (built from it)."""

from andromeda.model.config import ModelConfig, apply_overrides
from andromeda.model.transformer import Transformer, build_model, count_parameters

__all__ = ["ModelConfig", "Transformer", "apply_overrides", "build_model", "count_parameters"]
