"""`moekit bench topk`: what routing each token to fewer or more experts than the model was
trained with (the per-request `moekit.top_k` of the server, `--experts-per-token` of
`moekit generate`) costs in quality and gains in speed, measured in one run.

For each k: the validation loss on the model's own validation split (as `moekit bench quant`
reads it), top-1 agreement with the trained k's next-token choice on those tokens, greedy
agreement (the share of greedily generated tokens equal to the trained k's before the first
difference), and decode tokens/s at batch 1 through `Generator` (each k's decode step timed
round-robin with the others: the difference between 17 and 1 new tokens, over 16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.bench.quant import same_prefix, validation_rows
from moekit.bench.timing import time_interleaved
from moekit.data.loader import IGNORE_INDEX
from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.model import Transformer
from moekit.model_dir import ModelDir
from moekit.training.step import lm_loss

DECODE_STEPS = 16


@dataclass(frozen=True)
class TopKRow:
    """One k's figures against the trained k."""

    k: int
    val_loss: float
    top1_agreement: float
    greedy_agreement: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class TopKBench:
    model: str
    trained_k: int
    max_k: int
    val_tokens: int
    prompts: int
    new_tokens: int
    rows: list[TopKRow]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def _router_limits(model: Transformer) -> tuple[int, int]:
    """The k the model routes with at decode, and the most its routers can give."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("this model has no MoE layers: there is no top-k to change")
    router: Any = next(iter(layers.values())).router
    trained = getattr(router, "causal_k", None) or router.top_k
    return int(trained), int(router.max_top_k)


@torch.no_grad()
def _loss_and_choices(
    model: Transformer, rows: Tensor, k: int, batch: int = 8
) -> tuple[float, Tensor]:
    """Mean next-token loss over `rows` with every token routed to `k` experts, and the
    argmax choice at every position."""
    total, count, choices = 0.0, 0, []
    for start in range(0, len(rows), batch):
        x = rows[start : start + batch]
        inputs, targets = x[:, :-1], x[:, 1:]
        logits = model(inputs, causal_routing=True, top_k=k).logits
        n = int((targets != IGNORE_INDEX).sum())
        total += float(lm_loss(logits, targets)) * n
        count += n
        choices.append(logits.argmax(-1))
    return total / max(count, 1), torch.cat(choices)


def bench_topk(
    model_dir: str | Path,
    *,
    ks: tuple[int, ...] | None = None,
    val_batches: int = 8,
    prompts: int = 8,
    new_tokens: int = 32,
    repeats: int = 5,
) -> TopKBench:
    """Quality and decode speed of routing to each k in `ks` (default: 1 up to twice the
    trained k, within what the routers allow) against the trained k, for the model in
    `model_dir` (see the module docstring)."""
    src = ModelDir(model_dir).require_model()
    generator = Generator.from_dir(src.path, device="cpu")
    model = generator.model
    trained, most = _router_limits(model)
    ks = ks or tuple(range(1, min(most, 2 * trained) + 1))
    bad = [k for k in ks if not 1 <= k <= most]
    if bad:
        raise ValueError(f"k={bad[0]} is invalid for this model: must be in 1..{most}")
    seq_len = min(256, model.cfg.max_seq_len - 1)
    rows = validation_rows(src, seq_len)[: 8 * val_batches]
    if not len(rows):
        raise ValueError(f"{src}: its data has no validation rows to measure the loss on")
    prompt_ids = [r[:32].tolist() for r in rows[:prompts]]

    def greedy(k: int, new: int, ids: list[list[int]]) -> list[list[int]]:
        params = SamplingParams(
            temperature=0, max_new_tokens=new, experts_per_token=k, ignore_eos=True
        )
        return [c.token_ids for c in generator.generate(ids, params)]

    ref_loss, ref_choices = _loss_and_choices(model, rows, trained)
    ref_greedy = greedy(trained, new_tokens, prompt_ids)
    timed = {}
    for k in ks:
        timed[f"{k}/long"] = lambda k=k: greedy(k, DECODE_STEPS + 1, prompt_ids[:1])
        timed[f"{k}/short"] = lambda k=k: greedy(k, 1, prompt_ids[:1])
    seconds = time_interleaved(timed, repeats)
    out = []
    for k in ks:
        loss, choices, agree = ref_loss, ref_choices, 1.0
        if k != trained:
            loss, choices = _loss_and_choices(model, rows, k)
            agree = same_prefix(greedy(k, new_tokens, prompt_ids), ref_greedy)
        top1 = float((choices == ref_choices).float().mean())
        step = (seconds[f"{k}/long"] - seconds[f"{k}/short"]) / DECODE_STEPS
        out.append(TopKRow(k, loss, top1, agree, 1.0 / step if step > 0 else float("nan")))
    return TopKBench(
        str(src), trained, most, int(rows[:, 1:].numel()), len(prompt_ids), new_tokens, out
    )
