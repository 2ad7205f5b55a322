"""What `moekit analyze` measures, as typed records: `Analysis` and its sections.

`Analysis.to_dict()` is analysis.json (layers and experts keyed by their index as a string)
and `Analysis.from_dict` reads it back, so a saved analysis can be compared, re-plotted or
re-rendered without running the model again. Each field's meaning is in docs/analysis.md.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ANALYSIS_JSON = "analysis.json"


@dataclass(frozen=True)
class ModelSection:
    """The analysed model: layers, which are MoE, experts and how they are chosen."""

    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    router: str
    score_func: str


@dataclass(frozen=True)
class DataSection:
    """The text that was analysed, and how it was cut into forward calls."""

    source: str
    tokens: int
    tokens_per_domain: dict[str, int]
    max_tokens: int
    seq_len: int
    batch_size: int
    seed: int


@dataclass(frozen=True)
class GroupLoad:
    """Hierarchical routing: how one layer's copies spread over its expert groups, by the
    rule of `LayerLoad` (a group's copies are those of its experts; a token that picks a group
    sends it `top_k // group_top_k` copies). dead: groups that received no copy."""

    copies_per_group: list[int]
    share: list[float]
    imbalance: float
    cv: float
    dead: list[int]


@dataclass(frozen=True)
class LayerLoad:
    """One MoE layer's load (`moekit.analysis.routing.LoadStats`), router entropy and the
    copies a capacity factor would drop (None for expert choice, which drops none)."""

    tokens_per_expert: list[int]
    share: list[float]
    imbalance: float
    cv: float
    dead: list[int]
    nearly_dead: list[int]
    entropy: float
    entropy_max: float
    entropy_normalized: float
    dropped: int | None
    dropped_fraction: float | None
    groups: GroupLoad | None = None  # hierarchical routing only


@dataclass(frozen=True)
class LoadSection:
    capacity_factor: float
    capacity_priority: str
    nearly_dead_fraction: float
    note: str
    layers: dict[int, LayerLoad]


@dataclass(frozen=True)
class LayerSpecialisation:
    """NMI of (expert, label) against its shuffled-label baseline; `distribution`: (label x
    expert) share of each label's expert choices."""

    nmi: float
    mi_bits: float
    baseline_mean: float
    baseline_std: float
    excess: float
    distribution: list[list[float]]


@dataclass(frozen=True)
class LabelSpecialisation:
    """Specialisation by one kind of label (token class or domain): the labels, the tokens
    that carry each, and the score per MoE layer."""

    labels: list[str]
    tokens: list[int]
    layers: dict[int, LayerSpecialisation]

    @property
    def chance(self) -> float:
        """How high the score reaches by chance: the largest shuffled-label mean + 2 standard
        deviations over the layers (a score above it is specialisation, not noise)."""
        return max(v.baseline_mean + 2 * v.baseline_std for v in self.layers.values())


@dataclass(frozen=True)
class SpecialisationSection:
    score: str
    observations: str
    shuffles: int
    # JSON keys "class" and "domain" ("class" is no Python name).
    by_class: LabelSpecialisation = field(metadata={"json": "class"})
    by_domain: LabelSpecialisation = field(metadata={"json": "domain"})


@dataclass(frozen=True)
class TokenCount:
    """A token routed to an expert: `count` times out of its `occurrences` in the sample."""

    token: str
    id: int
    count: int
    occurrences: int
    share: float


@dataclass(frozen=True)
class ExpertTokens:
    expert: int
    copies: int
    by_count: list[TokenCount]
    distinctive: list[TokenCount]


@dataclass(frozen=True)
class TopTokensSection:
    layer: int
    min_occurrences: int
    experts: list[ExpertTokens]


@dataclass(frozen=True)
class LayerConsistency:
    paraphrase_jaccard: float
    unrelated_jaccard: float | None
    paraphrase_weighted: float
    unrelated_weighted: float | None
    same_category_weighted: float | None


@dataclass(frozen=True)
class CategoryConsistency:
    """The weighted overlap of a category's paraphrase pairs, per MoE layer."""

    pairs: int
    layers: dict[int, float]


@dataclass(frozen=True)
class PairGroup:
    """One group of paraphrase pairs (builtin, or the user's file)."""

    pairs: int
    layers: dict[int, LayerConsistency]
    categories: dict[str, CategoryConsistency]


@dataclass(frozen=True)
class ConsistencySection:
    set_measure: str
    weighted_measure: str
    unrelated: str
    same_category: str
    groups: dict[str, PairGroup]


@dataclass(frozen=True)
class ExpertPair:
    """Two experts chosen together by `tokens` tokens (`share` of all tokens);
    `conditional`: P(second | first)."""

    experts: list[int]
    tokens: int
    share: float
    conditional: float


@dataclass(frozen=True)
class LayerCoactivation:
    counts: list[list[int]]
    conditional: list[list[float]]
    top_pairs: list[ExpertPair]


@dataclass(frozen=True)
class CoactivationSection:
    conditional: str
    uniform_conditional: float
    uniform_pair_share: float
    layers: dict[int, LayerCoactivation]


@dataclass(frozen=True)
class Analysis:
    """Everything `moekit analyze` measured on one model; `to_dict()` is analysis.json."""

    model_dir: str
    moekit_version: str
    model: ModelSection
    data: DataSection
    load: LoadSection
    specialisation: SpecialisationSection
    top_tokens: TopTokensSection
    consistency: ConsistencySection
    coactivation: CoactivationSection
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of analysis.json (integer keys written as strings)."""
        out: dict[str, Any] = _plain(self)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Analysis:
        """The `Analysis` an analysis.json object holds (the inverse of `to_dict`)."""
        return _typed(cls, data)

    @classmethod
    def read(cls, out_dir: str | Path) -> Analysis:
        """The analysis saved in `out_dir` (its analysis.json)."""
        return cls.from_dict(json.loads((Path(out_dir) / ANALYSIS_JSON).read_text()))


def _plain(value: Any) -> Any:
    """Dataclasses, dicts and lists as JSON values: fields under their JSON keys, keys as
    strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.metadata.get("json", f.name): _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _typed(tp: Any, value: Any) -> Any:
    """`value` (parsed JSON) as the type `tp`, following the dataclasses' annotations."""
    if value is None:
        return None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(
            **{
                f.name: _typed(hints[f.name], value[f.metadata.get("json", f.name)])
                for f in dataclasses.fields(tp)
                # a field added later, with a default, may be missing from an older file
                if f.metadata.get("json", f.name) in value or not _has_default(f)
            }
        )
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is types.UnionType or origin is typing.Union:
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(inner, value)
    if origin is dict:
        return {_typed(args[0], k): _typed(args[1], v) for k, v in value.items()}
    if origin is list:
        return [_typed(args[0], v) for v in value]
    if tp is int:
        return int(value)
    if tp is float:
        return float(value)
    return value
