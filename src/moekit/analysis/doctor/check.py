"""What a doctor check returns (`Check`), how statuses compare, and the small helpers the
check modules share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from moekit.config import ModelConfig

Status = Literal["ok", "warning", "problem"]
STATUSES: tuple[Status, ...] = ("ok", "warning", "problem")


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    name: a stable identifier ("dead_experts"); status: "ok", "warning" or "problem";
    evidence: a sentence with the numbers that led to the status; advice: what to do (empty
    when there is nothing to do); data: the numbers behind the evidence, for `--json`.
    """

    name: str
    status: Status
    evidence: str
    advice: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Check.status={self.status!r} is invalid: one of {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        """The check as one JSON object (name, status, evidence, advice, data)."""
        return {
            "name": self.name,
            "status": self.status,
            "evidence": self.evidence,
            "advice": self.advice,
            "data": self.data,
        }


def not_applicable(name: str, why: str) -> Check:
    """An ok check that did not apply to the model, saying why (`data["applicable"]` False)."""
    return Check(name, "ok", f"not applicable: {why}", data={"applicable": False})


def worst_status(checks: Iterable[Check]) -> Status:
    """The most serious status among `checks` ("ok" for none)."""
    return max((c.status for c in checks), key=STATUSES.index, default="ok")


def exit_code(checks: Iterable[Check], *, strict: bool = False) -> int:
    """0 when no check found a problem (nor, with `strict`, a warning); 1 otherwise."""
    bad = {"problem", "warning"} if strict else {"problem"}
    return 1 if any(c.status in bad for c in checks) else 0


def ids(items: Sequence[int]) -> str:
    """Expert or layer ids as "0, 3, 5"."""
    return ", ".join(str(i) for i in items)


def pct(x: float) -> str:
    """A fraction as a percentage, with two decimals when it is below 1%."""
    return f"{100 * x:.0f}%" if x >= 0.01 or x == 0 else f"{100 * x:.2f}%"


def moe_layers(cfg: ModelConfig) -> list[int]:
    """The indices of the MoE layers of an MoE model's config."""
    assert cfg.moe is not None
    return [i for i in range(cfg.num_layers) if cfg.moe.is_moe_layer(i)]
