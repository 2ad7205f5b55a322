"""Config tables: how the fields of a Hugging Face config.json map to a `ModelConfig` and back.

An architecture's config table is a tuple of entries, each stating one rule in both directions:

- `Field(hf, ours)`: a value carried across, e.g. `Field("hidden_size", "dim")`; with a default
  for a field the checkpoint may leave out, other spellings (`aliases`) and a `cast`.
- `Fixed({ours: value}, why)`: what the architecture always is (Mixtral routes by softmax top-k):
  import sets it, and export refuses a moekit config that differs, saying `why`.
- `OnImport({ours: value}, why)`: set on import, free on export (DeepSeek-V3's selection bias).
- `Only(hf, allowed, why)`: the values of a Hugging Face setting moekit can represent; any other
  is refused by name on import. `write_value` is what export writes.
- `Const(hf, value)`: written on export, not read (`use_cache: true`).
- `Check(why, ok, fields)`: an export condition across several moekit fields.

Settings that need more than one field on either side (RoPE, the sliding window) are small
`Entry` subclasses. moekit fields are named by dotted paths into `ModelConfig`
("moe.num_experts", "attention.qkv_bias"). Anything a table cannot represent exactly is an
`UnsupportedError` naming the field, never a silent mismatch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moekit.config import ModelConfig

HFConfig = Mapping[str, Any]


class UnsupportedError(ValueError):
    """The checkpoint or model uses something the other side cannot represent exactly."""


def unsupported(name: str, value: Any, why: str) -> UnsupportedError:
    """The error for a Hugging Face setting moekit cannot represent, naming it and its value."""
    return UnsupportedError(f"config.json: {name}={value!r} is not supported: {why}")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a Field default: the checkpoint must state the field


@dataclass(frozen=True)
class SameAs:
    """A Field default: the value of another Hugging Face field (`num_key_value_heads` defaults
    to `num_attention_heads`)."""

    hf: str


def hf_value(
    hf: HFConfig, name: str, aliases: tuple[str, ...] = (), default: Any = REQUIRED
) -> Any:
    """`hf[name]` (or under one of `aliases`), else `default`; a null counts as absent. A missing
    field without a default is an UnsupportedError naming it."""
    for key in (name, *aliases):
        if hf.get(key) is not None:
            return hf[key]
    if isinstance(default, SameAs):
        return hf_value(hf, default.hf)
    if default is REQUIRED:
        raise UnsupportedError(f"config.json has no {name!r}")
    return default


def ours_value(cfg: ModelConfig, path: str) -> Any:
    """The moekit field at dotted `path` ("moe.top_k"); None under a missing `moe`."""
    value: Any = cfg
    for part in path.split("."):
        if value is None:
            return None
        value = getattr(value, part)
    return value


class Entry:
    """One rule of a config table. `read` checks the Hugging Face config and sets moekit fields
    (dotted path -> value) in `ours`; `write` sets Hugging Face fields from a moekit config;
    `problems` says what keeps `cfg` from being written exactly (empty: nothing)."""

    def hf_names(self) -> tuple[str, ...]:
        """The Hugging Face fields it reads or writes."""
        return ()

    def writes_hf(self) -> bool:
        """Whether export writes its `hf_names`."""
        return True

    def ours_paths(self) -> tuple[str, ...]:
        """The moekit fields it sets or checks."""
        return ()

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        pass

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        pass

    def problems(self, cfg: ModelConfig) -> list[str]:
        return []

    def limits(self) -> list[str]:
        """What the rule fixes or refuses, in words (`moekit convert --list`)."""
        return []


@dataclass(frozen=True)
class Field(Entry):
    """Hugging Face field `hf` is moekit field `ours` (one path, or several that all take the
    value; export writes the first). `get` computes the exported value when it is not simply
    the first path's (`cfg.kv_heads`); `imported=False` leaves the moekit field at its default
    on import (export still writes it)."""

    hf: str
    ours: str | tuple[str, ...]
    default: Any = REQUIRED
    aliases: tuple[str, ...] = ()
    cast: Callable[[Any], Any] | None = None
    get: Callable[[ModelConfig], Any] | None = None
    imported: bool = True

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf, *self.aliases)

    def ours_paths(self) -> tuple[str, ...]:
        return (self.ours,) if isinstance(self.ours, str) else self.ours

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        if not self.imported:
            return
        value = hf_value(hf, self.hf, self.aliases, self.default)
        if self.cast is not None and value is not None:
            value = self.cast(value)
        for path in self.ours_paths():
            ours[path] = value

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        hf[self.hf] = self.get(cfg) if self.get else ours_value(cfg, self.ours_paths()[0])


@dataclass(frozen=True)
class Fixed(Entry):
    """The values the architecture always gives these moekit fields: set on import; a config
    with other values is not exported, for the reason `why`."""

    values: Mapping[str, Any]
    why: str

    def ours_paths(self) -> tuple[str, ...]:
        return tuple(self.values)

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        ours.update(self.values)

    def problems(self, cfg: ModelConfig) -> list[str]:
        differs = any(ours_value(cfg, path) != value for path, value in self.values.items())
        return [self.why] if differs else []

    def limits(self) -> list[str]:
        return [self.why]


@dataclass(frozen=True)
class OnImport(Entry):
    """moekit fields an import sets, for the reason `why`, that export does not look at (the
    checkpoint has no field for them)."""

    values: Mapping[str, Any]
    why: str

    def ours_paths(self) -> tuple[str, ...]:
        return tuple(self.values)

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        ours.update(self.values)


_UNSET: Any = object()


@dataclass(frozen=True)
class Only(Entry):
    """The values of Hugging Face field `hf` that moekit represents: `allowed` is a tuple of
    values (an absent field counts as null) or a test `allowed(value, hf)`. Import refuses any
    other value, naming the field and saying `why`; export writes `write_value` when given."""

    hf: str
    allowed: tuple[Any, ...] | Callable[[Any, HFConfig], bool]
    why: str
    write_value: Any = field(default=_UNSET, kw_only=True)

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        value = hf.get(self.hf)
        ok = self.allowed(value, hf) if callable(self.allowed) else value in self.allowed
        if not ok:
            raise unsupported(self.hf, value, self.why)

    def writes_hf(self) -> bool:
        return self.write_value is not _UNSET

    def limits(self) -> list[str]:
        return [f"{self.hf}: {self.why}"]

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        if self.write_value is not _UNSET:
            hf[self.hf] = self.write_value


@dataclass(frozen=True)
class Const(Entry):
    """Hugging Face field `hf` that export writes as `value` and import does not read (it changes
    nothing moekit represents, e.g. `use_cache`)."""

    hf: str
    value: Any

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        hf[self.hf] = self.value


@dataclass(frozen=True)
class Check(Entry):
    """An export condition over the moekit `fields`: when `ok(cfg)` is false the config is not
    exported, for the reason `why`."""

    why: str
    ok: Callable[[ModelConfig], bool]
    fields: tuple[str, ...]

    def ours_paths(self) -> tuple[str, ...]:
        return self.fields

    def problems(self, cfg: ModelConfig) -> list[str]:
        return [] if self.ok(cfg) else [self.why]

    def limits(self) -> list[str]:
        return [self.why]


# ---- settings spread over several fields ------------------------------------------------------


# The settings of each scaled RoPE moekit carries: Hugging Face name -> RopeScalingConfig field.
_SCALING_FIELDS = {
    "yarn": {
        "factor": "factor",
        "original_max_position_embeddings": "original_max_seq_len",
        "beta_fast": "beta_fast",
        "beta_slow": "beta_slow",
        "mscale": "mscale",
        "mscale_all_dim": "mscale_all_dim",
        "attention_factor": "attention_factor",
        "truncate": "truncate",
    },
    "linear": {"factor": "factor"},
    "llama3": {
        "factor": "factor",
        "original_max_position_embeddings": "original_max_seq_len",
        "low_freq_factor": "low_freq_factor",
        "high_freq_factor": "high_freq_factor",
    },
}


class RoPE(Entry):
    """The RoPE base and its scaling, from a config written by transformers 4 (`rope_theta`,
    `rope_scaling`) or 5 (`rope_parameters`; `rope_scaling` wins when both are present, as in
    transformers). YaRN, linear and Llama 3 scaling are carried (`ModelConfig.rope_scaling`);
    dynamic and longrope scaling are refused by name. Export writes `rope_theta` and
    `rope_parameters`, and a scaled model's settings under `rope_scaling` too, for
    transformers 4."""

    def hf_names(self) -> tuple[str, ...]:
        return ("rope_theta", "rope_parameters", "rope_scaling")

    def ours_paths(self) -> tuple[str, ...]:
        return ("rope_theta", "rope_scaling")

    def limits(self) -> list[str]:
        return ["RoPE scaling: yarn, linear and llama3 carried; dynamic and longrope refused"]

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        params = hf.get(where) or {}
        kind_key = "type" if "rope_type" not in params and "type" in params else "rope_type"
        kind = params.get(kind_key) or "default"
        theta: Any = params.get("rope_theta") or hf_value(hf, "rope_theta", default=10000.0)
        ours["rope_theta"] = float(theta)
        if kind == "default":
            ours["rope_scaling"] = None
        elif kind in _SCALING_FIELDS:
            ours["rope_scaling"] = _read_scaling(hf, params, where, kind)
        else:
            raise unsupported(
                f"{where}.{kind_key}",
                kind,
                "moekit implements unscaled RoPE and YaRN, linear and llama3 scaling (dynamic "
                "and longrope scaling are not available)",
            )

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        hf["rope_theta"] = cfg.rope_theta
        params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        scaling = cfg.rope_scaling
        if scaling is not None:
            params["rope_type"] = scaling.kind
            for name, ours in _SCALING_FIELDS[scaling.kind].items():
                value = getattr(scaling, ours)
                if value is not None:
                    params[name] = value
            # transformers 4 reads the base from rope_theta, and warns of it here.
            hf["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        hf["rope_parameters"] = params


def _read_scaling(hf: HFConfig, params: Mapping[str, Any], where: str, kind: str) -> dict[str, Any]:
    """The moekit `rope_scaling` of the settings `params` of scaled RoPE `kind` (found under
    `where`). As in transformers: the pretrained context defaults to max_position_embeddings
    (a top-level `original_max_position_embeddings` wins), a null setting is its default,
    and YaRN's null factor is the ratio of max_position_embeddings to the pretrained context."""
    names = _SCALING_FIELDS[kind]
    unknown = sorted(set(params) - {*names, "rope_type", "type", "rope_theta"})
    if unknown:
        raise unsupported(
            f"{where}.{unknown[0]}",
            params[unknown[0]],
            f"moekit's {kind} scaling does not carry it",
        )
    out = {"kind": kind} | {
        ours: params[name] for name, ours in names.items() if params.get(name) is not None
    }
    if "original_max_seq_len" in names.values():
        context = hf_value(hf, "max_position_embeddings")
        original = hf.get("original_max_position_embeddings") or out.get("original_max_seq_len")
        out["original_max_seq_len"] = original = original or context
        if kind == "yarn" and "factor" not in out:
            out["factor"] = context / original
    if "factor" not in out:
        raise unsupported(f"{where}.factor", None, f"{kind} scaling needs its factor")
    return out


@dataclass(frozen=True)
class SlidingWindow(Entry):
    """Refuse a sliding attention window narrower than the context. moekit attends to the whole
    context (at most `max_position_embeddings` tokens, which generation enforces), so a window
    at least that wide never hides a key and is the same function as full attention; a narrower
    one is not. `enabled(hf)` says whether the architecture applies `sliding_window` (Qwen only
    does with `use_sliding_window`). Export writes no window."""

    enabled: Callable[[HFConfig], bool] = lambda hf: True

    def hf_names(self) -> tuple[str, ...]:
        return ("sliding_window",)

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        window = hf.get("sliding_window")
        if window is None or not self.enabled(hf):
            return
        context = hf_value(hf, "max_position_embeddings")
        if window < context:
            raise unsupported(
                "sliding_window",
                window,
                f"it is narrower than max_position_embeddings={context} and moekit attends to "
                "the full context (a window at least as wide as the context changes nothing "
                "and is accepted)",
            )

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        hf["sliding_window"] = None

    def limits(self) -> list[str]:
        return ["sliding_window: only a window at least as wide as the context (full attention)"]


class HeadDim(Entry):
    """An explicit `head_dim`: kept only when it differs from hidden_size / heads (moekit's
    default), always written on export."""

    def hf_names(self) -> tuple[str, ...]:
        return ("head_dim",)

    def ours_paths(self) -> tuple[str, ...]:
        return ("attention.head_dim",)

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        head_dim = hf.get("head_dim")
        implied = hf_value(hf, "hidden_size") // hf_value(hf, "num_attention_heads")
        ours["attention.head_dim"] = None if head_dim in (None, implied) else int(head_dim)

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        hf["head_dim"] = cfg.head_dim


# ---- layer placement -------------------------------------------------------------------------


def placement(dense: list[int], layers: int, step: int) -> dict[str, Any]:
    """moekit's placement fields for a model of `layers` layers whose dense layers are `dense`,
    in the plainest form: `layer_step` when `dense` is what a step of `step` leaves dense (layer
    i is MoE when `(i + 1) % step == 0`), `first_dense_layers` when they lead, else the list."""
    fields: dict[str, Any] = {
        "moe.first_dense_layers": 0,
        "moe.layer_step": 1,
        "moe.dense_layers": None,
    }
    if dense == [i for i in range(layers) if (i + 1) % step]:
        fields["moe.layer_step"] = step
    elif dense == list(range(len(dense))):
        fields["moe.first_dense_layers"] = len(dense)
    else:
        fields["moe.dense_layers"] = dense
    return fields


def placed_by_step(cfg: ModelConfig) -> bool:
    """Whether `cfg`'s MoE layers are placed by `layer_step` alone (no leading or listed dense
    layers): what a checkpoint's own step setting can state."""
    assert cfg.moe is not None
    return not cfg.moe.first_dense_layers and cfg.moe.dense_layers is None


# ---- a table, both ways ---------------------------------------------------------------------

ConfigTable = tuple[Entry, ...]


def read_config(table: ConfigTable, hf: HFConfig) -> ModelConfig:
    """The ModelConfig the Hugging Face config `hf` describes, by `table`; UnsupportedError
    naming the first setting it cannot represent."""
    ours: dict[str, Any] = {}
    for entry in table:
        entry.read(hf, ours)
    nested: dict[str, Any] = {}
    for path, value in ours.items():
        *parents, leaf = path.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return ModelConfig.from_dict(nested)


def write_config(table: ConfigTable, cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config fields of `cfg` by `table` (check `config_problems` first)."""
    hf: dict[str, Any] = {}
    for entry in table:
        entry.write(cfg, hf)
    return hf


def config_problems(table: ConfigTable, cfg: ModelConfig) -> list[str]:
    """What keeps `table`'s architecture, a Mixture-of-Experts one, from representing `cfg`
    exactly (empty: nothing)."""
    extra = []
    if cfg.irope is not None and not any("irope" in e.ours_paths() for e in table):
        extra.append("it has no interleaved RoPE / NoPE layers or chunked attention (irope)")
    if cfg.moe is None:
        # The MoE rules cannot be judged without MoE settings; the rest still can.
        moe_free = [e for e in table if not any(p.startswith("moe.") for p in e.ours_paths())]
        return [p for e in moe_free for p in e.problems(cfg)] + extra + ["it is dense"]
    return [p for e in table for p in e.problems(cfg)] + extra


def check_table(table: ConfigTable, owner: str) -> None:
    """Raise ValueError unless every moekit field and every Hugging Face field is set by at
    most one entry of `table` (two rules for one field would silently overrule each other)."""
    seen: dict[str, str] = {}
    for entry in table:
        if isinstance(entry, Check):
            continue  # checks only read
        names = [f"ours:{p}" for p in entry.ours_paths()]
        if entry.writes_hf():
            names += [f"hf:{n}" for n in entry.hf_names()]
        for name in names:
            if name in seen:
                raise ValueError(f"{owner}: {name.split(':', 1)[1]} has two rules: {entry!r}")
            seen[name] = repr(entry)


# ---- fragments shared by the tables ------------------------------------------------------------

# What every supported decoder states the same way.
DECODER_FIELDS: ConfigTable = (
    Field("vocab_size", "vocab_size"),
    Field("hidden_size", "dim"),
    Field("num_hidden_layers", "num_layers"),
    Field("num_attention_heads", "num_heads"),
    Field(
        "num_key_value_heads",
        "num_kv_heads",
        default=SameAs("num_attention_heads"),
        get=lambda cfg: cfg.kv_heads,
    ),
    Field("max_position_embeddings", "max_seq_len"),
    Field("rms_norm_eps", "norm_eps", default=1e-6, cast=float),
    Field("tie_word_embeddings", "tie_embeddings", default=False, cast=bool),
    # The weights come with the checkpoint, so its initialisation scale is only written.
    Field("initializer_range", "init_std", imported=False),
    RoPE(),
    Only("hidden_act", ("silu", None), "experts and MLPs are SwiGLU", write_value="silu"),
    Const("attention_dropout", 0.0),
    Const("use_cache", True),
)


@dataclass(frozen=True)
class Without(Entry):
    """moekit options an architecture does not have, each at the value meaning "off" and
    described in words: import sets them so; export names every one a config turns on."""

    label: str
    values: Mapping[str, tuple[Any, str]]  # dotted path -> (its "off" value, what it is)

    def ours_paths(self) -> tuple[str, ...]:
        return tuple(self.values)

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        ours.update({path: value for path, (value, _) in self.values.items()})

    def problems(self, cfg: ModelConfig) -> list[str]:
        return [
            f"{self.label} has no {what} ({path} must be {value!r})"
            for path, (value, what) in self.values.items()
            if ours_value(cfg, path) != value
        ]


def swiglu(label: str) -> Without:
    """SwiGLU experts and plain attention: none of the options gpt-oss adds (its clamped
    SwiGLU, expert and router biases, attention sinks, an output bias, sliding windows)."""
    return Without(
        label,
        {
            "activation": ("swiglu", "activation other than SwiGLU"),
            "moe.expert_bias": (False, "expert biases"),
            "moe.router_bias": (False, "router logit bias"),
            "attention.o_bias": (False, "attention output bias"),
            "attention.sinks": (False, "attention sinks"),
            "attention.sliding_window": (None, "sliding-window attention"),
            "attention.sliding_layers": (None, "sliding-window layers"),
        },
    )


def dropless(label: str, *, input_weighted: bool = False) -> Fixed:
    """Dropless experts, whose routing weight scales their output (or, `input_weighted`,
    their input: Llama 4)."""
    where = "input (scale_expert_input must be true)" if input_weighted else "output"
    return Fixed(
        {"moe.capacity_factor": None, "moe.scale_expert_input": input_weighted},
        f"{label} is dropless (capacity_factor must be null) and weights each expert's {where}",
    )


def plain_routing(label: str) -> Fixed:
    """No expert groups, routed scaling or selection bias (everything but DeepSeek-V3)."""
    return Fixed(
        {
            "moe.num_groups": 1,
            "moe.routed_scaling_factor": 1.0,
            "moe.selection_bias": False,
            "moe.bias_update_rate": 0.0,
        },
        f"{label} has no expert groups, routed scaling or selection bias",
    )


# transformers gives all four of q/k/v/o_proj a bias with `attention_bias: true` (Qwen3-MoE,
# OLMoE); these tables do not carry it (gpt-oss's does, as `qkv_bias` and `o_bias`).
NO_ATTENTION_BIAS = Only(
    "attention_bias",
    (None, False),
    "it gives o_proj a bias too, which moekit carries for gpt-oss only",
    write_value=False,
)
