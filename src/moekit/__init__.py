"""moekit: build, train, fine-tune, inspect, convert and serve Mixture-of-Experts models.

The public API is this module's names; each loads its module on first use, so `import moekit`
stays fast (torch is imported only when a name that needs it is touched):

    from moekit import get_preset, build_model, count_params       # configs and models
    from moekit import load_model, save_model, ModelDir             # model directories
    from moekit import RunConfig, resolve_run_config, train         # training
    from moekit import Generator, SamplingParams                     # generation
    from moekit import analyze, diagnose, compare_routing           # looking inside
    from moekit import import_hf, export_hf, upcycle                # conversion
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.presets import get_preset, list_presets
from moekit.version import __version__

if TYPE_CHECKING:
    from moekit.analysis.analyze import analyze
    from moekit.analysis.compare_routing import compare_routing
    from moekit.analysis.doctor import diagnose
    from moekit.finetune.upcycle import upcycle
    from moekit.infer.generate import Generator
    from moekit.infer.sampling import SamplingParams
    from moekit.interop.hf import export_hf, import_hf
    from moekit.model import build_model
    from moekit.model_dir import ModelDir, load_model, save_model
    from moekit.params import count_params
    from moekit.training.config import RunConfig, resolve_run_config
    from moekit.training.trainer import train

# name -> the module that defines it, imported on first access.
_LAZY = {
    "build_model": "moekit.model",
    "count_params": "moekit.params",
    "ModelDir": "moekit.model_dir",
    "load_model": "moekit.model_dir",
    "save_model": "moekit.model_dir",
    "RunConfig": "moekit.training.config",
    "resolve_run_config": "moekit.training.config",
    "train": "moekit.training.trainer",
    "Generator": "moekit.infer.generate",
    "SamplingParams": "moekit.infer.sampling",
    "analyze": "moekit.analysis.analyze",
    "compare_routing": "moekit.analysis.compare_routing",
    "diagnose": "moekit.analysis.doctor",
    "import_hf": "moekit.interop.hf",
    "export_hf": "moekit.interop.hf",
    "upcycle": "moekit.finetune.upcycle",
}

__all__ = [
    "AttentionConfig",
    "Generator",
    "MoEConfig",
    "ModelConfig",
    "ModelDir",
    "RunConfig",
    "SamplingParams",
    "__version__",
    "analyze",
    "build_model",
    "compare_routing",
    "count_params",
    "diagnose",
    "export_hf",
    "get_preset",
    "import_hf",
    "list_presets",
    "load_model",
    "resolve_run_config",
    "save_model",
    "train",
    "upcycle",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
