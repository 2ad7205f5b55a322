"""The `finetune` section of a run config, and its `lora` part (plain data: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.validate import ConfigBase, check_field_types, fail

METHODS = ("lora", "full", "esft")


DEFAULT_TARGETS = ["*.attn.w*", "*.ffn.experts.*", "*.ffn.shared.*", "*.ffn.w_*"]


@dataclass(kw_only=True)
class LoRAConfig(ConfigBase):
    """rank, alpha (the update is scaled by alpha / rank), dropout on the adapter's input,
    targets (patterns over weight names), experts (which routed experts get adapters; None:
    all)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    experts: list[int] | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        owner = "LoRAConfig"
        if self.rank < 1:
            raise fail(owner, "rank", self.rank, "must be >= 1")
        if self.alpha <= 0:
            raise fail(owner, "alpha", self.alpha, "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise fail(owner, "dropout", self.dropout, "must be in [0, 1)")
        if not self.targets or any(not isinstance(t, str) or not t for t in self.targets):
            raise fail(owner, "targets", self.targets, "must be non-empty name patterns")
        if self.experts is not None and (
            not self.experts or any(not isinstance(e, int) or e < 0 for e in self.experts)
        ):
            raise fail(
                owner, "experts", self.experts, "must be a non-empty list of expert indices (>= 0)"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


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
