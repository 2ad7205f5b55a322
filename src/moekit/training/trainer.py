"""The training loop: one call, `train(cfg, out_dir)`, from config to a model directory.

Per optimizer step: `grad_accum` micro-batches of next-token prediction (cross-entropy plus the
MoE layers' weighted aux and z losses), a non-finite check, gradient clipping, the AdamW step,
the schedule, and the aux-loss-free router bias update from the step's routed counts
(moekit.training.step). Every `log_every` steps a metrics record (loss, lr, grad norm,
tokens/s, routing health per MoE layer); every `eval_every` steps validation loss and
perplexity, overall and per domain; every `save_every` steps a checkpoint. SIGINT and SIGTERM
save a checkpoint before the run exits.

What differs between pre-training and the fine-tuning methods is the run's `TrainingMethod`
(moekit.training.method); what the run shows as it goes is up to its `TrainingObserver`
(moekit.training.events; the console's in moekit.training.progress).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from moekit.data.loader import PackedLoader
from moekit.files import DiskFullError, atomic_write_text, disk_full
from moekit.model import Transformer, build_model
from moekit.model_dir import ModelDir
from moekit.parallel.apply import parallelize
from moekit.parallel.mesh import close_parallel
from moekit.runtime import resolve_device
from moekit.training.checkpoint import Checkpoint, save_checkpoint
from moekit.training.config import RunConfig
from moekit.training.distributed import NoMetrics, main_first, save_model_dir, start_parallel
from moekit.training.errors import (
    NonFiniteLossError,
    RunDiskFullError,
    TrainingInterruptedError,
)
from moekit.training.events import (
    Observers,
    RunStarted,
    StepDone,
    TrainingObserver,
    TrainResult,
)
from moekit.training.grow import ExpertGrowth, apply_plan, config_at, load_moments, parse_grow
from moekit.training.method import TrainingMethod, training_method
from moekit.training.metrics import MetricsLog, RoutingAccumulator
from moekit.training.optim import build_optimizer, build_scheduler, lr_factor
from moekit.training.progress import console_observer
from moekit.training.resume import check_run_dir, check_same_data
from moekit.training.step import autocast_dtype, eval_loss, lm_loss, optimizer_step

__all__ = [
    "NonFiniteLossError",
    "RunDiskFullError",
    "TrainResult",
    "Trainer",
    "TrainingInterruptedError",
    "autocast_dtype",
    "lm_loss",
    "optimizer_step",
    "train",
]

RUN_CONFIG_NAME = ModelDir.RUN_CONFIG


@dataclass
class _Loop:
    """What one call of `Trainer.run()` tracks from step to step."""

    end: int
    start_step: int
    last_eval: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    routing: RoutingAccumulator = field(default_factory=RoutingAccumulator)
    consecutive_bad: int = 0
    window_tokens: int = 0  # since the last log line, training steps only (no eval or saving)
    window_seconds: float = 0.0


class Trainer:
    """Holds a run's live state. Use `train()` unless you need to drive it step by step.

    Nothing is written to the run directory until the run is fully set up (data prepared,
    model built, checkpoint restored and checked): a failed start leaves the directory as it
    was, and a directory that holds no checkpoint yet can always be started again. With
    `verbose`, progress goes to the console (moekit.training.progress); `observer` receives
    the run's events as well.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        verbose: bool = True,
        observer: TrainingObserver | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        tc = cfg.train
        self.device = resolve_device(tc.device)
        # On several processes (moekit.training.distributed): only the main one reports.
        self.parallel = start_parallel(cfg, self.device)
        self.is_main = self.parallel is None or self.parallel.is_main
        self.observer: TrainingObserver = Observers(
            console_observer(verbose and self.is_main), observer if self.is_main else None
        )
        checkpoint = check_run_dir(self.run_dir, cfg, resume=resume, say=self.observer.message)
        self.amp_dtype = autocast_dtype(self.device, tc.precision)

        random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        self.method: TrainingMethod = training_method(
            cfg, self.run_dir, resume=checkpoint is not None
        )
        with main_first(self.parallel):  # the tokenizer cache is shared
            self.tokenizer, self.data = self.method.prepare_data(self.observer.message)
        self.sample_prompts = self.method.sample_prompts()
        self._order_validation_rows()
        # Experts added during the run (train.grow): the model as it was at the checkpoint.
        events = parse_grow(tc.grow)
        self.growth = ExpertGrowth(events, tc.recycle_dead_every, tc.recycle_dead_below)
        if self.growth.active and self.parallel is not None:
            raise ValueError("train.grow and train.recycle_dead_every run on one process")
        at = checkpoint.step if checkpoint is not None else 0
        self.model: Transformer = build_model(
            config_at(cfg.model, events, at), device=self.device, seed=tc.seed
        )
        self.method.prepare_model(self.model, self.data)
        if self.parallel is not None:
            parallelize(self.model, self.parallel, data_parallel=tc.data_parallel)
            self.observer.message(
                f"{self.parallel.world} processes: experts split over {self.parallel.ep}, "
                f"{self.parallel.dp} data-parallel replicas of them "
                f"({'FSDP2' if tc.data_parallel == 'fsdp' else 'DDP'}), "
                f"{tc.batch_size // self.parallel.world} rows per process per batch"
            )
        line = self.method.summary_line()
        if line is not None:
            self.observer.message(line)
        self.optimizer = build_optimizer(self.model, tc)
        self.method.attach(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.loader = PackedLoader(
            self.data.train, tc.batch_size, seed=tc.seed, loss_mask=self.data.train_mask,
            routing=self.data.train_routing,
        )  # fmt: skip
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
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(ModelDir(self.run_dir).tokenizer_path)
            atomic_write_text(self.run_dir / RUN_CONFIG_NAME, cfg.to_json())
            self.method.write_files()
        self._signal: int | None = None

    # ---- set-up ------------------------------------------------------------------------
    def _order_validation_rows(self) -> None:
        """Validation sets in a fixed shuffled order: with `eval_batches` capping an
        evaluation, the rows it sees are a sample of every document, not the first ones."""
        gen = torch.Generator().manual_seed(self.cfg.train.seed)
        order = torch.randperm(len(self.data.val), generator=gen)
        self.val_rows = self.data.val[order]
        self.val_mask = self.data.val_mask[order] if self.data.val_mask is not None else None
        self.val_rows_by_domain = {
            name: rows[torch.randperm(len(rows), generator=gen)]
            for name, rows in self.data.val_by_domain.items()
            if len(rows)
        }

    def _restore(self, checkpoint: Checkpoint) -> None:
        tc = self.cfg.train
        check_same_data(checkpoint, self.data.stats)
        checkpoint.restore(self.model, self.optimizer, self.scheduler, self.parallel)
        self.loader.load_state_dict(checkpoint.state["loader"])
        self.step = self._saved_step = self._resumed_from = checkpoint.step
        self.tokens = int(checkpoint.state["tokens"])
        self.skipped = int(checkpoint.state["skipped"])
        self.elapsed = float(checkpoint.state["elapsed"])
        self.growth.load_state_dict(checkpoint.state.get("expert_counts"))
        # The optimizer state restores the hyperparameters it was saved with; the run's
        # current train section wins (a resumed run may change lr, decay or max_steps).
        for group, decay in zip(self.optimizer.param_groups, (tc.weight_decay, 0.0), strict=True):
            group.update(weight_decay=decay, betas=(tc.beta1, tc.beta2), eps=tc.eps)
            group["lr"] = tc.lr * lr_factor(self.step, tc)
        self.scheduler.base_lrs = [tc.lr] * len(self.optimizer.param_groups)

    # ---- the loop ----------------------------------------------------------------------
    def run(self, *, stop_after: int | None = None) -> TrainResult:
        """Train until `train.max_steps` (or `stop_after` steps in total, for pausing)."""
        tc = self.cfg.train
        previous = [r for r in ModelDir(self.run_dir).read_metrics() if r.get("kind") == "eval"]
        loop = _Loop(
            end=tc.max_steps if stop_after is None else min(stop_after, tc.max_steps),
            start_step=self.step,
            last_eval=previous[-1] if previous and self.step else None,
        )
        # A fresh run starts a fresh log; a continued one drops what came after its checkpoint.
        resume_step = self.step if (self.step or self._resumed_from is not None) else None
        self.metrics: MetricsLog | NoMetrics = (
            MetricsLog(self.run_dir, resume_step=resume_step) if self.is_main else NoMetrics()
        )
        self.observer.started(RunStarted(self.step, loop.end, tc.max_steps, self.tokens))
        try:
            with self._signals(), contextlib.closing(self.metrics):
                while self.step < loop.end:
                    self._advance(loop)
        except BaseException:
            self.observer.finished(None)
            raise
        self.steps_this_run = self.step - loop.start_step
        result = self._result(loop)
        self.observer.finished(result)
        return result

    def _advance(self, loop: _Loop) -> None:
        """One step of the run: the optimizer step, then whatever falls due at it."""
        tc = self.cfg.train
        record = self._train_step(loop)
        self._edit_experts()
        if self.step % tc.log_every == 0 or self.step == loop.end:
            self._log(record, loop)
        has_val = len(self.val_rows) > 0 or bool(self.val_rows_by_domain)
        if has_val and (self.step % tc.eval_every == 0 or self.step == tc.max_steps):
            loop.last_eval = self.evaluate()
            self._write_metrics(loop.last_eval)
            loop.history.append(loop.last_eval)
            self.observer.evaluated(loop.last_eval)
        if self.step % tc.save_every == 0 or self.step == loop.end:
            self.save()
        self.observer.stepped(StepDone(self.step, record["loss"], self.tokens))
        signal_ = self._agreed_signal()
        if signal_ is not None:
            self.save()
            raise TrainingInterruptedError(signal_, self.step, self.run_dir)

    def _agreed_signal(self) -> int | None:
        """The stop signal this step ends on: on several processes, one that any of them
        received (they may receive it at different steps; all must save together)."""
        if self.parallel is None:
            return self._signal
        flag = torch.tensor([self._signal or 0])
        torch.distributed.all_reduce(
            flag, op=torch.distributed.ReduceOp.MAX, group=self.parallel.world_group
        )
        return int(flag) or None

    def _train_step(self, loop: _Loop) -> dict[str, Any]:
        """One optimizer step and the schedule's, counted; stops the run after
        `train.max_nonfinite` non-finite steps in a row."""
        tc = self.cfg.train
        t0 = time.perf_counter()
        record = optimizer_step(
            self.model,
            self.optimizer,
            (self.loader.next_batch() for _ in range(tc.grad_accum)),
            grad_accum=tc.grad_accum,
            grad_clip=tc.grad_clip,
            autocast=self._autocast,
            on_stats=self._on_stats(loop),
            balance_routers=self.method.balance_routers,
            pad_id=self.method.pad_id,
            parallel=self.parallel,
        )
        with warnings.catch_warnings():
            # A skipped step still advances the schedule: it counts as a step of the run.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        loop.window_seconds += seconds
        self.step += 1
        self.tokens += record["tokens"]
        loop.window_tokens += record["tokens"]
        if record["finite"]:
            loop.consecutive_bad = 0
            return record
        self.skipped += 1
        loop.consecutive_bad += 1
        if loop.consecutive_bad >= tc.max_nonfinite:
            where = (
                f"the last checkpoint (step {self._saved_step}) is in "
                f"{ModelDir(self.run_dir).train_state}"
                if self._saved_step is not None
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"the loss was not finite in {loop.consecutive_bad} consecutive steps (up to "
                f"step {self.step}); the run stopped. Lower train.lr, raise "
                f"train.warmup_steps or check the data; {where}"
            )
        return record

    def _on_stats(self, loop: _Loop) -> Any:
        if not self.growth.active:
            return loop.routing.add

        def both(layer: int, routed: Tensor, dropped: Tensor, entropy: Tensor) -> None:
            loop.routing.add(layer, routed, dropped, entropy)
            self.growth.observe(layer, routed)

        return both

    def _edit_experts(self) -> None:
        """Carry out the grow or recycle event due after this step (moekit.training.grow):
        the edited model, with an optimizer that holds the edited moments, takes over."""
        due = self.growth.plan_at(self.step, self.model.cfg) if self.growth.active else None
        if due is None:
            return
        tc = self.cfg.train
        line, plan = due
        new_cfg, weights, moments = apply_plan(
            self.model, self.optimizer, plan, noise=tc.grow_noise, seed=tc.seed + self.step
        )
        model = build_model(new_cfg, device=self.device, seed=tc.seed)
        model.load_state_dict(weights)
        optimizer = build_optimizer(model, tc)
        load_moments(model, optimizer, moments)
        scheduler = build_scheduler(optimizer, tc)
        scheduler.load_state_dict(self.scheduler.state_dict())
        for new, old in zip(optimizer.param_groups, self.optimizer.param_groups, strict=True):
            new["lr"] = old["lr"]
        self.model, self.optimizer, self.scheduler = model.train(), optimizer, scheduler
        self.observer.message(line)

    def _log(self, record: dict[str, Any], loop: _Loop) -> None:
        entry = {
            "kind": "train",
            "step": self.step,
            "loss": record["loss"],
            "aux_loss": record["aux_loss"],
            "lr": record["lr"],
            "grad_norm": record["grad_norm"],
            "tokens": self.tokens,
            "tokens_per_s": loop.window_tokens / max(loop.window_seconds, 1e-9),
            "elapsed_s": self.elapsed,
            "skipped_steps": self.skipped,
            "routing": loop.routing.summary(),
        }
        if "balance_loss" in record:  # hierarchical routing: the loss at each level
            entry["balance_loss"] = record["balance_loss"]
        loop.routing.reset()
        loop.window_tokens, loop.window_seconds = 0, 0.0
        self._write_metrics(entry)
        loop.history.append(entry)
        self.observer.logged(entry)

    def _result(self, loop: _Loop) -> TrainResult:
        last = loop.last_eval
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            val_loss=last["val_loss"] if last else None,
            val_by_domain=last["val_by_domain"] if last else {},
            tokens=self.tokens,
            seconds=self.elapsed,
            skipped_steps=self.skipped,
            history=loop.history,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

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
        return eval_loss(
            self.model, rows, mask, batch_size=tc.batch_size, max_batches=tc.eval_batches,
            autocast=self._autocast,
        )  # fmt: skip

    def save(self) -> None:
        """Write the model directory's weights and config, and a training checkpoint (once per
        step: a signal arriving on a step that was just saved does not save it again).

        A full disk stops the run with a RunDiskFullError: the files being written keep their
        earlier versions, and the last complete checkpoint stays loadable."""
        if self._saved_step == self.step:
            return
        try:
            if self.parallel is None:
                self.method.save(self.model)
            else:
                save_model_dir(self.model, self.model.cfg, self.run_dir, self.parallel)
            path = save_checkpoint(
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
                    "expert_counts": self.growth.state_dict(),
                },
                keep_last=self.cfg.train.keep_last,
                parallel=self.parallel,
            )
        except DiskFullError as e:
            raise RunDiskFullError(e, self.run_dir, self.step, self._saved_step) from e
        self._saved_step = self.step
        self.observer.saved(self.step, path)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        """Append `record` to metrics.jsonl; a full disk stops the run (RunDiskFullError)."""
        try:
            self.metrics.log(record)
        except OSError as e:
            full = disk_full(e, self.metrics.path)
            if full is None:
                raise
            raise RunDiskFullError(full, self.run_dir, self.step, self._saved_step) from e

    def method_line(self) -> str | None:
        """One line on how the model was trained when it differs from pre-training (the
        fine-tuning method and what it trains), else None."""
        return self.method.summary_line()

    # ---- signals -----------------------------------------------------------------------
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
            name = signal.Signals(signum).name
            self.observer.message(f"{name}: saving a checkpoint after this step ...")

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    verbose: bool = True,
    report: bool = True,
    stop_after: int | None = None,
    observer: TrainingObserver | None = None,
) -> TrainResult:
    """Train the model `cfg` describes and write the model directory `out_dir`.

    The directory receives config.json, model.safetensors, tokenizer.json, run.json (the
    resolved run config), metrics.jsonl, train_state/ (checkpoints) and, unless
    `report=False`, report/ (loss curves, expert load, sample generations). With `resume`,
    continue the run in `out_dir` from its latest checkpoint. `stop_after` pauses after that
    many steps in total (a later `resume` continues exactly). With `verbose`, progress goes
    to stderr (a bar on a terminal, a line per logged step elsewhere); `observer` receives the
    run's events too (moekit.training.events).
    """
    joined = torch.distributed.is_initialized()  # a group the caller started stays theirs
    trainer = Trainer(cfg, out_dir, resume=resume, verbose=verbose, observer=observer)
    result = trainer.run(stop_after=stop_after)
    if report and result.step >= cfg.train.max_steps and trainer.steps_this_run:
        from moekit.training.report import write_training_report

        if trainer.parallel is not None and trainer.is_main:
            # The report runs the model (samples, routing): the whole one, as saved.
            trainer.model = ModelDir(trainer.run_dir).load_model(device=trainer.device)
        if trainer.is_main:
            write_training_report(trainer, result)
    if trainer.parallel is not None:
        torch.distributed.barrier(group=trainer.parallel.world_group)
        if not joined:
            close_parallel()
    return result
