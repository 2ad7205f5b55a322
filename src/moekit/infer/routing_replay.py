"""Routing replay: the experts each MoE layer chose for each token, recorded from a forward pass
and carried as compact JSON, so that a later forward (a server request, a training step) can
route exactly as a recorded one did.

The JSON form of a (T, L, K) routing, T tokens x L MoE layers (in layer order) x K slots:

    {"shape": [T, L, K], "dtype": "uint8", "data": "<base64 of the T*L*K values, row-major>"}

`dtype` is "uint8" when the model has at most 256 experts, else "uint16" (little-endian). An
empty slot (a token that went to fewer than K experts) is the dtype's largest value, 255 or
65535; a model with exactly 256 experts writes "uint16" when it needs an empty slot. In
memory a routing is a (T, L, K) int64 tensor with -1 for an empty slot.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.model import ModelOutput

DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype("uint8"), "uint16": np.dtype("<u2")}
FIELDS = ("shape", "dtype", "data")


def recorded_experts(out: ModelOutput, batch: int, seq_len: int) -> Tensor:
    """The routing of a forward pass run with `return_routing=True`: (batch, seq_len, L, K)
    int64, L the MoE layers in layer order, -1 in empty slots (the layers' K are padded to
    the largest)."""
    layers = []
    for _, stats in sorted(out.moe_stats.items()):
        assert stats.routing is not None, "run the model with return_routing=True"
        layers.append(stats.routing.experts)
    if not layers:
        return torch.empty(batch, seq_len, 0, 1, dtype=torch.long)
    K = max(e.shape[1] for e in layers)
    padded = [torch.nn.functional.pad(e, (0, K - e.shape[1]), value=-1) for e in layers]
    return torch.stack(padded, dim=1).view(batch, seq_len, len(layers), K)


def trim_slots(experts_TLK: Tensor) -> Tensor:
    """`experts_TLK` without its trailing slots that are empty for every token and layer
    (at least one slot is kept)."""
    used = (experts_TLK >= 0).reshape(-1, experts_TLK.shape[-1]).any(dim=0)
    K = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return experts_TLK[..., :K]


def encode_routing(experts_TLK: Tensor, num_experts: int) -> dict[str, Any]:
    """The JSON form (see the module docstring) of a (T, L, K) routing of a model with
    `num_experts` experts (ids in [0, num_experts), -1 for an empty slot)."""
    if experts_TLK.dim() != 3:
        raise ValueError(f"a routing is (tokens, layers, k); got shape {tuple(experts_TLK.shape)}")
    ids = experts_TLK.detach().to("cpu", torch.int64)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= num_experts):
        raise ValueError(f"a routing of a model with {num_experts} experts holds ids outside it")
    empty = bool((ids < 0).any())
    name = "uint8" if num_experts < 256 or (num_experts == 256 and not empty) else "uint16"
    if num_experts > 65535:
        raise ValueError(f"{num_experts} experts do not fit a uint16 routing")
    dtype = DTYPES[name]
    values = ids.numpy().copy()
    values[values < 0] = np.iinfo(dtype).max
    return {
        "shape": list(ids.shape),
        "dtype": name,
        "data": base64.b64encode(values.astype(dtype).tobytes()).decode("ascii"),
    }


def decode_routing(
    obj: Any,
    *,
    num_experts: int,
    num_layers: int | None = None,
    max_k: int | None = None,
    name: str = "routed_experts",
) -> Tensor:
    """A routing from its JSON form: (T, L, K) int64, -1 for an empty slot. ValueError naming
    `name` and the problem for anything else: missing or unknown fields, a bad shape, dtype
    or base64, a data length that does not match the shape, an expert id outside
    [0, num_experts), an expert twice for one token in one layer, L other than `num_layers`
    or K above `max_k` (when given)."""
    shape, dtype = _header(obj, name)
    try:
        raw = base64.b64decode(obj["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}.data is not valid base64") from None
    T, L, K = shape
    if num_layers is not None and num_layers != L:
        raise ValueError(
            f"{name} has shape {shape}: this model has {num_layers} MoE layers, so the "
            f"shape must be [tokens, {num_layers}, k]"
        )
    if max_k is not None and max_k < K:
        raise ValueError(
            f"{name} gives {K} experts per token: this model's router gives 1..{max_k}"
        )
    if len(raw) != T * L * K * dtype.itemsize:
        raise ValueError(
            f"{name}.data holds {len(raw)} bytes, but shape {shape} of {obj['dtype']} needs "
            f"{T * L * K * dtype.itemsize}"
        )
    values = np.frombuffer(raw, dtype=dtype).astype(np.int64).reshape(T, L, K)
    marker = np.iinfo(dtype).max
    if marker >= num_experts:
        values[values == marker] = -1
    if values.size and int(values.max()) >= num_experts:
        raise ValueError(
            f"{name} holds expert id {int(values.max())}: this model's experts are "
            f"0..{num_experts - 1}"
        )
    experts = torch.from_numpy(values)
    _check_distinct(experts, name)
    return experts


def _header(obj: Any, name: str) -> tuple[list[int], np.dtype[Any]]:
    """The checked shape and dtype of a routing's JSON form."""
    if not isinstance(obj, dict):
        raise ValueError(
            f"{name} must be an object {{'shape': [T, L, K], 'dtype': 'uint8', 'data': "
            f"'<base64>'}}, got {type(obj).__name__}"
        )
    missing = [f for f in FIELDS if f not in obj]
    unknown = sorted(set(obj) - set(FIELDS))
    if missing or unknown:
        problem = f"missing {missing}" if missing else f"unknown fields {unknown}"
        raise ValueError(f"{name}: {problem}; a routing has exactly {list(FIELDS)}")
    shape = obj["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or any(isinstance(n, bool) or not isinstance(n, int) for n in shape)
        or not (shape[0] >= 1 and shape[1] >= 1 and shape[2] >= 1)
    ):
        raise ValueError(
            f"{name}.shape must be [tokens, layers, k], three positive integers; got {shape!r}"
        )
    if obj["dtype"] not in DTYPES:
        raise ValueError(f"{name}.dtype must be 'uint8' or 'uint16', got {obj['dtype']!r}")
    if not isinstance(obj["data"], str):
        raise ValueError(f"{name}.data must be a base64 string")
    return shape, DTYPES[obj["dtype"]]


def _check_distinct(experts_TLK: Tensor, name: str) -> None:
    if experts_TLK.shape[-1] < 2:
        return
    ordered = experts_TLK.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(repeated.any()):
        token, layer = (int(v) for v in repeated.any(dim=-1).nonzero()[0])
        raise ValueError(
            f"{name}[{token}, {layer}] names an expert twice: {experts_TLK[token, layer].tolist()}"
        )
