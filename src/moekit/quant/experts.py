"""Routed experts with quantised weights, computed per expert like the float backends.

Shape legend: S kept token copies, D model dim, F expert hidden dim, E experts.

`QuantExperts` holds `w_gate` / `w_up` (float shape [E, F, D]) and `w_down` ([E, D, F]) as
`QuantWeight`s. `BACKEND` computes them over expert-sorted rows: one kernel call per
projection per non-empty expert, reading only that expert's packed slice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.moe import native
from moekit.moe.decode_kernel import ExpertsKernel, Product
from moekit.moe.experts import ExpertBackend, Experts, beyond_plain, decode_experts
from moekit.nn.mlp import Activation
from moekit.quant import kernels
from moekit.quant.weight import QuantWeight

PROJECTIONS = ("w_gate", "w_up", "w_down")


class QuantExperts(nn.Module):
    """E feed-forward experts whose stacked weights are quantised (see `QuantWeight`); their
    biases (`b_gate`, `b_up` (E, F), `b_down` (E, D), gpt-oss) stay float."""

    w_gate: QuantWeight | None
    b_gate: nn.Parameter | None
    b_up: nn.Parameter | None
    b_down: nn.Parameter | None
    one_token_kernel: bool = True  # as `Experts.one_token_kernel`

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str | Activation,
        bits: int,
        group: int | None,
        device: torch.device | None = None,
        *,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.act_fn = Activation.coerce(activation)
        self.activation, self.bits, self.group = self.act_fn.kind, bits, group
        E, D, F_ = num_experts, dim, hidden
        gate = self.act_fn.gated
        self.w_gate = QuantWeight((E, F_, D), bits, group, device) if gate else None
        self.w_up = QuantWeight((E, F_, D), bits, group, device)
        self.w_down = QuantWeight((E, D, F_), bits, group, device)
        for name, shape, present in (
            ("b_gate", (E, F_), bias and gate),
            ("b_up", (E, F_), bias),
            ("b_down", (E, D), bias),
        ):
            b = nn.Parameter(torch.zeros(shape, device=device)) if present else None
            self.register_parameter(name, b)

    def plain_math(self) -> str | None:
        """As `Experts.plain_math`: what the one-token kernel does not compute."""
        return beyond_plain(self.activation, self.b_up is not None)

    @classmethod
    def like(cls, ex: Experts, bits: int, group: int | None) -> QuantExperts:
        """Quantised experts of `ex`'s shapes; its weights quantised (its biases copied)
        unless on the meta device."""
        if len(ex.adapters):
            raise ValueError(
                "experts with low-rank adapters cannot be quantised; merge the adapter first"
            )
        device = ex.w_up.device
        bias = ex.b_up is not None
        q = cls(ex.num_experts, ex.dim, ex.hidden, ex.act_fn, bits, group, device, bias=bias)
        if device.type != "meta":
            for name in PROJECTIONS:
                w = getattr(ex, name)
                if w is not None:
                    setattr(q, name, QuantWeight.from_float(w, bits, group))
            q.load_state_dict(_biases(ex), strict=False)
        return q

    def dequantized(self) -> Experts:
        """Float experts holding this module's weights dequantised (the test oracle)."""
        bias = self.b_up is not None
        ex = Experts(self.num_experts, self.dim, self.hidden, self.act_fn, bias=bias)
        with torch.no_grad():
            for name in PROJECTIONS:
                w = getattr(self, name)
                if w is not None:
                    getattr(ex, name).copy_(w.dequantize())
        ex.load_state_dict(_biases(self), strict=False)
        return ex.to(self.w_up.parts()["qweight"].device)

    def act(self, gate: Tensor | None, up: Tensor) -> Tensor:
        return self.act_fn(gate, up)

    def project(self, name: str, x_NI: Tensor, e: int) -> Tensor:
        """Expert e's projection `name` of rows `x_NI`, from the packed weight, plus its bias."""
        out = getattr(self, name).matmul(x_NI, e)
        b: Tensor | None = getattr(self, "b" + name[1:])  # w_up -> b_up
        return out if b is None else out + b[e].to(out.dtype)

    # ---- the expert-store contract (see moekit.moe.experts.Experts) ---------------------

    def backend_for(
        self, name: str, copies: int, num_experts: int, device: torch.device
    ) -> ExpertBackend:
        """`BACKEND` whatever the config names: packed weights have one way to compute."""
        return BACKEND

    def can_decode(self) -> bool:
        return True

    def compute(
        self, backend: ExpertBackend, x_SD: Tensor, expert_S: Tensor, counts_E: Tensor,
        scale_S: Tensor,
    ) -> Tensor:  # fmt: skip
        """`backend` (the one `backend_for` gave the layer) on these experts."""
        return backend.fn(x_SD, expert_S, counts_E, scale_S, self)  # type: ignore[arg-type]

    def decode(self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """The routed experts' weighted sum for a few tokens (`decode_experts`)."""
        return decode_experts(x_TD, experts_TK, weights_TK, self)

    def decode_fn(self) -> Callable[[Tensor, int], Tensor]:
        """`fn(x_ND, e)`: expert e on a few rows, from its packed weights."""
        return self.expert_forward

    def token_kernel(self) -> Callable[[Tensor, Tensor, Tensor], Tensor | None] | None:
        """For one decoded token: its experts' weighted sum as one compiled kernel reading the
        packed weights (`Experts.token_kernel`); None for GELU experts, with
        `one_token_kernel` off, or when a projection's kernel was set to "dequant" or "torch"
        (`set_kernel`: then that kernel runs, as asked)."""
        if self.w_gate is None or not self.one_token_kernel or self.plain_math() is not None:
            return None
        weights = (self.w_gate, self.w_up, self.w_down)
        if any(w.kernel not in ("auto", "compiled") for w in weights):
            return None
        kernel = _TOKEN_KERNELS[self.bits]
        _, gate, up, down = self.token_math()
        if self.bits == 4 and native.enabled():  # `native_parts` says when it applies
            return lambda x, e, w: (  # the native kernel where it builds, else the compiled one
                native.grouped_swiglu_int4(x, e, w, *parts, scale_input=False)
                if native.load() and (parts := self.native_parts(x)) is not None
                else kernel(x, e, w, gate, up, down)
            )
        return lambda x, e, w: kernel(x, e, w, gate, up, down)

    def native_parts(self, x_TD: Tensor) -> tuple[Tensor, ...] | None:
        """The nine stored tensors that the native int4 kernel reads (`moekit.moe.native`:
        the gate's, the up's and the down's packed bytes, scales and minimums) where it
        computes these experts for `x_TD`: int4 SwiGLU experts, every projection's kernel
        "auto", the kernel loaded; else None."""
        if self.bits != 4 or self.w_gate is None or self.plain_math() is not None:
            return None
        weights = (self.w_gate, self.w_up, self.w_down)
        if any(w.kernel != "auto" or w.min is None for w in weights):
            return None
        parts = tuple(t for w in weights for t in (w.qweight, w.scale, w.min) if t is not None)
        group = min(w.group or 0 for w in weights)
        return parts if native.takes_int4(x_TD, group, *parts) else None

    def token_math(
        self,
    ) -> tuple[Product, tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
        """What `moekit.moe.decode_kernel.swiglu_sum` takes for these SwiGLU experts: the
        packed-weight product of this bit width and each projection's stored tensors."""
        assert self.w_gate is not None
        product = kernels.int4_product if self.bits == 4 else kernels.int8_product
        parts = (self.w_gate.kernel_parts(), self.w_up.kernel_parts())
        return product, *parts, self.w_down.kernel_parts()

    def expert_forward(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert `e` on rows `x_ND` (gate, up and down products from the packed weights)."""
        gate = self.project("w_gate", x_ND, e) if self.w_gate is not None else None
        return self.project("w_down", self.act(gate, self.project("w_up", x_ND, e)), e)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
            f"activation={self.activation}, bits={self.bits}"
        )


def quantized_experts(
    x_SD: Tensor, expert_S: Tensor, counts_E: Tensor, scale_S: Tensor, ex: nn.Module
) -> Tensor:
    """`scale_S * expert(x_SD)` for expert-sorted rows: per non-empty expert, its gate, up
    and down products from the packed weights (the float backends' row contract)."""
    assert isinstance(ex, QuantExperts)
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if not n:
            continue
        x = x_SD[start : start + n]
        gate = ex.project("w_gate", x, e) if ex.w_gate is not None else None
        h_NF = ex.act(gate, ex.project("w_up", x, e))
        scale_N1 = scale_S[start : start + n].to(h_NF.dtype).unsqueeze(1)
        if ex.b_down is None:
            outs.append(ex.w_down.matmul(h_NF * scale_N1, e))
        else:  # the bias is added after the product: scale the output
            outs.append(ex.project("w_down", h_NF, e) * scale_N1)
        start += n
    if not outs:
        return x_SD.new_zeros(0, ex.dim)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _biases(ex: nn.Module) -> dict[str, Tensor]:
    """The expert biases of `ex` by name (none for experts without them)."""
    return {
        n: b.detach()
        for n in ("b_gate", "b_up", "b_down")
        if (b := getattr(ex, n, None)) is not None
    }


_TOKEN_KERNELS = {
    4: ExpertsKernel(kernels.int4_product, "the one-token int4 experts kernel", kernels.OPTIONS),
    8: ExpertsKernel(kernels.int8_product, "the one-token int8 experts kernel", kernels.OPTIONS),
}

BACKEND = ExpertBackend(
    "quantized",
    quantized_experts,
    needs_sorted=True,
    description="packed weights, one kernel call per projection per non-empty expert",
)
