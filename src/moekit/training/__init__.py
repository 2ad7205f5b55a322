"""Training: run configs, the trainer, checkpoints, metrics and the MoE-vs-dense comparison."""

from moekit.training.config import RunConfig, TrainConfig, resolve_run_config
from moekit.training.trainer import TrainResult, train

__all__ = ["RunConfig", "TrainConfig", "TrainResult", "resolve_run_config", "train"]
