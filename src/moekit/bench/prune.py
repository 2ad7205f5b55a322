"""`moekit bench prune`: validation loss, decode speed and weight memory against the number of
experts kept, for each pruning criterion, right after pruning and after a short "heal"
fine-tune, in one run.

The experts are measured once (moekit.analysis.expert_importance) on calibration text from the
model's training split (the builtin corpus', or its run's data), so the validation rows the
loss is measured on stay unseen. Each (criterion, experts kept) model is written with
`moekit experts`' code into OUT/CRITERION-N, then trained `heal_steps` more steps on the run's
data (continued pre-training from it, `train.init_from`) into OUT/CRITERION-N-healed. The
unpruned model gets the same fine-tune (OUT/full-healed), so "after healing" compares like
with like. Decode speed is tokens/s of greedy decoding at batch 1 through `Generator`, each model
timed in this process after the one before it (17 and 1 new tokens round-robin; the
difference over 16).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.expert_importance import CRITERIA, expert_importance
from moekit.analysis.routing import sample_tokens
from moekit.bench.quant import expert_bytes, run_data, validation_rows
from moekit.bench.timing import time_interleaved
from moekit.bench.topk import DECODE_STEPS
from moekit.data.config import DataConfig
from moekit.data.corpus import load_documents, split_documents
from moekit.data.tokenizer import Tokenizer
from moekit.finetune.expert_edit import check_editable, write_edited
from moekit.finetune.group_edit import expert_groups, prune_in_groups
from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.model import Transformer
from moekit.model_dir import ModelDir
from moekit.training.config import RunConfig
from moekit.training.step import eval_loss
from moekit.training.trainer import train


@dataclass(frozen=True)
class PruneRow:
    """One model's figures: `criterion` ("none" for the unpruned model), experts kept per
    layer, validation loss as pruned and after healing, decode tokens/s, expert weight bytes."""

    criterion: str
    experts: int
    val_loss: float
    healed_val_loss: float | None
    decode_tokens_per_s: float
    expert_bytes: int


@dataclass(frozen=True)
class PruneBench:
    model: str
    calibration_tokens: int
    val_tokens: int
    heal_steps: int
    rows: list[PruneRow]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def val_loss(model: Transformer, rows: Tensor) -> float:
    """Mean next-token loss over all of `rows`, as training evaluates."""
    return eval_loss(model.eval(), rows, batch_size=8, max_batches=len(rows))


def _calibration_ids(data: DataConfig, tokenizer: Tokenizer, tokens: int) -> Tensor:
    """Tokens of the training split of `data`, never of its validation split."""
    train_docs, _ = split_documents(load_documents(data), data.val_fraction, data.seed)
    return sample_tokens(train_docs, tokenizer, tokens).ids


def _heal(model_dir: Path, data: DataConfig, out: Path, steps: int, lr: float, seq_len: int,
          batch: int) -> None:  # fmt: skip
    """Continue training the model in `model_dir` on `data` for `steps` steps into `out`."""
    cfg = RunConfig.from_dict(
        {
            "model": ModelDir(model_dir).config().to_dict(),
            "data": data.to_dict(),
            "train": {
                "init_from": str(model_dir), "max_steps": steps, "lr": lr,
                "warmup_steps": max(1, steps // 10), "seq_len": seq_len, "batch_size": batch,
                "eval_every": steps, "eval_batches": 1, "save_every": steps, "keep_last": 1,
                "samples": [],
            },
        }
    )  # fmt: skip
    train(cfg, out, verbose=False)


def bench_prune(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    keep: tuple[int, ...] = (6, 4, 2),
    criteria: tuple[str, ...] = CRITERIA,
    calibration_tokens: int = 16_384,
    val_batches: int = 8,
    heal_steps: int = 100,
    heal_lr: float = 5e-4,
    heal_batch: int = 16,
    repeats: int = 5,
    say: Callable[[str], None] = print,
) -> PruneBench:
    """Prune the model in `model_dir` to each count in `keep` by each criterion, heal each for
    `heal_steps` steps (0: no healing), and measure them all (see the module docstring); the
    models go into `out_dir`."""
    src, out = ModelDir(model_dir).require_model(), Path(out_dir)
    moe = check_editable(src.config(), str(model_dir))
    bad = [n for n in keep if not moe.top_k <= n < moe.num_experts]
    if bad:
        raise ValueError(
            f"keeping {bad[0]} experts is invalid: choose counts in "
            f"{moe.top_k}..{moe.num_experts - 1}"
        )
    groups = expert_groups(moe)
    for n in keep:  # a hierarchical model's groups stay equal: refused before measuring
        prune_in_groups({0: torch.zeros(moe.num_experts)}, n, groups, moe.top_k)
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown:
        raise ValueError(f"criterion {unknown[0]!r} is unknown: choose from {', '.join(CRITERIA)}")
    seq_len = min(256, src.config().max_seq_len - 1)
    rows = validation_rows(src, seq_len)[: 8 * val_batches]
    if not len(rows):
        raise ValueError(f"{src}: its data has no validation rows to measure the loss on")
    tokenizer = Tokenizer.load(src.path)
    data, _ = run_data(src)
    ids = _calibration_ids(data, tokenizer, calibration_tokens)
    say(f"measuring the experts on {ids.numel():,} calibration tokens ...")
    importance = expert_importance(src.load_model(), ids, seq_len=seq_len)
    dirs: dict[tuple[str, int], Path] = {("none", moe.num_experts): src.path}
    for criterion in criteria:
        scores = importance.scores(criterion)
        for n in keep:
            dirs[criterion, n] = out / f"{criterion}-{n}"
            say(f"pruning to {n} experts by {criterion} ...")
            write_edited(
                src.path, dirs[criterion, n], prune_in_groups(scores, n, groups, moe.top_k)
            )
    healed: dict[tuple[str, int], float] = {}
    if heal_steps:
        for key, path in dirs.items():
            name = "full-healed" if key[0] == "none" else f"{path.name}-healed"
            say(f"healing {name.removesuffix('-healed')}: {heal_steps} steps ...")
            _heal(path, data, out / name, heal_steps, heal_lr, seq_len, heal_batch)
            healed[key] = val_loss(ModelDir(out / name).load_model(), rows)
    say("timing decode ...")
    return _measure(src, dirs, healed, rows, importance.tokens, heal_steps, repeats)


def _measure(
    src: ModelDir,
    dirs: dict[tuple[str, int], Path],
    healed: dict[tuple[str, int], float],
    rows: Tensor,
    calibration_tokens: int,
    heal_steps: int,
    repeats: int,
) -> PruneBench:
    """Every model's loss, expert bytes and decode speed."""
    generators = {key: Generator.from_dir(path, device="cpu") for key, path in dirs.items()}
    prompt = [rows[0, :32].tolist()]

    def decode(g: Generator, new: int) -> None:
        g.generate(prompt, SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True))

    out = []
    for key, g in generators.items():
        # One model at a time: the decode kernels compile per expert count, and switching
        # models between samples would time their recompilation.
        seconds = time_interleaved(
            {
                "long": functools.partial(decode, g, DECODE_STEPS + 1),
                "short": functools.partial(decode, g, 1),
            },
            repeats,
        )
        step = (seconds["long"] - seconds["short"]) / DECODE_STEPS
        out.append(
            PruneRow(
                key[0],
                key[1],
                val_loss(g.model, rows),
                healed.get(key),
                1.0 / step if step > 0 else float("nan"),
                expert_bytes(g.model),
            )
        )
    return PruneBench(str(src), calibration_tokens, int(rows[:, 1:].numel()), heal_steps, out)
