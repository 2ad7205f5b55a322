"""`moekit bench generate`: prefill and decode speed of our generator against transformers'
`generate` on the same weights (copied into transformers' model of the plainest architecture
that represents the model exactly, e.g. MixtralForCausalLM), timed round-robin, the best of
the repeats kept.

Both sides decode greedily with a KV cache, never stopping early. Prefill throughput is the
prompt tokens over the time to produce the first new token; decode throughput is the further
new tokens over the remaining time. The generated tokens are compared as a sanity check.

A quantised model (`moekit quantize`) has no transformers side: transformers cannot compute
from moekit's packed weights, and holding them expanded to float32 is what quantising
avoids; nor has a model no transformers architecture represents (hierarchical routing).
Ours is then measured alone (compiled steps beside eager ones when compiling) against
the bandwidth bound of its stored bytes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moekit.bench.timing import StolenTime, round_robin
from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.interop import live
from moekit.interop.fields import UnsupportedError
from moekit.interop.hf import choose_architecture
from moekit.speed import (
    READER_BYTES,
    SpeedPrediction,
    StepBytes,
    measure_bandwidth,
    predict_decode,
    step_bytes,
)

if TYPE_CHECKING:
    from moekit.data.tokenizer import Tokenizer

Greedy = Callable[[int], list[list[int]]]  # new tokens -> the generated ids of each prompt


@dataclass(frozen=True)
class PhaseSpeed:
    """Tokens per second of one phase of generation, ours and transformers': prompt tokens
    for prefill, new tokens for decoding."""

    ours_tokens_per_s: float
    hf_tokens_per_s: float | None  # None: no transformers side (a quantised model)

    @property
    def ours_over_hf(self) -> float | None:
        """> 1: ours is faster."""
        if self.hf_tokens_per_s is None:
            return None
        return self.ours_tokens_per_s / self.hf_tokens_per_s


@dataclass(frozen=True)
class GenerateBench:
    """What `bench_generate` measured: the setting, both sides' speed at prefill and at
    decoding, whether both generated the same tokens, and the transformers experts
    implementation that ran. Without a transformers side (a quantised model) its fields
    are None and `same_tokens` compares our compiled steps with our eager ones."""

    model: str
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill: PhaseSpeed
    decode: PhaseSpeed
    same_tokens: bool | None  # None: nothing to compare with (quantised and eager)
    hf_experts_implementation: str | None
    ours_calls_per_step: int
    hf_calls_per_step: int | None
    bound: SpeedPrediction
    quantization: str | None = None  # the model's quantisation in words; None: float
    compiled: bool = False  # our decode steps ran through torch.compile
    ours_warmup_s: float = 0.0  # our first generation (with compile: the compilation)
    # With compile: our eager path in the same run (tokens/s at decoding, calls per step).
    eager_decode_tokens_per_s: float | None = None
    eager_calls_per_step: int | None = None
    no_reference: str | None = None  # why transformers did not run (None: it ran)
    # The share of CPU time the hypervisor gave to others during the timed runs (Linux; None
    # elsewhere): above a few percent the timings are disturbed (moekit.bench.timing).
    stolen_cpu: float | None = None

    @property
    def fraction_of_bound(self) -> float:
        """Our decode tokens/s over the bandwidth bound (1.0: reading weights is all we do)."""
        return self.decode.ours_tokens_per_s / self.bound.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "batch_size": self.batch_size,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "ours_prefill_tokens_per_s": self.prefill.ours_tokens_per_s,
            "hf_prefill_tokens_per_s": self.prefill.hf_tokens_per_s,
            "ours_decode_tokens_per_s": self.decode.ours_tokens_per_s,
            "hf_decode_tokens_per_s": self.decode.hf_tokens_per_s,
            "same_tokens": self.same_tokens,
            "hf_experts_implementation": self.hf_experts_implementation,
            "prefill_ours_over_hf": self.prefill.ours_over_hf,
            "decode_ours_over_hf": self.decode.ours_over_hf,
            "ours_calls_per_step": self.ours_calls_per_step,
            "hf_calls_per_step": self.hf_calls_per_step,
            "bound": self.bound.to_dict(),
            "decode_fraction_of_bound": self.fraction_of_bound,
            "quantization": self.quantization,
            "compiled": self.compiled,
            "ours_warmup_s": self.ours_warmup_s,
            "eager_decode_tokens_per_s": self.eager_decode_tokens_per_s,
            "eager_calls_per_step": self.eager_calls_per_step,
            "no_reference": self.no_reference,
            "stolen_cpu": self.stolen_cpu,
        }


def bench_generate(
    model_dir: str | Path | None = None,
    *,
    preset: str = "demo",
    batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    repeats: int = 3,
    seed: int = 0,
    compile: bool = True,
) -> GenerateBench:
    """Time ours and transformers' greedy generation of `new_tokens` after a random prompt of
    `prompt_tokens` tokens, for `batch_size` prompts at once.

    The model is `model_dir`'s (or a randomly initialised `preset`). Returns prefill and decode
    tokens/s for each side, their ratios (> 1: ours is faster) and whether both generated the
    same tokens; the PyTorch calls per decode step of each side; and the bandwidth bound on
    decoding (bytes per token over the memory bandwidth measured in this run). With
    `compile` our decode steps run through `torch.compile` (moekit.infer.compiled); the
    compilation happens in an untimed first generation (`ours_warmup_s`).
    """
    import torch._inductor.config

    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        return _bench(
            model_dir, preset, batch_size, prompt_tokens, new_tokens, repeats, seed, compile
        )


def _bench(
    model_dir: str | Path | None,
    preset: str,
    batch_size: int,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    seed: int,
    compile: bool,
) -> GenerateBench:
    generator = _generator(model_dir, preset, seed)
    generator.compile = compile
    cfg = generator.model.cfg
    if prompt_tokens + new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    hf, alone = _reference(generator)
    torch.manual_seed(seed)
    low = 2  # skip the special tokens
    prompts = torch.randint(low, cfg.vocab_size, (batch_size, prompt_tokens))
    ours = _ours(generator, prompts)
    theirs = _theirs(hf, prompts, generator.tokenizer.pad_id) if hf is not None else None
    start = time.perf_counter()
    ours_tokens = ours(new_tokens)
    warmup = time.perf_counter() - start
    compiled = generator._decoder is not None and generator._decoder.active
    # With compile, our eager path on the same model runs beside it (the step the compiled
    # one replaces).
    sides = {"ours": ours}
    if theirs is not None:
        sides["hf"] = theirs
    if compiled:
        sides["eager"] = _ours(Generator(generator.model, generator.tokenizer), prompts)
    same_tokens = None
    if "hf" in sides or compiled:
        same_tokens = ours_tokens == sides["hf" if "hf" in sides else "eager"](new_tokens)
    context = prompt_tokens + new_tokens // 2
    bpw = next(generator.model.parameters()).element_size()
    reads = _BandwidthReads(
        step_bytes(cfg, batch=batch_size, context=context, bytes_per_weight=bpw)
    )
    prompt_total, decode_total = batch_size * prompt_tokens, batch_size * (new_tokens - 1)
    with StolenTime() as stolen:
        prefill, decode = _speeds(
            sides, new_tokens, repeats, prompt_total, decode_total, reads.between
        )
    # Compiled code (the decode step, and the eager path's one-token kernels) is invisible to
    # a dispatch mode, and does not run under one: every side's PyTorch calls and kernels
    # are counted with the profiler.
    calls = {side: calls_per_step(fn, profiled_calls) for side, fn in sides.items()}
    bandwidth = reads.highest()
    bound = predict_decode(cfg, bandwidth, batch=batch_size, context=context, bytes_per_weight=bpw)
    return GenerateBench(
        model=str(model_dir) if model_dir else f"{preset} (random weights)",
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        prefill=PhaseSpeed(prefill["ours"], prefill.get("hf")),
        decode=PhaseSpeed(decode["ours"], decode.get("hf")),
        same_tokens=same_tokens,
        hf_experts_implementation=hf.config._experts_implementation if hf is not None else None,
        ours_calls_per_step=calls["ours"],
        hf_calls_per_step=calls.get("hf"),
        bound=bound,
        quantization=cfg.quantization.describe() if cfg.quantization is not None else None,
        compiled=compiled,
        ours_warmup_s=warmup,
        eager_decode_tokens_per_s=decode.get("eager"),
        eager_calls_per_step=calls.get("eager"),
        no_reference=alone if hf is None else None,
        stolen_cpu=stolen.share,
    )


def _reference(generator: Generator) -> tuple[Any, str]:
    """transformers' model holding the same weights, or None and why not: it cannot hold
    moekit's packed weights, nor compute a model no architecture of its represents
    (hierarchical routing); those are ours alone."""
    cfg = generator.model.cfg
    if cfg.quantization is not None:
        return None, "it cannot compute from moekit's packed weights"
    try:
        return live.to_hf_model(choose_architecture(cfg), generator.model, cfg), ""
    except UnsupportedError as e:
        return None, "; ".join(line.strip() for line in str(e).splitlines())


class _BandwidthReads:
    """The bound's bandwidth: the highest of reads before and after the timed runs and, when a
    decode step itself reads more than the reader does (so the read leaves no cache colder
    than a step leaves it), before every round too (`between`): on a shared machine the
    bandwidth can move by 2x within a run, and the bound should come from the stretch of time
    it bounds. A smaller model's rounds are left alone (the read would empty the caches it
    runs from)."""

    def __init__(self, step: StepBytes) -> None:
        self.reads: list[float] = []
        self.between = self.read if step.total > READER_BYTES else None
        if self.between is None:
            self.read()  # else the first round starts with one

    def read(self) -> None:
        self.reads.append(measure_bandwidth())

    def highest(self) -> float:
        """The highest read, one more taken now."""
        self.read()
        return max(self.reads)


def _speeds(
    sides: dict[str, Greedy],
    new_tokens: int,
    repeats: int,
    prompt_total: int,
    decode_total: int,
    between: Callable[[], object] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Prefill and decode tokens/s of each side, timed round-robin: the first new token costs
    the prefill, the rest of the time is decoding. The best sample of each is kept: on a
    machine shared with other work, the least disturbed. `between`, if given, runs at the
    start of every round (untimed)."""
    fns: dict[str, Callable[[], object]] = {"": between} if between is not None else {}
    fns |= {
        f"{side}_{n}": functools.partial(fn, n)
        for side, fn in sides.items()
        for n in (1, new_tokens)
    }
    t = {name: min(ts) for name, ts in round_robin(fns, repeats).items()}
    prefill = {side: prompt_total / t[f"{side}_1"] for side in sides}
    decode = {
        side: decode_total / max(t[f"{side}_{new_tokens}"] - t[f"{side}_1"], 1e-9) for side in sides
    }
    return prefill, decode


def count_calls(fn: Callable[[], object]) -> int:
    """The ATen operator calls `fn` makes (every call PyTorch dispatches, views included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        fn()
    return counter.n


def profiled_calls(fn: Callable[[], object]) -> int:
    """The PyTorch operators `fn` calls from Python (profiled, not counting the operators
    they call in turn) plus the compiled kernels it runs (recorded when compiled with
    `torch._inductor.config.cpp.enable_kernel_profile`, as `bench_generate` does)."""
    from torch.profiler import profile

    with _quiet_stderr(), profile() as prof:
        fn()

    def top(event: Any) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::") and top(e))
    return ops + sum(1 for e in events if "cpp_fused" in e.name)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the process's standard error (the profiler's native library writes a line
    to it each time it starts and stops, which would interleave with the bench's output)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def calls_per_step(
    greedy: Greedy, counter: Callable[[Callable[[], object]], int] = count_calls
) -> int:
    """PyTorch calls of one more decode step: generating 3 tokens against generating 2 (the
    difference is one step of the decode loop, sampling and bookkeeping included)."""
    return counter(lambda: greedy(3)) - counter(lambda: greedy(2))


def _generator(model_dir: str | Path | None, preset: str, seed: int) -> Generator:
    """`model_dir`'s generator (token ids only for a directory without a tokenizer, as
    `moekit quantize --preset` writes), or one of a randomly initialised `preset`."""
    if model_dir is not None:
        from moekit.model_dir import ModelDir, load_model

        if any(ModelDir(model_dir).tokenizer_files()):
            return Generator.from_dir(model_dir)
        return Generator(load_model(model_dir, device="cpu"), ids_tokenizer())
    from moekit.model import build_model
    from moekit.presets import get_preset

    return Generator(build_model(get_preset(preset), seed=seed), ids_tokenizer())


def ids_tokenizer() -> Tokenizer:
    """A tokenizer for benches that feed token ids to a model without one: only its pad and
    end-of-text ids are used."""
    from moekit.data.tokenizer import Tokenizer

    return Tokenizer.train(["a b c"], 300)


def _ours(generator: Generator, prompts: torch.Tensor) -> Greedy:
    batch = [row.tolist() for row in prompts]

    def ours(n: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        return [c.token_ids for c in generator.generate(batch, params)]

    return ours


def _theirs(hf: Any, prompts: torch.Tensor, pad_id: int) -> Greedy:
    def theirs(n: int) -> list[list[int]]:
        with torch.no_grad():
            out = hf.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=None,  # never stop early, as ours with ignore_eos
                pad_token_id=pad_id,
            )
        return out[:, prompts.shape[1] :].tolist()

    return theirs
