"""The routing codec: compact JSON that round-trips, and refusals that name the problem."""

import base64

import numpy as np
import pytest
import torch

from moekit.infer.routing_replay import decode_routing, encode_routing, trim_slots


@pytest.mark.parametrize(
    ("num_experts", "empty", "dtype"),
    [(8, False, "uint8"), (8, True, "uint8"), (256, False, "uint8"), (256, True, "uint16"),
     (257, False, "uint16"), (1000, True, "uint16")],
)  # fmt: skip
def test_round_trip(num_experts, empty, dtype):
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(num_experts, generator=g)[:3] for _ in range(40)])
    experts = experts.view(10, 4, 3)
    experts[0, 0] = torch.tensor([num_experts - 1, 0, 1])  # the largest id survives
    if empty:
        experts[2, 1, 2] = -1
    obj = encode_routing(experts, num_experts)
    assert obj["shape"] == [10, 4, 3] and obj["dtype"] == dtype
    assert len(base64.b64decode(obj["data"])) == 120 * np.dtype(dtype).itemsize
    back = decode_routing(obj, num_experts=num_experts, num_layers=4, max_k=3)
    assert back.dtype == torch.int64
    assert torch.equal(back, experts)


def test_trim_slots_drops_columns_empty_everywhere():
    experts = torch.tensor([[[0, 1, -1, -1]], [[2, -1, -1, -1]]])
    assert torch.equal(trim_slots(experts), experts[..., :2])


def good():
    return encode_routing(torch.tensor([[[0, 1], [2, 3]]]), 8)


def with_data(values, dtype="uint8", shape=None):
    raw = np.array(values, dtype=dtype).tobytes()
    obj = {"shape": shape or [1, 2, 2], "dtype": dtype, "data": base64.b64encode(raw).decode()}
    return obj


@pytest.mark.parametrize(
    ("obj", "kwargs", "message"),
    [
        ([1, 2], {}, r"routed_experts must be an object"),
        ({"shape": [1, 2, 2], "dtype": "uint8"}, {}, r"missing \['data'\]"),
        ({**good(), "layers": 2}, {}, r"unknown fields \['layers'\]"),
        ({**good(), "shape": [1, 2]}, {}, r"shape must be \[tokens, layers, k\]"),
        ({**good(), "shape": [0, 2, 2]}, {}, r"three positive integers"),
        ({**good(), "shape": [1, True, 2]}, {}, r"three positive integers"),
        ({**good(), "dtype": "int8"}, {}, r"dtype must be 'uint8' or 'uint16'"),
        ({**good(), "data": "!!not base64"}, {}, r"data is not valid base64"),
        ({**good(), "data": 5}, {}, r"data must be a base64 string"),
        ({**good(), "shape": [2, 2, 2]}, {}, r"holds 4 bytes, but shape \[2, 2, 2\] of uint8 needs 8"),
        (with_data([0, 1, 2, 9]), {}, r"expert id 9: this model's experts are 0..7"),
        (with_data([0, 1, 2, 2]), {}, r"routed_experts\[0, 1\] names an expert twice: \[2, 2\]"),
        (good(), {"num_layers": 3}, r"this model has 3 MoE layers"),
        (good(), {"max_k": 1}, r"gives 2 experts per token.*1..1"),
    ],
)  # fmt: skip
def test_bad_routings_are_refused_by_name(obj, kwargs, message):
    with pytest.raises(ValueError, match=message):
        decode_routing(obj, num_experts=8, **kwargs)


def test_empty_slot_marker_of_a_256_expert_model_is_an_expert():
    obj = with_data([255, 0, 1, 2])
    assert decode_routing(obj, num_experts=256)[0, 0, 0] == 255
    assert decode_routing(obj, num_experts=8)[0, 0, 0] == -1
