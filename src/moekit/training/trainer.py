"""The training loop: one call, `train(cfg, out_dir)`, from config to a model directory.

Per optimizer step: `grad_accum` micro-batches of next-token prediction (cross-entropy plus the
MoE layers' weighted aux and z losses), a non-finite check, gradient clipping, the AdamW step,
the schedule, and the aux-loss-free router bias update from the step's routed counts. Every
`log_every` steps a metrics record (loss, lr, grad norm, tokens/s, routing health per MoE
layer); every `eval_every` steps validation loss and perplexity, overall and per domain; every
`save_every` steps a checkpoint. SIGINT and SIGTERM save a checkpoint before the run exits.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.data.loader import (
    IGNORE_INDEX,
    PackedLoader,
    TokenizedData,
    iter_eval_batches,
    prepare_data,
)
from moekit.data.tokenizer import Tokenizer
from moekit.files import atomic_write_text
from moekit.finetune.tuning import FineTuning
from moekit.model import Transformer, build_model
from moekit.model_dir import ModelDir, save_model
from moekit.runtime import resolve_device
from moekit.training.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from moekit.training.config import RunConfig
from moekit.training.metrics import MetricsLog, RoutingAccumulator
from moekit.training.optim import build_optimizer, build_scheduler, lr_factor

RUN_CONFIG_NAME = ModelDir.RUN_CONFIG


class TrainingInterruptedError(Exception):
    """Raised after a SIGINT/SIGTERM checkpoint has been written."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: saved a checkpoint at step {step} in {run_dir}")
        self.signum = signum
        self.step = step


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    val_by_domain: dict[str, float]
    tokens: int
    seconds: float
    skipped_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast where the device runs it natively (CUDA with bf16), float32 elsewhere."""
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise ValueError(
            f"train.precision='bf16' is not supported on {device}; use 'auto' or 'fp32'"
        )
    return torch.bfloat16 if supported else None


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy, computed in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def optimizer_step(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    grad_accum: int,
    grad_clip: float,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    on_stats: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
    balance_routers: bool = True,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches of (inputs, targets).

    Loss = next-token cross-entropy over every target of the step (targets of -100 are not
    targets; each micro-batch weighs by its share of the step's targets, so accumulating gives
    the loss of one large batch) + the model's weighted router losses, averaged over the
    micro-batches. With `pad_id`, input tokens equal to it are padding: they route to no expert
    and count in no routing statistic, router loss or token count. A non-finite loss or
    gradient norm skips the update (`finite=False` in the result). After a good update (and
    with `balance_routers`) the routers' aux-loss-free biases take one step from the routed
    counts summed over the micro-batches. `on_stats(layer, counts, dropped, entropy)` sees
    every MoE layer's statistics of every micro-batch. The result's `tokens` counts the input
    tokens that were not padding.
    """
    model.train()
    device = next(model.parameters()).device
    batches = [(inputs.to(device), targets.to(device)) for inputs, targets in batches]
    targets_per_batch = [int((t != IGNORE_INDEX).sum()) for _, t in batches]
    all_targets = max(sum(targets_per_batch), 1)
    counts: dict[int, Tensor] = {}
    loss_sum = aux_sum = 0.0
    tokens = 0
    for (inputs, targets), n in zip(batches, targets_per_batch, strict=True):
        mask = inputs != pad_id if pad_id is not None else None
        tokens += int(mask.sum()) if mask is not None else inputs.numel()
        with autocast():
            out = model(inputs, token_mask=mask)
        loss = lm_loss(out.logits, targets) if n else out.logits.sum() * 0.0
        share = n / all_targets
        (loss * share + out.aux_loss / grad_accum).backward()
        loss_sum += float(loss.detach()) * share
        aux_sum += float(out.aux_loss.detach())
        for layer, stats in out.moe_stats.items():
            counts[layer] = (
                counts[layer] + stats.tokens_per_expert
                if layer in counts
                else stats.tokens_per_expert
            )
            if on_stats is not None:
                on_stats(layer, stats.tokens_per_expert, stats.dropped, stats.entropy)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    lr = optimizer.param_groups[0]["lr"]
    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        if balance_routers:
            model.update_router_biases(counts)
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss_sum,
        "tokens": tokens,
        "aux_loss": aux_sum / grad_accum,
        "grad_norm": grad_norm,
        "lr": lr,
        "finite": finite,
    }


class Trainer:
    """Holds a run's live state. Use `train()` unless you need to drive it step by step.

    Nothing is written to the run directory until the run is fully set up (data prepared,
    model built, checkpoint restored and checked): a failed start leaves the directory as it
    was, and a directory that holds no checkpoint yet can always be started again.
    """

    def __init__(
        self, cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, verbose: bool = True
    ) -> None:
        self.run_dir = Path(run_dir)
        self.verbose = verbose
        self.cfg = cfg
        checkpoint = self._check_run_dir(cfg, resume)
        tc = cfg.train
        self.device = resolve_device(tc.device)
        self.amp_dtype = autocast_dtype(self.device, tc.precision)

        random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        self.sample_prompts = list(tc.samples)
        self.tuning: FineTuning | None = None
        if cfg.finetune is not None:
            self.tuning = FineTuning(cfg.finetune, self.run_dir, resume=checkpoint is not None)
            self.tokenizer, self.data = self.tuning.prepare_data(tc.seq_len, tc.seed, cfg.model)
            self.sample_prompts = self.tuning.sample_prompts()
            self._say(self.tuning.data_line(self.data))
        else:
            tokenizer = None
            if checkpoint is not None:
                tokenizer = Tokenizer.load(self.run_dir)
            elif tc.init_from is not None and ModelDir(tc.init_from).tokenizer_path.is_file():
                tokenizer = Tokenizer.load(tc.init_from)  # keep the source model's vocabulary
            self.tokenizer, self.data = self._prepare_data(tokenizer)
        # Validation sets in a fixed shuffled order: with `eval_batches` capping an evaluation,
        # the rows it sees are a sample of every document, not the first documents only.
        gen = torch.Generator().manual_seed(tc.seed)
        order = torch.randperm(len(self.data.val), generator=gen)
        self.val_rows = self.data.val[order]
        self.val_mask = self.data.val_mask[order] if self.data.val_mask is not None else None
        self.val_rows_by_domain = {
            name: rows[torch.randperm(len(rows), generator=gen)]
            for name, rows in self.data.val_by_domain.items()
            if len(rows)
        }
        self.model: Transformer = build_model(cfg.model, device=self.device, seed=tc.seed)
        if tc.init_from is not None and checkpoint is None:
            self._init_from(Path(tc.init_from))
        if self.tuning is not None:
            self.tuning.prepare_model(self.model, self.data, tc.batch_size)
            self._say(self.tuning.summary_line())
        self.optimizer = build_optimizer(self.model, tc)
        if self.tuning is not None:
            self.tuning.attach(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.loader = PackedLoader(
            self.data.train, tc.batch_size, seed=tc.seed, loss_mask=self.data.train_mask
        )
        self.step = 0
        self.tokens = 0
        self.skipped = 0
        self.elapsed = 0.0
        self._saved_step: int | None = None
        self._resumed_from: int | None = None
        self.steps_this_run = 0
        if checkpoint is not None:
            self._restore(checkpoint)
        # Set up and checked: from here on the run directory is ours.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(ModelDir(self.run_dir).tokenizer_path)
        atomic_write_text(self.run_dir / RUN_CONFIG_NAME, cfg.to_json())
        if self.tuning is not None:
            self.tuning.write_files()
        self._signal: int | None = None

    # ---- set-up ------------------------------------------------------------------------
    def _check_run_dir(self, cfg: RunConfig, resume: bool) -> Checkpoint | None:
        checkpoint = latest_checkpoint(self.run_dir) if self.run_dir.exists() else None
        if not resume:
            if checkpoint is not None:
                raise ValueError(
                    f"{self.run_dir} already holds a training run (a checkpoint at step "
                    f"{checkpoint.step}); pass --resume to continue it or choose another --out"
                )
            held = ModelDir(self.run_dir).model_files()
            if held:
                raise ValueError(
                    f"{self.run_dir} already holds a model ({', '.join(held)}) and no training "
                    "run to continue; choose another --out (a run never overwrites a model)"
                )
            return None
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume: {self.run_dir} holds no checkpoint (train_state/); start the run "
                "without --resume"
            )
        saved = RunConfig.from_dict(_read_json(self.run_dir / RUN_CONFIG_NAME))
        for section in ("model", "data", "finetune"):
            if getattr(saved, section) != getattr(cfg, section):
                raise ValueError(
                    f"--resume: the {section} section differs from the run's {RUN_CONFIG_NAME}; "
                    "a run continues with the same model and data"
                )
        for name in ("batch_size", "seq_len", "seed"):
            before, now = getattr(saved.train, name), getattr(cfg.train, name)
            if before != now:
                raise ValueError(
                    f"--resume: train.{name} was {before} in this run and cannot change to {now} "
                    "(the data order depends on it); drop that override"
                )
        return checkpoint

    def _restore(self, checkpoint: Checkpoint) -> None:
        tc = self.cfg.train
        fingerprint = checkpoint.state.get("data_fingerprint")
        if fingerprint is not None and fingerprint != self.data.stats.get("fingerprint"):
            raise ValueError(
                f"--resume: the training data changed since the checkpoint at step "
                f"{checkpoint.step} (different documents or texts); resuming would not continue "
                "the same run"
            )
        checkpoint.restore(self.model, self.optimizer, self.scheduler)
        self.loader.load_state_dict(checkpoint.state["loader"])
        self.step = self._saved_step = self._resumed_from = checkpoint.step
        self.tokens = int(checkpoint.state["tokens"])
        self.skipped = int(checkpoint.state["skipped"])
        self.elapsed = float(checkpoint.state["elapsed"])
        # The optimizer state restores the hyperparameters it was saved with; the run's
        # current train section wins (a resumed run may change lr, decay or max_steps).
        for group, decay in zip(self.optimizer.param_groups, (tc.weight_decay, 0.0), strict=True):
            group.update(weight_decay=decay, betas=(tc.beta1, tc.beta2), eps=tc.eps)
            group["lr"] = tc.lr * lr_factor(self.step, tc)
        self.scheduler.base_lrs = [tc.lr] * len(self.optimizer.param_groups)

    def _init_from(self, source: Path) -> None:
        """Start from another model directory's weights (continued pre-training, e.g. after
        upcycling); its config must describe the same model."""
        from moekit.config import ModelConfig
        from moekit.model_dir import load_state_checked, load_weights

        theirs = ModelConfig.load(source)
        if theirs != self.cfg.model:
            raise ValueError(
                f"train.init_from: {source} holds a different model than the model section"
            )
        load_state_checked(self.model, load_weights(source, self.device), str(source))

    def _prepare_data(self, tokenizer: Tokenizer | None) -> tuple[Tokenizer, TokenizedData]:
        tc = self.cfg.train
        self._say("preparing data ...")
        tok, data = prepare_data(
            self.cfg.data, self.cfg.model.vocab_size, tc.seq_len, tokenizer=tokenizer
        )
        if tok.vocab_size > self.cfg.model.vocab_size:
            raise ValueError(
                f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
                f"{self.cfg.model.vocab_size}"
            )
        if len(data.train) < tc.batch_size:
            raise ValueError(
                f"the training split packs into {len(data.train)} rows of {tc.seq_len + 1} "
                f"tokens, fewer than train.batch_size={tc.batch_size}; use more data or smaller "
                "train.seq_len / train.batch_size"
            )
        self._say(
            f"data: {len(data.train)} training rows, {len(data.val)} validation rows of "
            f"{tc.seq_len} tokens; vocabulary {tok.vocab_size}"
        )
        return tok, data

    # ---- the loop ----------------------------------------------------------------------
    def run(self, *, stop_after: int | None = None) -> TrainResult:
        """Train until `train.max_steps` (or `stop_after` steps in total, for pausing)."""
        tc = self.cfg.train
        end = tc.max_steps if stop_after is None else min(stop_after, tc.max_steps)
        history: list[dict[str, Any]] = []
        routing = RoutingAccumulator()
        consecutive_bad = 0
        start_step = self.step
        previous = [r for r in ModelDir(self.run_dir).read_metrics() if r.get("kind") == "eval"]
        last_eval: dict[str, Any] | None = previous[-1] if previous and self.step else None
        window_tokens, window_seconds = 0, 0.0  # training steps only, no eval or saving
        # A fresh run starts a fresh log; a continued one drops what came after its checkpoint.
        resume_step = self.step if (self.step or self._resumed_from is not None) else None
        self.metrics = MetricsLog(self.run_dir, resume_step=resume_step)
        with self._signals(), self._progress(end) as advance, contextlib.closing(self.metrics):
            while self.step < end:
                t0 = time.perf_counter()
                record = self._train_step(routing)
                step_seconds = time.perf_counter() - t0
                self.elapsed += step_seconds
                window_seconds += step_seconds
                self.step += 1
                step_tokens = record["tokens"]
                self.tokens += step_tokens
                window_tokens += step_tokens
                if record["finite"]:
                    consecutive_bad = 0
                else:
                    self.skipped += 1
                    consecutive_bad += 1
                    if consecutive_bad >= tc.max_nonfinite:
                        where = (
                            f"the last checkpoint (step {self._saved_step}) is in "
                            f"{self.run_dir / 'train_state'}"
                            if self._saved_step is not None
                            else "no checkpoint was written yet"
                        )
                        raise NonFiniteLossError(
                            f"the loss was not finite in {consecutive_bad} consecutive steps "
                            f"(up to step {self.step}); the run stopped. Lower train.lr, raise "
                            f"train.warmup_steps or check the data; {where}"
                        )
                if self.step % tc.log_every == 0 or self.step == end:
                    entry = {
                        "kind": "train",
                        "step": self.step,
                        "loss": record["loss"],
                        "aux_loss": record["aux_loss"],
                        "lr": record["lr"],
                        "grad_norm": record["grad_norm"],
                        "tokens": self.tokens,
                        "tokens_per_s": window_tokens / max(window_seconds, 1e-9),
                        "elapsed_s": self.elapsed,
                        "skipped_steps": self.skipped,
                        "routing": routing.summary(),
                    }
                    routing.reset()
                    window_tokens, window_seconds = 0, 0.0
                    self.metrics.log(entry)
                    history.append(entry)
                    self._report_line(entry)
                has_val = len(self.val_rows) > 0 or bool(self.val_rows_by_domain)
                if has_val and (self.step % tc.eval_every == 0 or self.step == tc.max_steps):
                    last_eval = self.evaluate()
                    self.metrics.log(last_eval)
                    history.append(last_eval)
                    self._say(
                        f"step {self.step}: val loss {last_eval['val_loss']:.4f} "
                        f"(ppl {last_eval['val_ppl']:.1f})"
                    )
                if self.step % tc.save_every == 0 or self.step == end:
                    self.save()
                advance(self.step, record["loss"], window_tokens)
                if self._signal is not None:
                    self.save()
                    raise TrainingInterruptedError(self._signal, self.step, self.run_dir)
        self.steps_this_run = self.step - start_step
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            val_loss=last_eval["val_loss"] if last_eval else None,
            val_by_domain=last_eval["val_by_domain"] if last_eval else {},
            tokens=self.tokens,
            seconds=self.elapsed,
            skipped_steps=self.skipped,
            history=history,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_step(self, routing: RoutingAccumulator) -> dict[str, Any]:
        tc = self.cfg.train
        batches = (self.loader.next_batch() for _ in range(tc.grad_accum))
        record = optimizer_step(
            self.model,
            self.optimizer,
            batches,
            grad_accum=tc.grad_accum,
            grad_clip=tc.grad_clip,
            autocast=self._autocast,
            on_stats=routing.add,
            # Fine-tuning that freezes the routers (LoRA, ESFT) freezes their balancing biases.
            balance_routers=self.tuning is None or self.tuning.cfg.method == "full",
            pad_id=self.tuning.pad_id if self.tuning is not None else None,
        )
        with warnings.catch_warnings():
            # A skipped step still advances the schedule: it counts as a step of the run.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss and perplexity, overall and per domain (at most `eval_batches`
        batches each, the same rows every time). Expert-choice models are evaluated in their
        causal routing mode."""
        self.model.eval()
        overall = self._eval_loss(self.val_rows, self.val_mask) if len(self.val_rows) else math.nan
        losses = {name: self._eval_loss(rows) for name, rows in self.val_rows_by_domain.items()}
        self.model.train()
        return {
            "kind": "eval",
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed,
            "val_loss": overall,
            "val_ppl": math.exp(min(overall, 50.0)),
            "val_by_domain": losses,
            "val_ppl_by_domain": {k: math.exp(min(v, 50.0)) for k, v in losses.items()},
        }

    def _eval_loss(self, rows: Tensor, mask: Tensor | None = None) -> float:
        tc = self.cfg.train
        total, count = 0.0, 0
        for i, (inputs, targets) in enumerate(iter_eval_batches(rows, tc.batch_size, mask)):
            if i >= tc.eval_batches:
                break
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._autocast():
                logits = self.model(inputs, causal_routing=True).logits
            n = int((targets != IGNORE_INDEX).sum())
            if n:
                total += float(lm_loss(logits, targets)) * n
                count += n
        return total / count if count else math.nan

    def save(self) -> None:
        """Write the model directory's weights and config, and a training checkpoint (once per
        step: a signal arriving on a step that was just saved does not save it again)."""
        if self._saved_step == self.step:
            return
        if self.tuning is not None:
            self.tuning.save(self.model, self.cfg.model)
        else:
            save_model(self.model, self.cfg.model, self.run_dir)
        save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer,
            self.scheduler,
            {
                "loader": self.loader.state_dict(),
                "tokens": self.tokens,
                "skipped": self.skipped,
                "elapsed": self.elapsed,
                "data_fingerprint": self.data.stats.get("fingerprint"),
            },
            keep_last=self.cfg.train.keep_last,
        )
        self._saved_step = self.step

    def method_line(self) -> str | None:
        """One line on how the model was trained when it differs from pre-training (the
        fine-tuning method and what it trains), else None."""
        return self.tuning.summary_line() if self.tuning is not None else None

    # ---- signals and progress ----------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to checkpoint and stop at the end of the current step."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            if self._signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._signal = signum
            self._say(f"{signal.Signals(signum).name}: saving a checkpoint after this step ...")

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def _progress(self, end: int) -> Iterator[Any]:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        if not (self.verbose and console.is_terminal):
            yield lambda step, loss, tokens: None
            return
        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        task = progress.add_task("train", total=end, completed=self.step, loss=math.nan, tps=0.0)
        started, start_tokens = time.perf_counter(), self.tokens

        def advance(step: int, loss: float, _tokens: int) -> None:
            rate = (self.tokens - start_tokens) / max(time.perf_counter() - started, 1e-9)
            progress.update(task, completed=step, loss=loss, tps=rate)

        with progress:
            yield advance

    def _report_line(self, entry: dict[str, Any]) -> None:
        from rich.console import Console

        if self.verbose and not Console(stderr=True).is_terminal:
            self._say(
                f"step {entry['step']}/{self.cfg.train.max_steps}  loss {entry['loss']:.4f}  "
                f"lr {entry['lr']:.2e}  {entry['tokens_per_s']:,.0f} tok/s"
            )

    def _say(self, message: str) -> None:
        if self.verbose:
            print(message, file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e})") from e


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    verbose: bool = True,
    report: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the model `cfg` describes and write the model directory `out_dir`.

    The directory receives config.json, model.safetensors, tokenizer.json, run.json (the
    resolved run config), metrics.jsonl, train_state/ (checkpoints) and, unless
    `report=False`, report/ (loss curves, expert load, sample generations). With `resume`,
    continue the run in `out_dir` from its latest checkpoint. `stop_after` pauses after that
    many steps in total (a later `resume` continues exactly).
    """
    trainer = Trainer(cfg, out_dir, resume=resume, verbose=verbose)
    result = trainer.run(stop_after=stop_after)
    if report and result.step >= cfg.train.max_steps and trainer.steps_this_run:
        from moekit.training.report import write_training_report

        write_training_report(trainer, result)
    return result
