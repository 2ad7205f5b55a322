"""Routing as the transformers library does it: the routing trace of a Hugging Face checkpoint
run by transformers itself, in the same `RoutingTrace` format moekit's own trace fills.

Each MoE block of a transformers MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2,
DeepSeek-V3, dots.llm1; gpt-oss) calls its router module `model.layers.N.mlp.gate`
(`mlp.router`), which returns the router logits, the chosen experts' weights and the chosen
experts (Llama 4's, `model.layers.N.feed_forward.router`, returns every expert's weight, zero
but for the chosen, and the logits it chose the top-k of). A forward hook on each of those
records what the library itself chose, so nothing about the routing is computed a second
time here except the selection margin (from the recorded logits, as
`moekit.analysis.routing.selection_margin`). transformers is imported inside the functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from moekit.analysis.routing import (
    RoutingTrace,
    TraceRecorder,
    cut_rows,
    selection_margin,
    selection_scores,
)

if TYPE_CHECKING:
    from moekit.config import ModelConfig

# The router module of MoE layer N in every supported architecture.
_GATE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp\.(?:gate|router)|feed_forward\.router)$")


def load_hf_model(directory: str | Path, device: str | torch.device, *, quiet: bool = False) -> Any:
    """The checkpoint in `directory` as transformers' own causal LM, in its stored dtype and in
    eval mode on `device` (`quiet`: without transformers' loading progress bar). ValueError
    when transformers is missing or cannot load it."""
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"{directory} is a Hugging Face checkpoint, and reading it with transformers needs "
            "the transformers package (pip install transformers)"
        ) from None
    from transformers.utils import logging

    bar = logging.is_progress_bar_enabled()
    if quiet:
        logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto")
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"transformers cannot load {directory}: {e}") from None
    finally:
        if bar:
            logging.enable_progress_bar()
    return model.to(device).eval()  # type: ignore[arg-type]


def router_modules(model: Any) -> dict[int, Any]:
    """{layer index: router module} of a transformers MoE model, in layer order."""
    found = {}
    for name, module in model.named_modules():
        m = _GATE.search(name)
        if m is not None:
            found[int(m.group(1))] = module
    return dict(sorted(found.items()))


@torch.no_grad()
def trace_hf_routing(
    model: Any,
    cfg: ModelConfig,
    ids: Tensor,
    *,
    seq_len: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> RoutingTrace:
    """Run token ids `ids` (N,) through the transformers model `model` and record each MoE
    layer's routing, with weights and selection margins, as `trace_routing(scores=True)` does
    for a moekit model. `cfg` is the moekit config of the same checkpoint (its MoE layers,
    experts and score function). The rows are cut as `trace_routing` cuts them. ValueError
    when the model's routers are not where `cfg` puts them or do not report their choice."""
    assert cfg.moe is not None  # the caller checked the model routes
    gates = router_modules(model)
    if list(gates) != list(cfg.moe_layers):
        raise ValueError(
            f"the transformers model has routers in layers {list(gates)}, but its config "
            f"makes layers {list(cfg.moe_layers)} MoE layers"
        )
    seq_len = min(seq_len, cfg.max_seq_len)
    k, score_func = cfg.moe.top_k, cfg.moe.score_func
    recorder = TraceRecorder(
        list(gates), cfg.moe.num_experts, batch_size=batch_size, seq_len=seq_len
    )
    seen: dict[int, tuple[Tensor, ...]] = {}

    def hook(layer: int) -> Callable[[Any, Any, Any], None]:
        def record(module: Any, args: Any, output: Any) -> None:
            if isinstance(output, tuple) and len(output) == 2:  # Llama 4: (scores_TE, logits)
                scores, logits = output
                experts = torch.topk(logits, k, dim=-1).indices  # as the router itself chose
                output = (logits, scores.gather(-1, experts), experts)
            if not (isinstance(output, tuple) and len(output) == 3):
                raise ValueError(
                    f"the router {type(module).__name__} of layer {layer} does not return "
                    "(logits, weights, experts); this transformers version is not supported"
                )
            seen[layer] = output

        return record

    handles = [g.register_forward_hook(hook(i)) for i, g in gates.items()]
    device = next(model.parameters()).device
    try:
        done, n = 0, ids.numel()
        for batch in cut_rows(ids, seq_len, batch_size):
            rows, length = batch.shape
            seen.clear()
            model(input_ids=batch.to(device), use_cache=False)
            for i, gate in gates.items():
                logits, weights, experts = seen[i]
                recorder.dtypes.add(str(logits.dtype).removeprefix("torch."))
                bias = getattr(gate, "e_score_correction_bias", None)
                choice = selection_scores(logits, score_func, bias)
                probs = choice if score_func == "softmax" else _normalised(logits.float().sigmoid())
                recorder.add(
                    i,
                    rows,
                    experts.long(),
                    probs,
                    weights=weights,
                    margin=selection_margin(choice, k),
                )
            recorder.end_batch(rows, length)
            done += batch.numel()
            if progress is not None:
                progress(done, n)
    finally:
        for h in handles:
            h.remove()
    return recorder.build()


def _normalised(scores: Tensor) -> Tensor:
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
