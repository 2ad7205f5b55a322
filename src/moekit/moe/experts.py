"""Routed experts: stacked weights and a registry of backends that compute them.

Shape legend: S kept token copies, D model dim, F expert hidden dim, E experts.

Weights are stacked over experts: `w_gate_EFD`, `w_up_EFD` (SwiGLU: silu(x W_gate^T) *
(x W_up^T); GELU: gelu(x W_up^T) with no gate; gpt-oss's clamped SwiGLU, see
`moekit.nn.mlp.Activation`) and `w_down_EDF`, optionally with biases `b_gate_EF`, `b_up_EF`,
`b_down_ED` added after each projection (`MoEConfig.expert_bias`). A backend is called as
`fn(x_SD, expert_S, counts_E, scale_S, experts)` and returns `scale_S * expert(x_SD)` row by
row, in the same row order: each copy's expert output already multiplied by its routing
weight. Backends that set `needs_sorted` receive rows grouped by expert in expert order (see
`moekit.moe.dispatch.plan`); `counts_E` gives the group sizes.

- `eager`: the reference. A plain loop over experts with boolean masks; slow, obviously
  correct; every other backend is tested against it (outputs and gradients).
- `grouped`: one grouped GEMM per projection over the expert-sorted rows
  (`torch._grouped_mm` where this torch build runs it for the dtype and device; otherwise
  contiguous-slice matmuls, one per non-empty expert).
- `sliced`: contiguous-slice matmuls, one per non-empty expert, over the expert-sorted rows.
- `gather`: the small-batch decode path: gathers each copy's expert weights and uses batched
  matmuls; no sorting. Cost grows with copies x expert size, so it only pays for a few tokens.
- `auto`: picks per call from the number of copies and the device (see `select_backend`).

Decoding without autograd takes `decode_experts` instead of a backend: gate and up as one
matmul per expert over their weights fused in memory (`w_gate` and `w_up` become views of one
(E, 2F, D) tensor; stored names and shapes do not change), no sorting kernels, and one small
matmul that applies the routing weights and sums each token's experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.moe import native
from moekit.moe.decode_kernel import (
    Product,
    float_product,
    grouped_rows,
    library_reads,
    swiglu_experts,
)
from moekit.nn.fuse import UNFUSED, Fused
from moekit.nn.mlp import Activation

ExpertFn = Callable[[Tensor, Tensor, Tensor, Tensor, "Experts"], Tensor]


@dataclass(frozen=True)
class ExpertBackend:
    name: str
    fn: ExpertFn
    needs_sorted: bool
    description: str


BACKENDS: dict[str, ExpertBackend] = {}


def register_backend(
    name: str, *, needs_sorted: bool, description: str
) -> Callable[[ExpertFn], ExpertFn]:
    """Add an expert backend to the registry under `name` (used by `MoEConfig.backend`)."""

    def wrap(fn: ExpertFn) -> ExpertFn:
        BACKENDS[name] = ExpertBackend(name, fn, needs_sorted, description)
        return fn

    return wrap


def beyond_plain(activation: str, bias: bool) -> str | None:
    """What experts of `activation`, with biases or not, have beyond `silu(gate) * up` or
    `gelu(up)` without biases, in words; None for nothing."""
    if bias:
        return "experts with biases (moe.expert_bias)"
    if activation == "clamped_swiglu":
        return "clamped SwiGLU experts (activation='clamped_swiglu')"
    return None


class ExpertAdapter(Protocol):
    """A low-rank update of one stacked projection (see moekit.finetune.lora), computed per
    expert in the same three ways the backends compute the projection itself."""

    def grouped(self, x_SI: Tensor, counts_E: Tensor) -> Tensor: ...
    def one(self, x_NI: Tensor, e: int) -> Tensor: ...
    def gathered(self, x_S1I: Tensor, expert_S: Tensor) -> Tensor: ...


class Experts(nn.Module):
    """E feed-forward experts with stacked weights.

    `adapters` may hold a low-rank update for "w_gate", "w_up" and "w_down" (LoRA): every
    backend adds it to the projection, batched per expert like the projection itself.
    """

    w_gate: nn.Parameter | None
    b_gate: nn.Parameter | None
    b_up: nn.Parameter | None
    b_down: nn.Parameter | None
    # Whether one decoded token runs its experts as one compiled kernel (moekit.moe.
    # decode_kernel; on the CPU, SwiGLU experts). Off: the per-expert eager loop.
    one_token_kernel: bool = True

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str | Activation = "swiglu",
        *,
        bias: bool = False,
    ):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.act_fn = Activation.coerce(activation)
        self.activation = self.act_fn.kind
        E, D, F_ = num_experts, dim, hidden
        gated = self.act_fn.gated
        self.register_parameter("w_gate", nn.Parameter(torch.empty(E, F_, D)) if gated else None)
        self.w_up = nn.Parameter(torch.empty(E, F_, D))
        self.w_down = nn.Parameter(torch.empty(E, D, F_))
        # Biases (gpt-oss): b_gate/b_up (E, F), b_down (E, D), added after each projection.
        for name, shape, present in (
            ("b_gate", (E, F_), bias and gated),
            ("b_up", (E, F_), bias),
            ("b_down", (E, D), bias),
        ):
            self.register_parameter(name, nn.Parameter(torch.empty(shape)) if present else None)
        self.adapters = nn.ModuleDict()
        self._gate_up = Fused(dim=1)

    def plain_math(self) -> str | None:
        """None for experts computed as `silu(gate) * up` or `gelu(up)` without biases (what
        the compiled decode paths implement), else what they have beyond it."""
        return beyond_plain(self.activation, self.b_up is not None)

    def _bias(self, name: str) -> Tensor | None:
        b: Tensor | None = getattr(self, "b" + name[1:])  # w_up -> b_up
        return b

    def fused_gate_up(self) -> Tensor | None:
        """(E, 2F, D): each expert's gate rows then its up rows, one tensor that `w_gate` and
        `w_up` are views of (made at the first call); None for GELU experts."""
        if self.w_gate is None:
            return None
        return self._gate_up.get([self.w_gate, self.w_up])

    def train(self, mode: bool = True) -> Experts:
        # Training wants contiguous stacked weights (the grouped GEMM and its gradients):
        # give the gate and up projections their own storage again.
        if mode and self._gate_up.tensor is not None:
            # Never an inference-mode tensor (this may run inside inference mode).
            with torch.no_grad(), torch.inference_mode(False):
                for w in (self.w_gate, self.w_up):
                    if w is not None:
                        w.data = w.data.contiguous()
            self._gate_up.tensor = None
        return super().train(mode)

    def _adapter(self, name: str) -> ExpertAdapter | None:
        return self.adapters[name] if name in self.adapters else None  # type: ignore[return-value]  # noqa: SIM401 (ModuleDict has no get)

    def linear_one(self, name: str, x_NI: Tensor, e: int, w_OI: Tensor | None = None) -> Tensor:
        """Expert e's projection `name` of rows `x_NI` (`w_OI`: that expert's weight view)."""
        w = getattr(self, name)[e] if w_OI is None else w_OI
        b = self._bias(name)
        out = F.linear(x_NI, w, None if b is None else b[e])
        adapter = self._adapter(name)
        return out if adapter is None else out + adapter.one(x_NI, e)

    def linear_grouped(self, name: str, x_SI: Tensor, counts_E: Tensor) -> Tensor:
        """Projection `name` of expert-sorted rows, one grouped GEMM (plus its adapter's)."""
        out = grouped_linear(x_SI, getattr(self, name), counts_E)
        b_EO = self._bias(name)
        if b_EO is not None:
            rows_S = torch.repeat_interleave(counts_E.to(torch.long), output_size=x_SI.shape[0])
            out = out + b_EO.to(out.dtype)[rows_S.to(out.device)]
        adapter = self._adapter(name)
        return out if adapter is None else out + adapter.grouped(x_SI, counts_E)

    def linear_gathered(self, name: str, x_S1I: Tensor, expert_S: Tensor) -> Tensor:
        """Projection `name` of each row by its own expert's gathered weight: (S, 1, O)."""
        out = torch.bmm(x_S1I, getattr(self, name)[expert_S].transpose(1, 2))
        b_EO = self._bias(name)
        if b_EO is not None:
            out = out + b_EO[expert_S].unsqueeze(1).to(out.dtype)
        adapter = self._adapter(name)
        return out if adapter is None else out + adapter.gathered(x_S1I, expert_S)

    def act(self, gate: Tensor | None, up: Tensor) -> Tensor:
        return self.act_fn(gate, up)

    # ---- what the MoE layer calls (the expert-store contract) ----------------------------
    # Stores that hold their weights another way (quantised: moekit.quant.experts; paged from
    # disk: moekit.infer.expert_cache) provide the same five methods.

    def backend_for(
        self, name: str, copies: int, num_experts: int, device: torch.device
    ) -> ExpertBackend:
        """The backend that computes `copies` token copies routed over `num_experts` experts
        (`select_backend`; a store that brings its own compute returns that)."""
        return select_backend(name, copies, num_experts, device)

    def can_decode(self) -> bool:
        """Whether `decode` may be used (no adapters: they need the backends' batched calls;
        weights that may be fused in memory: see `moekit.nn.fuse.keep_unfused`)."""
        return not len(self.adapters) and not getattr(self, UNFUSED, False)

    def compute(
        self, backend: ExpertBackend, x_SD: Tensor, expert_S: Tensor, counts_E: Tensor,
        scale_S: Tensor,
    ) -> Tensor:  # fmt: skip
        """`backend` on these experts (a paged store brings the experts the rows need into
        memory first)."""
        return backend.fn(x_SD, expert_S, counts_E, scale_S, self)

    def decode(self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """`decode_experts` on these experts (overridden like `compute` by a paged store)."""
        return decode_experts(x_TD, experts_TK, weights_TK, self)

    def decode_fn(self) -> Callable[[Tensor, int], Tensor]:
        """For one decode step: `fn(x_ND, e)`, expert e on a few rows without autograd (gate
        and up as one matmul over their weights fused in memory)."""
        gate_up = self.fused_gate_up()
        if gate_up is None or self.plain_math() is not None:
            return self.expert_forward
        w_down, hidden = self.w_down, self.hidden

        def one(x_ND: Tensor, e: int) -> Tensor:
            gate, up = F.linear(x_ND, gate_up[e]).split(hidden, dim=-1)
            return F.linear(F.silu(gate) * up, w_down[e])

        return one

    def token_kernel(self) -> Callable[[Tensor, Tensor, Tensor], Tensor | None] | None:
        """For one decoded token: `fn(x_1D, experts_1K, weights_1K)`, its experts' weighted sum
        as one compiled kernel (None from `fn`: run eagerly); None for GELU experts or with
        `one_token_kernel` off."""
        if self.w_gate is None or not self.one_token_kernel or self.plain_math() is not None:
            return None
        if library_reads(self.w_down[0]):  # large experts: streamed, or the library's products
            return self._streamed
        _, gate, up, down = self.token_math()
        return lambda x, e, w: swiglu_experts(x, e, w, gate, up, down)

    def _streamed(self, x_1D: Tensor, experts_1K: Tensor, weights_1K: Tensor) -> Tensor | None:
        """Large experts through the native streaming kernel (`moekit.moe.native`), or None
        where it is not built (the caller then runs the library's products)."""
        gate_up, w_down = self.fused_gate_up(), self.w_down
        if gate_up is None or not (native.load() and native.takes(x_1D, gate_up, w_down)):
            return None
        return native.grouped_swiglu(x_1D, experts_1K, weights_1K, gate_up, w_down, False)

    def token_math(self) -> tuple[Product, tuple[Tensor], tuple[Tensor], tuple[Tensor]]:
        """What `moekit.moe.decode_kernel.swiglu_sum` takes for these SwiGLU experts: the
        product and each projection's stacked weights (gate and up as the eager loop lays
        them out, views of one fused tensor, so that both paths compile one kernel)."""
        assert self.w_gate is not None
        self.fused_gate_up()
        return float_product, (self.w_gate,), (self.w_up,), (self.w_down,)

    def expert_forward(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert `e` on rows `x_ND` (the single-expert building block the loops use)."""
        gate = self.linear_one("w_gate", x_ND, e) if self.w_gate is not None else None
        return self.linear_one("w_down", self.act(gate, self.linear_one("w_up", x_ND, e)), e)

    def init_weights(
        self, std: float, out_std: float, generator: torch.Generator | None = None
    ) -> None:
        for w in (self.w_gate, self.w_up):
            if w is not None:
                nn.init.normal_(w, mean=0.0, std=std, generator=generator)
        nn.init.normal_(self.w_down, mean=0.0, std=out_std, generator=generator)
        for b in (self.b_gate, self.b_up, self.b_down):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
            f"activation={self.activation}, bias={self.b_up is not None}"
        )


# ---- backends ------------------------------------------------------------------------------


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on `x` produce: the autocast dtype inside autocast, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


@register_backend("eager", needs_sorted=False, description="reference loop over experts")
def eager_experts(
    x_SD: Tensor, expert_S: Tensor, counts_E: Tensor, scale_S: Tensor, ex: Experts
) -> Tensor:
    y_SD = x_SD.new_zeros(x_SD.shape[0], ex.dim, dtype=compute_dtype(x_SD))
    for e in range(ex.num_experts):
        rows = (expert_S == e).nonzero().squeeze(1)
        if rows.numel():
            y_SD = y_SD.index_put((rows,), ex.expert_forward(x_SD[rows], e))
    return y_SD * scale_S.to(y_SD.dtype).unsqueeze(1)


def _scaled_down(
    ex: Experts, h_SF: Tensor, scale_S: Tensor, down: Callable[[Tensor], Tensor]
) -> Tensor:
    # Scaling the (S, F) hidden rows before the down projection equals scaling the (S, D)
    # outputs after it; scale whichever side is smaller (fine-grained experts: F < D).
    scale = scale_S.to(h_SF.dtype).unsqueeze(1)
    if ex.hidden <= ex.dim and ex.b_down is None:  # a bias is added after the product
        return down(h_SF * scale)
    return down(h_SF) * scale


def _per_expert(w: Tensor) -> Tensor | tuple[Tensor, ...]:
    """Per-expert views of a stacked weight for a Python loop over experts.

    With autograd, `unbind` makes backward stack the per-expert gradients once; indexing
    `w[e]` in the loop would allocate a full (E, ...) gradient for every expert. Without
    autograd, plain indexing is cheaper than creating E views.
    """
    if not (torch.is_grad_enabled() and w.requires_grad):
        return w
    return w.unbind(0)


@register_backend("sliced", needs_sorted=True, description="one matmul per expert slice")
def sliced_experts(
    x_SD: Tensor, expert_S: Tensor, counts_E: Tensor, scale_S: Tensor, ex: Experts
) -> Tensor:
    w_up, w_down = _per_expert(ex.w_up), _per_expert(ex.w_down)
    w_gate = _per_expert(ex.w_gate) if ex.w_gate is not None else None
    outs = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            rows = slice(start, start + n)
            x = x_SD[rows]
            gate = ex.linear_one("w_gate", x, e, w_gate[e]) if w_gate is not None else None
            h = ex.act(gate, ex.linear_one("w_up", x, e, w_up[e]))
            down = partial(ex.linear_one, "w_down", e=e, w_OI=w_down[e])
            outs.append(_scaled_down(ex, h, scale_S[rows], down))
            start += n
    if not outs:
        return x_SD.new_zeros(0, ex.dim)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class _GroupedMM(torch.autograd.Function):
    """`torch._grouped_mm` with an explicit backward (its own needs contiguous gradients)."""

    @staticmethod
    def forward(ctx, x_SK: Tensor, w_EKN: Tensor, offs_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_SK, w_EKN, offs_E)
        return torch._grouped_mm(x_SK, w_EKN, offs=offs_E)

    @staticmethod
    def backward(ctx, grad_SN: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_SK, w_EKN, offs_E = ctx.saved_tensors
        grad_SN = grad_SN.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_SN, w_EKN.transpose(-2, -1), offs=offs_E)
        if ctx.needs_input_grad[1]:
            grad_w = torch._grouped_mm(x_SK.t(), grad_SN, offs=offs_E)
            # Experts that received no rows get an exactly-zero gradient (not every kernel
            # writes their block).
            empty_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1)) == 0
            if bool(empty_E.any()):
                grad_w = grad_w.masked_fill(empty_E.view(-1, 1, 1), 0.0)
        return grad_x, grad_w, None


def _aligned(t: Tensor) -> bool:
    # The kernels want 16-byte aligned data and row strides.
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride() if s != 1)


def grouped_mm_available(x: Tensor, w: Tensor) -> bool:
    """Whether this torch build runs `torch._grouped_mm` for these operands."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if not (_aligned(x) and _aligned(w)):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def grouped_linear(x_SD: Tensor, w_ENK: Tensor, counts_E: Tensor) -> Tensor:
    """Rows of expert e (contiguous, in expert order) times `w_ENK[e]^T`: (S, N).

    Follows autocast like `F.linear` does: inside an autocast region both operands are cast
    to the autocast dtype first (the grouped kernel itself is not autocast-aware)."""
    dtype = compute_dtype(x_SD)
    x_SD, w_ENK = x_SD.to(dtype), w_ENK.to(dtype)
    # Rows of the input (K wide) and of the output and its gradient (N wide) must be 16-byte
    # aligned: a LoRA rank of 2, or 4 in bf16, is too narrow for the kernel and takes the
    # per-expert path.
    size = w_ENK.element_size()
    rows_aligned = w_ENK.shape[1] * size % 16 == 0 and w_ENK.shape[2] * size % 16 == 0
    if rows_aligned and grouped_mm_available(x_SD, w_ENK):
        offs_E = counts_E.cumsum(0).to(torch.int32)
        out: Tensor = _GroupedMM.apply(x_SD, w_ENK.transpose(-2, -1), offs_E)
        return out
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            outs.append(F.linear(x_SD[start : start + n], w_ENK[e]))
            start += n
    if not outs:
        return x_SD.new_zeros(0, w_ENK.shape[1])
    return torch.cat(outs)


@register_backend("grouped", needs_sorted=True, description="grouped GEMM over sorted rows")
def grouped_experts(
    x_SD: Tensor, expert_S: Tensor, counts_E: Tensor, scale_S: Tensor, ex: Experts
) -> Tensor:
    gate = ex.linear_grouped("w_gate", x_SD, counts_E) if ex.w_gate is not None else None
    h_SF = ex.act(gate, ex.linear_grouped("w_up", x_SD, counts_E))
    return _scaled_down(ex, h_SF, scale_S, lambda h: ex.linear_grouped("w_down", h, counts_E))


@register_backend("gather", needs_sorted=False, description="gathered weights + bmm (decode)")
def gather_experts(
    x_SD: Tensor, expert_S: Tensor, counts_E: Tensor, scale_S: Tensor, ex: Experts
) -> Tensor:
    x_S1D = x_SD.unsqueeze(1)
    up = ex.linear_gathered("w_up", x_S1D, expert_S)
    gate = ex.linear_gathered("w_gate", x_S1D, expert_S) if ex.w_gate is not None else None
    scale_S11 = scale_S.to(up.dtype).view(-1, 1, 1)
    if ex.b_down is not None:  # the bias is added after the product: scale the output
        return (ex.linear_gathered("w_down", ex.act(gate, up), expert_S) * scale_S11).squeeze(1)
    return ex.linear_gathered("w_down", ex.act(gate, up) * scale_S11, expert_S).squeeze(1)


class DecodingStore(Protocol):
    """What `decode_experts` needs of an expert store."""

    dim: int

    def decode_fn(self) -> Callable[[Tensor, int], Tensor]: ...

    def token_kernel(self) -> Callable[[Tensor, Tensor, Tensor], Tensor | None] | None: ...


def decode_experts(
    x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, ex: DecodingStore
) -> Tensor:
    """The routed experts' weighted sum for each of a few tokens, without autograd: (T, D).

    `experts_TK` may hold -1 for an empty slot. The caller guarantees that the store can
    decode (`can_decode`: no adapters) and that autograd is off.
    """
    if experts_TK.shape[0] == 1 and (kernel := ex.token_kernel()) is not None:
        y_1D = kernel(x_TD, experts_TK, weights_TK)
        if y_1D is not None:
            return y_1D
    return grouped_rows(x_TD, experts_TK, weights_TK, ex.decode_fn())


def select_backend(
    name: str, num_copies: int, num_experts: int, device: torch.device
) -> ExpertBackend:
    """The backend called `name`; for "auto", the one expected fastest for this shape.

    auto: decode-sized batches (no more token copies than experts) go to `sliced` on CPU,
    which touches only the chosen experts with one small matmul each, and to `gather` on
    GPUs, where one batched kernel beats many small launches; larger batches use `grouped`.
    """
    if name == "auto":
        if num_copies > num_experts:
            name = "grouped"
        else:
            name = "sliced" if device.type == "cpu" else "gather"
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown expert backend {name!r}; available: auto, {', '.join(BACKENDS)}"
        ) from None
