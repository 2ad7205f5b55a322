import pytest
import torch

from moekit.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    next_token,
)


def test_filters():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    kept = lambda out: (out > float("-inf")).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2, top_p=1.0, min_p=0.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.7, min_p=0.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.5, min_p=0.0)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=1.0, min_p=0.3)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_k=0, top_p=1e-6, min_p=0.0)) == [
        True,
        False,
        False,
        False,
    ]


def test_repetition_penalty():
    logits = torch.tensor([2.0, -1.0, 0.5])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5]
    assert logits.tolist() == [2.0, -1.0, 0.5]  # a copy


def test_greedy_and_sampling():
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert next_token(logits, SamplingParams(temperature=0), None, torch.tensor([])) == 1
    gen = torch.Generator().manual_seed(0)
    draws = {
        next_token(logits, SamplingParams(temperature=1.0, top_k=1), gen, torch.tensor([]))
        for _ in range(20)
    }
    assert draws == {1}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens=0 is invalid"),
        (dict(temperature=-1.0), "temperature=-1.0 is invalid"),
        (dict(top_p=0.0), "top_p=0.0 is invalid"),
        (dict(min_p=1.0), "min_p=1.0 is invalid"),
        (dict(top_k=-2), "top_k=-2 is invalid"),
        (dict(stop=[""]), "stop="),
        (dict(max_new_tokens=1.5), "must be an integer"),
    ],
)
def test_params_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)
