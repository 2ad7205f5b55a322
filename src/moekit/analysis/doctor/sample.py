"""The routing sample the doctor's load checks read: builtin-corpus text routed through the
model with `moekit.analysis.routing` (the one routing trace), summed per MoE layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.analysis.doctor.check import Check, not_applicable
from moekit.model_dir import ModelDir

if TYPE_CHECKING:
    from moekit.config import ModelConfig

SAMPLE_BATCH = 8  # rows per forward pass
DENSE = "the model is dense (no MoE layer)"


@dataclass
class RoutingSample:
    """What routing a sample of text through the model measured, per MoE layer.

    tokens: tokens routed; copies: routed copies per expert (inference routing is dropless);
    entropy: mean routing entropy in nats; logits_dtypes: the dtypes the router logits were
    computed in; top_k: experts per token (K)."""

    tokens: int
    copies: dict[int, list[int]]
    entropy: dict[int, float]
    logits_dtypes: set[str]
    top_k: int

    def words(self) -> str:
        """How the evidence sentences name the sample."""
        return f"on {self.tokens:,} tokens of builtin-corpus text"


def measure_routing(
    model_dir: Path, cfg: ModelConfig, *, tokens: int, seq_len: int, device: str | None
) -> RoutingSample | str:
    """Route `tokens` tokens of builtin-corpus text (its four domains in equal parts) through
    the model in rows of `seq_len`, with inference routing; the reason it could not when it
    cannot (no tokenizer, a tokenizer of another model, weights that do not load)."""
    from moekit.analysis.routing import (
        check_vocabulary,
        copies_per_token,
        sample_tokens,
        trace_routing,
    )
    from moekit.data.corpus import DOMAINS, builtin_corpus
    from moekit.data.tokenizer import Tokenizer
    from moekit.model_dir import load_model
    from moekit.runtime import resolve_device

    assert cfg.moe is not None
    device = str(resolve_device(device))
    if not ModelDir(model_dir).tokenizer_path.is_file():
        return f"{model_dir} has no {ModelDir.TOKENIZER} to encode the sample text with"
    # ~4 characters per token for a small BPE; twice that leaves room for larger vocabularies.
    chars = max(20_000, 8 * math.ceil(tokens / len(DOMAINS)))
    try:
        tokenizer = Tokenizer.load(model_dir)
        check_vocabulary(tokenizer, cfg.vocab_size, model_dir)
        model = load_model(model_dir, device=device)
        sample = sample_tokens(builtin_corpus(max_chars_per_domain=chars), tokenizer, tokens)
        trace = trace_routing(model, sample.ids, seq_len=seq_len, batch_size=SAMPLE_BATCH)
    except (ValueError, FileNotFoundError) as e:
        return f"the model could not be run ({e})"
    layers = sorted(trace.layers)
    return RoutingSample(
        tokens=trace.tokens,
        copies={i: trace.counts(i).tolist() for i in layers},
        entropy={i: trace.mean_entropy(i) for i in layers},
        logits_dtypes=trace.logits_dtypes,
        top_k=copies_per_token(cfg.moe),
    )


def unmeasured(name: str, why: str) -> Check:
    """The outcome of a routing check when the sample could not be measured: not applicable
    to a dense model, else a warning that says why."""
    if why == DENSE:
        return not_applicable(name, why)
    return Check(
        name,
        "warning",
        f"routing was not measured: {why}.",
        "Give the model directory its tokenizer.json and weights that load "
        "(moekit.load_model) so the routing checks can run.",
        {"applicable": True, "measured": False},
    )
