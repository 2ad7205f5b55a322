"""MXFP4, the 4-bit format of gpt-oss checkpoints' expert weights, read back into floats.

A weight of shape (..., O, I) is stored as two uint8 tensors: `blocks` (..., O, I/32, 16),
each byte two FP4 (E2M1) values, the low nibble first; and `scales` (..., O, I/32), one
power-of-two exponent per block of 32 values, biased by 127. A value is its FP4 number times
2 ** (scale - 127). The 16 FP4 numbers: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (the
sign is the nibble's high bit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.interop.fields import UnsupportedError

BLOCK = 32  # values per scale
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: Tensor, scales: Tensor, name: str = "weight") -> Tensor:
    """The float32 weight (..., O, I) of MXFP4 `blocks` (..., O, I/32, 16) and `scales`
    (..., O, I/32); UnsupportedError naming `name` when the two do not fit together."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise UnsupportedError(
            f"{name}: MXFP4 blocks and scales must be uint8, not {blocks.dtype} and {scales.dtype}"
        )
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise UnsupportedError(
            f"{name}: MXFP4 blocks of shape {tuple(blocks.shape)} do not match scales of shape "
            f"{tuple(scales.shape)} (expected blocks = scales + ({BLOCK // 2},))"
        )
    *lead, rows, groups, _ = blocks.shape
    out = torch.empty(*lead, rows, groups * BLOCK, dtype=torch.float32, device=blocks.device)
    table = torch.tensor(FP4, dtype=torch.float32, device=blocks.device)
    # One leading index (an expert) at a time: the intermediates of a whole gpt-oss weight
    # would take several times its float size.
    flat_out = out.view(-1, rows, groups * BLOCK)
    flat_blocks, flat_scales = (
        blocks.reshape(-1, rows, groups, 16),
        scales.reshape(-1, rows, groups),
    )
    for i in range(flat_out.shape[0]):
        b, exponent = flat_blocks[i], flat_scales[i].to(torch.int32) - 127
        values = torch.stack([table[(b & 0x0F).int()], table[(b >> 4).int()]], dim=-1)
        values = values.flatten(-2)  # (O, I/32, 32): low nibble, high nibble, ...
        flat_out[i] = torch.ldexp(values, exponent.unsqueeze(-1).float()).flatten(-2)
    return out  # (..., O, I)
