"""Quantised weights as modules: `QuantWeight` (a packed weight, stacked over experts or not)
and `QuantLinear` (a drop-in for `nn.Linear`).

Shape legend: M rows, N output features, K input features, E experts.

A product `x @ w^T` is computed by one of three kernels, never by dequantising a whole
stacked tensor:

- "torch": the weight-only kernels PyTorch ships (`aten._weight_int8pack_mm`,
  `aten._weight_int4pack_mm_for_cpu`), reading the packed weights directly. PyTorch vectorises
  them on CPUs with AVX-512 for bfloat16 inputs; for float32 and float16 inputs, and on other
  CPUs, they run a loop whose time grows with every row (4 ms per row for a 2048 x 1024
  int4 expert on an AVX-512 Xeon, against 0.4 ms for one row through "compiled"; 1.4-2.3 ms
  per row for int8).
- "compiled" (int4 on CPU): `torch.compile`d kernels that read the stored nibbles directly
  (`moekit.quant.kernels`): for up to `kernels.FEW_ROWS` rows one fused loop that unpacks,
  scales and multiplies without writing a float weight; for more rows one compiled unpacking
  pass, then the float matmul. Compiled once per shape and row regime, on first use (seconds);
  when compiling fails it logs once and runs "dequant". int8 weights have no compiled kernel
  (none measured faster than "dequant") and run "dequant".
- "dequant": expands one weight (one expert's slice of a stacked tensor) to the input's dtype
  and multiplies; int8 applies its per-channel scale after the product. A weight larger than
  `DEQUANT_CHUNK` elements (an output head over a large vocabulary) is expanded and multiplied
  a block of output rows at a time, so the float copy never exists whole (the compiled
  kernel's many-rows pass, which expands the weight, hands such weights to this path).

"auto" (the default) is a fixed rule from measurements (`moekit bench quant --kernels`; the
figures are in docs/benchmarks.md): "torch" for bfloat16 inputs on AVX-512 CPUs (0.12 ms
for that expert's row, 3.5x "compiled"); otherwise "compiled" for int4
on CPU (1.6-1.8x a float32 matmul at one row at real expert shapes on an AVX2 CPU, where
"torch" and "dequant" are 8-9x slower than float32) and "dequant" for int8 (about 0.8x
float32; the scalar "torch" kernel 0.2x). A fixed rule rather than timing each choice at
start-up: on a shared machine a start-up timing picks differently from run to run, and the
differences it would resolve are smaller than that noise. Beyond single products: int4 SwiGLU
experts whose projections are all "auto" decode a step's few float32 tokens through the
native kernel of `moekit.moe.native` on AVX-512 CPUs, all three projections in one call
(`QuantExperts.native_parts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.quant import formats, kernels
from moekit.runtime import cpu_has_avx512

KERNELS = ("auto", "torch", "dequant", "compiled")
# Weights of more elements than this (16 MiB in float32) are expanded in blocks of output rows.
DEQUANT_CHUNK = 1 << 22


def auto_kernel(device: torch.device, bits: int = 8, dtype: torch.dtype = torch.float32) -> str:
    """The kernel "auto" means for `bits`-bit weights on `device` multiplying inputs of
    `dtype` (see the module docstring)."""
    if device.type != "cpu":
        return "dequant"
    if cpu_has_avx512() and dtype == torch.bfloat16:
        return "torch"
    return "compiled" if bits == 4 else "dequant"


class QuantWeight(nn.Module):
    """A weight of float shape `shape` ([E, N, K] stacked over experts, or [N, K]) stored as
    `formats` describes, in buffers `qweight`, `scale` (and `min` for 4 bits)."""

    qweight: Tensor
    scale: Tensor
    min: Tensor | None

    def __init__(
        self, shape: tuple[int, ...], bits: int, group: int | None, device: torch.device | None
    ) -> None:
        super().__init__()
        self.shape, self.bits, self.group = tuple(shape), bits, group
        self.kernel = "auto"
        dtypes = formats.stored_dtypes(bits)
        for part, part_shape in formats.stored_shapes(self.shape, bits, group).items():
            self.register_buffer(part, torch.empty(part_shape, dtype=dtypes[part], device=device))
        if bits == 8:
            self.register_buffer(formats.MIN, None)
        self._packed: dict[int | None, tuple[int, Tensor, Tensor]] = {}

    @classmethod
    def from_float(cls, w: Tensor, bits: int, group: int | None) -> QuantWeight:
        """`w` quantised (its device; the float tensor is not kept)."""
        q = cls(tuple(w.shape), bits, group, w.device)
        q.load_parts(formats.quantize(w, bits, group))
        return q

    def load_parts(self, parts: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, t in parts.items():
                getattr(self, name).copy_(t)
        self.forget()

    def parts(self, e: int | None = None) -> dict[str, Tensor]:
        """The stored tensors (of expert `e` when stacked)."""
        names = formats.stored_parts(self.bits)
        if e is None:
            return {n: getattr(self, n) for n in names}
        return {n: getattr(self, n)[e] for n in names}

    def kernel_parts(self) -> tuple[Tensor, ...]:
        """The stored tensors as `kernels.int4_product` / `int8_product` take them: int4
        (packed bytes viewed as int32 words, scale, min); int8 (qweight, scale)."""
        if self.bits == 8:
            return self.qweight, self.scale
        assert self.min is not None
        return self.qweight.view(torch.int32), self.scale, self.min

    def dequantize(self, e: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight (of expert `e` when stacked): [N, K], or [E, N, K] for e=None."""
        return formats.dequantize(self.parts(e), self.bits, self.group, dtype)

    def matmul(self, x_MK: Tensor, e: int | None = None) -> Tensor:
        """`x_MK @ w^T` (w: expert `e`'s weight when stacked): (M, N) in x's dtype."""
        kernel = self.kernel
        if kernel == "auto":
            kernel = auto_kernel(x_MK.device, self.bits, x_MK.dtype)
            if kernel == "torch" and not self._torch_kernel_fits(x_MK):
                kernel = auto_kernel(x_MK.device, self.bits)  # the choice for other inputs
        if kernel == "torch" and self._torch_kernel_fits(x_MK):
            return self._torch_matmul(x_MK.contiguous(), e)
        big = self.shape[-2] * self.shape[-1] > DEQUANT_CHUNK
        if (
            kernel == "compiled"
            and self.bits == 4
            and kernels.fits(x_MK, self.shape, self.group)
            and not (big and kernels.regime(x_MK.shape[0]) == "many")  # it would expand w
        ):
            assert self.group is not None and self.min is not None
            q, scale, lo = self.qweight, self.scale, self.min
            if e is not None:
                q, scale, lo = q[e], scale[e], lo[e]
            out = kernels.compiled_matmul(x_MK, q, scale, lo, self.group)
            if out is not None:
                return out
        parts = self.parts(e)
        if not big:
            return self._dequant_matmul(x_MK, parts)
        # A large weight (an output head over a big vocabulary) is expanded a block of output
        # rows at a time: the float copy of all of it would be larger than the packed weights.
        step = max(16, DEQUANT_CHUNK // self.shape[-1])
        outs = []
        for start in range(0, self.shape[-2], step):
            block = {k: v[start : start + step] for k, v in parts.items()}
            outs.append(self._dequant_matmul(x_MK, block))
        return torch.cat(outs, dim=-1)

    def _dequant_matmul(self, x_MK: Tensor, parts: dict[str, Tensor]) -> Tensor:
        """`x_MK @ w^T` with `w` (these stored parts, [N, ...]) expanded to x's dtype."""
        if self.bits == 8:
            q, scale = parts[formats.QWEIGHT], parts[formats.SCALE]
            return F.linear(x_MK, q.to(x_MK.dtype)) * scale.to(x_MK.dtype)
        return F.linear(x_MK, formats.dequantize(parts, self.bits, self.group, x_MK.dtype))

    def _torch_kernel_fits(self, x: Tensor) -> bool:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.half):
            return False
        # The int4 kernel wants N divisible by 16 and one of its group sizes.
        return self.bits == 8 or (self.shape[-2] % 16 == 0 and self.group in (32, 64, 128, 256))

    def _torch_matmul(self, x_MK: Tensor, e: int | None) -> Tensor:
        parts = self.parts(e)
        if self.bits == 8:
            scale = parts[formats.SCALE].to(x_MK.dtype)
            out: Tensor = torch.ops.aten._weight_int8pack_mm(x_MK, parts[formats.QWEIGHT], scale)
            return out
        packed, scale_zeros = self._int4_packed(e, x_MK.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x_MK, packed, self.group, scale_zeros)
        return out

    def _int4_packed(self, e: int | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The kernel's own layout of expert `e`'s weight (made once, then kept): its packing
        is specific to the CPU, so the directory stores the portable nibbles instead."""
        version = self.qweight._version
        cached = self._packed.get(e)
        if cached is None or cached[0] != version or cached[2].dtype != dtype:
            parts = self.parts(e)
            q_NK = formats.unpack_int4(parts[formats.QWEIGHT]).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_NK, 1)
            scale, lo = parts[formats.SCALE], parts[formats.MIN]
            # The kernel computes w = (q - 8) * scale + zero.
            zero = lo + 8 * scale
            scale_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(dtype).contiguous()
            cached = (version, packed, scale_zeros)
            self._packed[e] = cached
        return cached[1], cached[2]

    def forget(self, e: int | None = None) -> None:
        """Drop what the kernels derived from the stored tensors (of expert `e`, or all): call
        after writing into them other than through `load_parts` (a paged expert's slot)."""
        if e is None:
            self._packed.clear()
        else:
            self._packed.pop(e, None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group else ""
        return f"shape={self.shape}, bits={self.bits}{group}, kernel={self.kernel}"


class QuantLinear(QuantWeight):
    """`nn.Linear` with a quantised weight: `forward(x)` takes any leading dimensions."""

    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group: int | None,
        *,
        bias: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__((out_features, in_features), bits, group, device)
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int, group: int | None) -> QuantLinear:
        q = cls(
            lin.in_features,
            lin.out_features,
            bits,
            group,
            bias=lin.bias is not None,
            device=lin.weight.device,
        )
        if lin.weight.device.type != "meta":
            q.load_parts(formats.quantize(lin.weight, bits, group))
            if lin.bias is not None and q.bias is not None:
                with torch.no_grad():
                    q.bias.copy_(lin.bias)
        return q

    def forward(self, x: Tensor) -> Tensor:
        out = self.matmul(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(out.dtype)
