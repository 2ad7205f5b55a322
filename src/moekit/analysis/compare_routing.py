"""`moekit compare-routing`: do two models that should agree pick the same experts?

Each side is a moekit model directory (any that `load_model` reads: float32, another dtype,
quantised, a fine-tuned run with its adapter merged), an adapter directory (run/adapter/,
applied unmerged to the base model it records), or a Hugging Face checkpoint, which the
transformers library itself runs. The text is tokenized once and both sides run the same token
ids in the same rows; one side is loaded, traced and freed before the other, so the two models
are never in memory together. The measures are those of `moekit.analysis.routing_parity`.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.analysis.analyze import text_documents
from moekit.analysis.routing import (
    RoutingTrace,
    check_vocabulary,
    copies_per_token,
    sample_tokens,
    stderr_progress,
    trace_routing,
)
from moekit.analysis.routing_parity import (
    DEFAULT_MARGIN,
    DEFAULT_THRESHOLD,
    MEASURES,
    Agreement,
    compare_traces,
)
from moekit.model_dir import ModelDir
from moekit.runtime import resolve_device

if TYPE_CHECKING:
    from torch import Tensor

    from moekit.config import ModelConfig
    from moekit.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Side:
    """One side of a comparison. kind: "moekit" (a model directory), "adapter" (an adapter
    directory on its `base` model directory) or "transformers" (a Hugging Face checkpoint run
    by transformers)."""

    path: str
    kind: str
    base: str | None = None


@dataclass(frozen=True)
class RoutingComparison:
    """The comparison of two sides on `tokens` token ids of `text`, cut into rows of `seq_len`
    run `batch_size` at a time; `agreement` holds the measures per MoE layer."""

    a: Side
    b: Side
    text: str
    tokens: int
    seq_len: int
    batch_size: int
    num_experts: int
    agreement: Agreement

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "agreement"}
        return {**out, **self.agreement.to_dict(), "measures": MEASURES}


def compare_routing(
    a: str | Path,
    b: str | Path,
    *,
    text: str | Path | None = None,
    tokens: int = 4096,
    seq_len: int = 256,
    batch_size: int = 8,
    margin: float = DEFAULT_MARGIN,
    threshold: float = DEFAULT_THRESHOLD,
    device: str | None = None,
    progress: bool = True,
) -> RoutingComparison:
    """Measure, per MoE layer, how often models `a` and `b` pick the same top-k experts on the
    same text, and the first layer where they diverge.

    `a`, `b`: moekit model directories, adapter directories (applied to the base they
    record) or Hugging Face checkpoints (run by transformers). `text`: a .txt file (or any
    source `DataConfig.source` reads); None for the validation split of the builtin corpus. Up
    to `tokens` tokens, tokenized with `a`'s tokenizer (`b`'s when `a` is a Hugging Face
    checkpoint), run in rows of `seq_len` (at most either model's max_seq_len), `batch_size`
    rows per call, on `device` (default CUDA when available). A token whose top-k choice
    either side made with a selection-score gap below `margin` is a near tie, reported apart;
    the first divergent layer is the first whose set agreement over the other tokens is below
    `threshold`. Progress goes to stderr unless `progress` is False.

    Raises ValueError when the two sides' tokenizers, numbers of experts, experts per token
    or MoE layers differ (naming what differs), for a dense model or a bad argument, and
    FileNotFoundError for a path that holds no model.
    """
    for name, value in (("tokens", tokens), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
    if not (margin >= 0 and 0 <= threshold <= 1):
        raise ValueError(f"margin={margin} must be >= 0 and threshold={threshold} in [0, 1]")
    side_a, cfg_a, tok_dir_a = resolve_side(a, "A")
    side_b, cfg_b, tok_dir_b = resolve_side(b, "B")
    check_same_routing(cfg_a, cfg_b)
    tokenizer = check_same_tokenizer(tok_dir_a, tok_dir_b, prefer_b=side_a.kind == "transformers")
    check_vocabulary(tokenizer, cfg_a.vocab_size, side_a.path)
    check_vocabulary(tokenizer, cfg_b.vocab_size, side_b.path)
    docs, source = text_documents(tok_dir_a, None if text is None else str(text), "text", None)
    ids = sample_tokens(docs, tokenizer, tokens).ids
    seq_len = min(seq_len, cfg_a.max_seq_len, cfg_b.max_seq_len)
    where = str(resolve_device(device))
    traces = [
        trace_side(side, cfg, ids, seq_len=seq_len, batch_size=batch_size, device=where,
                   progress=progress, label=label)
        for side, cfg, label in ((side_a, cfg_a, "A"), (side_b, cfg_b, "B"))
    ]  # fmt: skip
    assert cfg_a.moe is not None  # checked by resolve_side
    return RoutingComparison(
        a=side_a,
        b=side_b,
        text=source,
        tokens=int(ids.numel()),
        seq_len=seq_len,
        batch_size=batch_size,
        num_experts=cfg_a.moe.num_experts,
        agreement=compare_traces(traces[0], traces[1], margin=margin, threshold=threshold),
    )


def resolve_side(path: str | Path, label: str) -> tuple[Side, ModelConfig, Path]:
    """What `path` holds: its `Side`, its model config, and the directory of its tokenizer.
    FileNotFoundError when it holds no model, ValueError for a dense one."""
    from moekit.finetune.lora import ADAPTER_CONFIG, read_adapter_config

    where = Path(path)
    if not where.is_dir():
        raise FileNotFoundError(f"{label}: {where} is not a directory")
    if (where / ADAPTER_CONFIG).is_file():
        base = read_adapter_config(where).get("base_model") or ""
        if not base or not ModelDir(base).is_model():
            raise FileNotFoundError(
                f"{label}: the adapter in {where} records the base model {base!r}, which is not "
                "a model directory here"
            )
        side, cfg, tokenizer_dir = (
            Side(str(where), "adapter", str(base)),
            ModelDir(base).config(),
            Path(base),
        )
    else:
        config = ModelDir(where).require_model(label).config_path
        try:
            raw = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{label}: {config} is not valid JSON ({e})") from None
        if (
            isinstance(raw, dict)
            and "format_version" not in raw
            and ("architectures" in raw or "model_type" in raw)
        ):
            from moekit.interop.hf import architecture_of

            cfg = architecture_of(raw).config_from_hf(raw)
            side, tokenizer_dir = Side(str(where), "transformers"), where
        else:
            side, cfg, tokenizer_dir = Side(str(where), "moekit"), ModelDir(where).config(), where
    if cfg.moe is None or not cfg.moe_layers:
        raise ValueError(f"{label}: {where} holds a dense model (no MoE layers): nothing routes")
    return side, cfg, tokenizer_dir


def check_same_routing(a: ModelConfig, b: ModelConfig) -> None:
    """ValueError naming what differs when the two models' MoE layers, numbers of experts or
    experts per token differ (their routing could not be compared token by token)."""
    assert a.moe is not None and b.moe is not None
    pairs = {
        "number of experts": (a.moe.num_experts, b.moe.num_experts),
        "experts per token": (copies_per_token(a.moe), copies_per_token(b.moe)),
        "MoE layers": (list(a.moe_layers), list(b.moe_layers)),
    }
    differing = [f"{name} {x} in A, {y} in B" for name, (x, y) in pairs.items() if x != y]
    if differing:
        raise ValueError(f"the two models do not route alike: {'; '.join(differing)}")


def check_same_tokenizer(dir_a: Path, dir_b: Path, *, prefer_b: bool = False) -> Tokenizer:
    """The tokenizer of `dir_a` (of `dir_b` with `prefer_b`), once both tokenizers are known
    to give every token the same id; ValueError naming the first ids that differ."""
    from moekit.data.tokenizer import Tokenizer

    tok_a, tok_b = Tokenizer.load(dir_a), Tokenizer.load(dir_b)
    vocab_a = {i: t for t, i in tok_a.backend.get_vocab(with_added_tokens=True).items()}
    vocab_b = {i: t for t, i in tok_b.backend.get_vocab(with_added_tokens=True).items()}
    if len(vocab_a) != len(vocab_b):
        raise ValueError(
            f"the tokenizers differ: {len(vocab_a)} tokens in A ({dir_a}), {len(vocab_b)} in "
            f"B ({dir_b}); both sides must read the same token ids"
        )
    differing = sorted(i for i in vocab_a if vocab_a[i] != vocab_b.get(i))
    if differing:
        shown = ", ".join(
            f"id {i} is {vocab_a[i]!r} in A, {vocab_b.get(i)!r} in B" for i in differing[:3]
        )
        raise ValueError(
            f"the tokenizers differ in {len(differing)} of {len(vocab_a)} tokens ({shown}); "
            "both sides must read the same token ids"
        )
    return tok_b if prefer_b else tok_a


def trace_side(
    side: Side,
    cfg: ModelConfig,
    ids: Tensor,
    *,
    seq_len: int,
    batch_size: int,
    device: str,
    progress: bool,
    label: str,
) -> RoutingTrace:
    """Load one side, trace its routing on `ids` with weights and margins, and free it."""
    report = stderr_progress(f"compare-routing {label}") if progress else None
    if side.kind == "transformers":
        from moekit.analysis.hf_routing import load_hf_model, trace_hf_routing

        hf = load_hf_model(side.path, device, quiet=not progress)
        trace = trace_hf_routing(
            hf, cfg, ids, seq_len=seq_len, batch_size=batch_size, progress=report
        )
        del hf
    else:
        from moekit.model_dir import load_model

        if side.kind == "adapter":
            from moekit.finetune.lora import load_adapted

            assert side.base is not None
            model: Any = load_adapted(side.base, side.path, device=device)
        else:
            model = load_model(side.path, device=device)
        trace = trace_routing(
            model, ids, seq_len=seq_len, batch_size=batch_size, progress=report, scores=True
        )
        del model
    gc.collect()
    return trace
