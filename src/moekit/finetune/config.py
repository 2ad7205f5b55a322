"""The `finetune` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.finetune.lora import LoRAConfig
from moekit.validate import ConfigBase, check_field_types, fail

METHODS = ("lora", "full", "esft")


@dataclass(kw_only=True)
class FinetuneConfig(ConfigBase):
    """Fine-tune the model in `base` (a model directory) on `data` (a .jsonl of examples).

    method: "lora" trains low-rank adapters only (`lora`); "full" trains every weight;
    "esft" (expert-specialised fine-tuning) trains only the routed experts that receive most of
    the data's routing weight, per layer the fewest covering `esft_coverage` of it (and the
    attention too with `esft_attention`), everything else frozen.
    """

    _nested = {"lora": LoRAConfig}  # noqa: RUF012

    base: str
    data: str
    method: str = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    esft_coverage: float = 0.5
    esft_attention: bool = False
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig.from_dict(self.lora)
        check_field_types(self)
        owner = "FinetuneConfig"
        if self.method not in METHODS:
            raise fail(owner, "method", self.method, f"must be one of {', '.join(METHODS)}")
        if not 0.0 < self.esft_coverage <= 1.0:
            raise fail(owner, "esft_coverage", self.esft_coverage, "must be in (0, 1]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise fail(owner, "val_fraction", self.val_fraction, "must be in [0, 1)")
