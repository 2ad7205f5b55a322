"""Weights fused in memory for inference: one tensor whose slices are the model's parameters.

A decode step multiplies one token by many small matrices; every matmul is a PyTorch call with
a fixed cost that dwarfs its arithmetic at small sizes. Projections that read the same input
(attention's q, k and v; a SwiGLU's gate and up) are cheaper as one matmul over their
concatenated weights. `fused` builds that concatenation once and makes each parameter a view
of its slice, so the weights are held once, the parameters (names, shapes, what is saved) are
unchanged, and an in-place update of a parameter (loading a state dict, merging an adapter)
is seen by the fused tensor. A parameter that is given new storage (`.to()`, a new `.data`)
no longer points into the fused tensor; `fused` notices and builds it again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def is_fused(fused: Tensor | None, parts: Sequence[Tensor], dim: int) -> bool:
    """Whether `parts` are, in order, the consecutive slices of `fused` along `dim`."""
    if fused is None:
        return False
    step = fused.stride(dim) * fused.element_size()
    start, offset = fused.data_ptr(), 0
    for p in parts:
        if (
            p.dtype != fused.dtype
            or p.device != fused.device
            or p.data_ptr() != start + offset * step
            or p.stride() != fused.stride()
        ):
            return False
        offset += p.shape[dim]
    return offset == fused.shape[dim]


@torch.no_grad()
def fuse(parts: Sequence[Tensor], dim: int) -> Tensor:
    """Concatenate `parts` along `dim` into one new tensor and make each part a view of its
    slice of it. Returns the fused tensor (never an inference-mode tensor: the parameters
    must stay usable for training)."""
    with torch.inference_mode(False):
        fused = torch.cat([p.detach() for p in parts], dim=dim)
    offset = 0
    for p in parts:
        p.data = fused.narrow(dim, offset, p.shape[dim])
        offset += p.shape[dim]
    return fused


class Fused:
    """The fused weight of some parameters of one module, rebuilt when they move."""

    def __init__(self, dim: int = 0) -> None:
        self.dim = dim
        self.tensor: Tensor | None = None

    def get(self, parts: Sequence[Tensor]) -> Tensor:
        if not is_fused(self.tensor, parts, self.dim):
            self.tensor = fuse(parts, self.dim)
        assert self.tensor is not None
        return self.tensor


# Set on modules whose parameters' storage is managed by something else (FSDP2 gathers them
# into buffers of its own before each forward): fusing would point them at a copy.
UNFUSED = "_moekit_unfused"


def keep_unfused(module: nn.Module) -> None:
    """Never fuse the weights of `module` or of any module inside it."""
    for m in module.modules():
        setattr(m, UNFUSED, True)


def plain(*modules: nn.Module | None) -> bool:
    """Whether every module is a bare `nn.Linear` without hooks (an adapter attached to one
    through a hook must see its own call, so such a projection is never fused) whose weights
    may be fused (`keep_unfused`)."""
    return all(
        type(m) is nn.Linear
        and not m._forward_hooks
        and not m._forward_pre_hooks
        and not getattr(m, UNFUSED, False)
        for m in modules
    )
