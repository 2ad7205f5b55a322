"""moekit: build, train, fine-tune, inspect, convert and serve Mixture-of-Experts models."""

__version__ = "0.1.0"

from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.presets import get_preset, list_presets

__all__ = [
    "AttentionConfig",
    "MoEConfig",
    "ModelConfig",
    "__version__",
    "build_model",
    "get_preset",
    "list_presets",
]


def __getattr__(name: str) -> object:
    # Importing torch is slow; `moekit.build_model` pulls it in only when first used.
    if name == "build_model":
        from moekit.nn.transformer import build_model

        return build_model
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
