"""Run configuration: model, data and training sections, from YAML/JSON plus dotted overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig
from moekit.data.config import DataConfig
from moekit.finetune.config import FinetuneConfig
from moekit.finetune.expert_edit import check_editable
from moekit.model_dir import ModelDir
from moekit.training.errors import NothingToResumeError
from moekit.training.grow import added, check_event_groups, parse_grow
from moekit.validate import ConfigBase, check_field_types, check_non_negative, check_positive, fail

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(kw_only=True)
class TrainConfig(ConfigBase):
    """Optimisation, evaluation, logging and checkpointing of a training run.

    One optimizer step sees `batch_size * grad_accum` rows of `seq_len` tokens. The learning
    rate warms up linearly over `warmup_steps` and then follows a cosine to
    `lr * min_lr_ratio` at `max_steps`.
    """

    max_steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 20  # per validation set (overall and each domain)
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2  # checkpoints kept in train_state/
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    precision: str = "auto"  # "auto": bf16 autocast where the device supports it, else fp32
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    samples: list[str] = field(default_factory=lambda: ["def ", "The ", "12 + 7 = ", '{"name": '])
    sample_tokens: int = 48
    init_from: str | None = None  # a model directory whose weights start the run
    # Expert-parallel size on several processes (`moekit train --nproc P --ep N`): each MoE
    # layer's experts split over N processes; the rest of the processes are data parallel.
    ep: int = 1
    # Data parallelism on several processes: "fsdp" (FSDP2: weights, gradients and optimizer
    # state sharded) or "ddp" (replicated; for where FSDP2 does not run).
    data_parallel: str = "fsdp"
    # Experts added during the run (moekit.training.grow): "STEP:add=N" or "STEP:split=E,F".
    grow: list[str] = field(default_factory=list)
    grow_noise: float = 0.01  # multiplicative noise on the copies
    recycle_dead_every: int = 0  # > 0: every this many steps, dead experts become copies
    recycle_dead_below: float = 0.1  # dead: fewer routed copies than this share of the fair one

    def __post_init__(self) -> None:
        check_field_types(self)
        owner = "TrainConfig"
        check_positive(
            owner,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            grad_accum=self.grad_accum,
            lr=self.lr,
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
            log_every=self.log_every,
            save_every=self.save_every,
            keep_last=self.keep_last,
            max_nonfinite=self.max_nonfinite,
            ep=self.ep,
        )
        parse_grow(self.grow)  # a malformed spec is named
        check_non_negative(
            owner,
            grow_noise=self.grow_noise,
            recycle_dead_every=self.recycle_dead_every,
            recycle_dead_below=self.recycle_dead_below,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            min_lr_ratio=self.min_lr_ratio,
            sample_tokens=self.sample_tokens,
        )
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise fail(owner, name, getattr(self, name), "must be in [0, 1)")
        if self.min_lr_ratio > 1:
            raise fail(owner, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.data_parallel not in ("fsdp", "ddp"):
            raise fail(owner, "data_parallel", self.data_parallel, "must be 'fsdp' or 'ddp'")
        if self.precision not in PRECISIONS:
            raise fail(owner, "precision", self.precision, f"must be one of {PRECISIONS}")
        if not isinstance(self.samples, list) or any(
            not isinstance(s, str) or not s for s in self.samples
        ):
            raise fail(owner, "samples", self.samples, "must be a list of non-empty prompts")


@dataclass(kw_only=True)
class RunConfig(ConfigBase):
    """Everything a training run needs; written to the run directory as run.json."""

    _nested = {  # noqa: RUF012
        "model": ModelConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "finetune": FinetuneConfig,
    }

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig | None = None  # set: fine-tune `finetune.base` instead of pre-train

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise fail(
                "TrainConfig", "seq_len", self.train.seq_len,
                f"must be <= model.max_seq_len ({self.model.max_seq_len})",
            )  # fmt: skip
        if self.finetune is not None and self.train.init_from is not None:
            raise fail(
                "TrainConfig", "init_from", self.train.init_from,
                "is for continued pre-training; a fine-tuning run starts from finetune.base "
                f"({self.finetune.base})",
            )  # fmt: skip
        self._check_growth()

    def _check_growth(self) -> None:
        """Experts added or recycled during the run need experts, pre-training, and events
        that keep a valid config (checked here, not at the step they fall due)."""
        tc = self.train
        if not (tc.grow or tc.recycle_dead_every):
            return
        name = "grow" if tc.grow else "recycle_dead_every"
        if self.model.moe is None:
            raise fail("TrainConfig", name, getattr(tc, name), "needs a model with experts")
        if self.finetune is not None:
            raise fail("TrainConfig", name, getattr(tc, name), "is for pre-training runs")
        try:
            check_editable(self.model, "the model")
        except ValueError as e:
            raise fail("TrainConfig", name, getattr(tc, name), str(e)) from None
        n, groups = self.model.moe.num_experts, self.model.moe.num_groups
        for event in parse_grow(tc.grow):
            bad = [e for e in event.split if not 0 <= e < n]
            if bad or len(set(event.split)) != len(event.split):
                raise fail("TrainConfig", "grow", tc.grow,
                           f"step {event.step} splits {list(event.split)}: give distinct "
                           f"experts of the {n} there are then")  # fmt: skip
            if event.add > n:
                raise fail("TrainConfig", "grow", tc.grow,
                           f"step {event.step} adds {event.add} copies of the busiest of {n} "
                           "experts: at most one each")  # fmt: skip
            try:  # a hierarchical model's groups stay equal
                check_event_groups(event, self.model.moe, n)
            except ValueError as e:
                raise fail("TrainConfig", "grow", tc.grow, f"step {event.step}: {e}") from None
            n += added(event)
            if n % groups:
                raise fail("TrainConfig", "grow", tc.grow,
                           f"step {event.step} makes {n} experts, which num_groups={groups} "
                           "does not divide")  # fmt: skip
            try:  # whatever else the MoE config asks of its expert count
                dataclasses.replace(self.model.moe, num_experts=n)
            except ValueError as e:
                raise fail("TrainConfig", "grow", tc.grow,
                           f"step {event.step} makes {n} experts: {e}") from None  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "train": self.train.to_dict(),
        }
        if self.finetune is not None:
            out["finetune"] = self.finetune.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise TypeError(f"run config: expected an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"model", "data", "train", "finetune"})
        if unknown:
            raise ValueError(
                f"run config: unknown section(s) {', '.join(unknown)}; sections are model, "
                "data, train, finetune"
            )
        if "model" not in data:
            raise ValueError("run config: a 'model' section (or a preset) is required")
        return cls(
            model=ModelConfig.from_dict(data["model"]),
            data=DataConfig.from_dict(data.get("data") or {}),
            train=TrainConfig.from_dict(data.get("train") or {}),
            finetune=FinetuneConfig.from_dict(data["finetune"]) if data.get("finetune") else None,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON (.json) file as a dict."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {p}: use .yaml, .yml or .json")
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"config file {p} could not be parsed: {e}") from e
    except Exception as e:  # yaml.YAMLError without importing yaml at module level
        raise ValueError(f"config file {p} could not be parsed: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping with model/data/train sections")
    return data


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside `tp` (e.g. `MoEConfig | None` -> MoEConfig), if any."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _parse_value(text: str, tp: Any, key: str) -> Any:
    """Convert an override's text to the field's type: int, float, bool, str, None, a list."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        tp = next(a for a in args if a is not type(None))
    try:
        if tp is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        value = json.loads(text)  # lists and whole sections, written as JSON
        if typing.get_origin(tp) is list and not isinstance(value, list):
            raise ValueError("expected a JSON list")
        return value
    except (ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"override {key}={text!r}: {e}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` overrides (any depth, e.g. `model.moe.num_experts=16`).

    Keys are checked against the config dataclasses, values converted to the field's type.
    `model.moe=null` makes a dense model. Returns a new dict.
    """
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        parts = key.split(".")
        cls: type | None = RunConfig
        node: dict[str, Any] = out
        path: list[str] = []
        for i, part in enumerate(parts):
            assert cls is not None
            types_ = _field_types(cls)
            if part not in types_ or part.startswith("_"):
                known = ", ".join(sorted(n for n in types_ if not n.startswith("_")))
                where = ".".join(path) or "the run config"
                raise ValueError(f"override {key}: {where} has no field {part!r}; fields: {known}")
            path.append(part)
            if i == len(parts) - 1:
                node[part] = _parse_value(text, types_[part], key)
                break
            cls = _dataclass_in(types_[part])
            if cls is None:
                raise ValueError(f"override {key}: {'.'.join(path)} is not a section")
            if node.get(part) is None:
                if part == "moe":
                    raise ValueError(
                        f"override {key}: model.moe is not set (a dense model); start from an "
                        "MoE preset or config"
                    )
                node[part] = {}
            node = node[part]
    return out


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipes() -> list[str]:
    """The names of the run configs shipped with moekit (e.g. "demo")."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def config_path(config: str | Path) -> Path:
    """A config file: `config` itself when it exists, else the shipped recipe of that name."""
    path = Path(config)
    if path.exists():
        return path
    recipe = RECIPES / f"{config}.yaml"
    if recipe.is_file():
        return recipe
    raise FileNotFoundError(
        f"config {str(config)!r} is neither a file nor a built-in recipe ({', '.join(recipes())})"
    )


def resolve_run_config(
    *,
    config_file: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Build a RunConfig: the preset's model (if any), then the file, then the overrides.

    `config_file` is a YAML/JSON file or the name of a shipped recipe (`recipes()`, e.g.
    "demo"). A config file may name a preset itself (a top-level `preset:` key); `preset` wins
    over it. Its model section is merged over the preset's, field by field. Without a preset
    or a model section, a run with `train.init_from` takes that model directory's model.
    """
    data: dict[str, Any] = {}
    file_data = read_config_file(config_path(config_file)) if config_file is not None else {}
    file_preset = file_data.pop("preset", None)
    preset = preset or file_preset
    if preset is not None:
        from moekit.presets import get_preset

        data["model"] = get_preset(preset).to_dict()
    if file_data:
        for section, values in file_data.items():
            if section == "model" and preset is not None and isinstance(values, dict):
                data["model"] = _merge(data["model"], values)
            else:
                data[section] = values
    if "model" not in data:
        train = apply_overrides(data, overrides or []).get("train")
        init_from = train.get("init_from") if isinstance(train, dict) else None
        if isinstance(init_from, str):
            data["model"] = ModelDir(init_from).require_model("train.init_from").config().to_dict()
    data = apply_overrides(data, overrides or [])
    return RunConfig.from_dict(data)


FINETUNE_TRAIN_DEFAULTS = {
    "max_steps": 200,
    "batch_size": 8,
    "lr": 2e-4,
    "warmup_steps": 20,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.0,
    "eval_every": 50,
    "eval_batches": 20,
    "log_every": 10,
    "save_every": 100,
}


def finetune_run_config(
    base: str | Path,
    data: str | Path,
    *,
    method: str = "lora",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """The run config to fine-tune the model directory `base` on the examples in `data`:
    its model section is the base model's own; train defaults suit fine-tuning (a lower
    learning rate, fewer steps); a config file and dotted overrides apply on top."""
    base_cfg = ModelDir(base).require_model("finetune.base").config()
    seq_len = min(256, base_cfg.max_seq_len)
    out: dict[str, Any] = {
        "model": base_cfg.to_dict(),
        "train": {**FINETUNE_TRAIN_DEFAULTS, "seq_len": seq_len},
        "finetune": {"base": str(base), "data": str(data), "method": method},
    }
    if config_file is not None:
        for section, values in read_config_file(config_file).items():
            if section == "model":
                raise ValueError("a fine-tuning config cannot change the model section")
            out[section] = (
                _merge(out.get(section, {}), values) if isinstance(values, dict) else values
            )
    return RunConfig.from_dict(apply_overrides(out, overrides or []))


def resume_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config of the run in `run_dir` (its run.json) with `overrides` applied: what a
    resumed run continues with (`train(cfg, run_dir, resume=True)`)."""
    path = ModelDir(run_dir) / ModelDir.RUN_CONFIG
    if not path.exists():
        raise NothingToResumeError(Path(run_dir), f"no run (no {ModelDir.RUN_CONFIG})")
    return RunConfig.from_dict(apply_overrides(read_config_file(path), overrides or []))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
