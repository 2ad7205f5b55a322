"""Token classes, mutual information against chance, and top tokens, on routings with known
answers."""

import math

import pytest
import torch

from moekit.analysis.specialization import (
    TOKEN_CLASSES,
    class_table,
    classify_token,
    contingency,
    display_token,
    mutual_information,
    normalized_mi,
    specialisation,
    top_tokens,
)


@pytest.mark.parametrize(
    ("text", "code", "expected"),
    [
        ("   ", False, "whitespace"),
        ("\n\n    ", True, "whitespace"),
        ("417", False, "digits"),
        (" 2024", True, "digits"),
        (",", False, "punctuation"),
        ("):\n", True, "punctuation"),
        (" +=", True, "punctuation"),
        (" self", True, "code"),
        ("_private", True, "code"),
        ("def", True, "code"),
        ("True", True, "code"),
        ("x1", True, "code"),
        ("1x", True, "other"),
        (" The", False, "capitalised"),
        ("Python", False, "capitalised"),
        (" the", False, "word"),
        ("ing", False, "word"),
        ("_private", False, "other"),
        ("x1", False, "other"),
        ("é", False, "word"),
        ("\ufffd", False, "punctuation"),
    ],
)
def test_classify_token(text, code, expected):
    assert classify_token(text, code=code) == expected


def test_class_table_indexes_by_code_flag_and_skips_specials():
    texts = ["<|endoftext|>", " self", ",", " The"]
    table = class_table(texts, special_ids=[0])
    idx = {name: i for i, name in enumerate(TOKEN_CLASSES)}
    assert table.shape == (2, 4)
    assert table[:, 0].tolist() == [-1, -1]
    assert table[0, 1] == idx["word"] and table[1, 1] == idx["code"]
    assert table[0, 2] == table[1, 2] == idx["punctuation"]
    assert table[0, 3] == idx["capitalised"] and table[1, 3] == idx["code"]


def test_contingency_counts_each_slot_and_skips_empty_and_unlabelled():
    experts = torch.tensor([[0, 1], [1, -1], [2, 0], [3, 3]])
    labels = torch.tensor([0, 1, 1, -1])
    counts = contingency(experts, labels, num_labels=2, num_experts=4)
    assert counts.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_mutual_information_of_independent_and_identical_variables():
    assert mutual_information(torch.tensor([[5, 5], [5, 5]]))[0] == pytest.approx(0.0)
    mi, h_c, h_e = mutual_information(torch.tensor([[10, 0], [0, 10]]))
    assert mi == pytest.approx(1.0) and h_c == pytest.approx(1.0) and h_e == pytest.approx(1.0)
    assert normalized_mi(torch.tensor([[7, 0, 0], [0, 7, 0], [0, 0, 7]])) == pytest.approx(1.0)
    assert normalized_mi(torch.tensor([[3, 4, 5]])) == 0.0  # one class: nothing to explain


def test_perfect_specialisation_scores_one_and_its_shuffled_baseline_is_near_zero():
    gen = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 4, (4000,), generator=gen)
    experts = torch.stack([2 * classes, 2 * classes + 1], dim=1)  # top-2: experts 2c and 2c+1
    s = specialisation(experts, classes, 4, 8, shuffles=5, generator=gen)
    assert s.nmi == pytest.approx(1.0)
    assert s.mi_bits == pytest.approx(2.0, abs=0.01)  # H(C) of 4 even classes
    assert s.baseline_mean < 0.01 and s.baseline_std < 0.01
    assert s.excess > 0.98
    assert s.distribution[1].tolist() == pytest.approx([0, 0, 0.5, 0.5, 0, 0, 0, 0])


def test_random_router_scores_at_its_shuffled_baseline():
    gen = torch.Generator().manual_seed(1)
    n, e = 4000, 8
    classes = torch.randint(0, 6, (n,), generator=gen)
    experts = torch.rand(n, e, generator=gen).topk(2, dim=1).indices  # ignores the class
    s = specialisation(experts, classes, 6, e, shuffles=8, generator=gen)
    assert s.nmi < 0.01
    assert abs(s.nmi - s.baseline_mean) < 4 * s.baseline_std + 1e-3


def test_partial_specialisation_lies_between_chance_and_one():
    gen = torch.Generator().manual_seed(2)
    classes = torch.randint(0, 4, (4000,), generator=gen)
    random_expert = torch.randint(0, 4, (4000,), generator=gen)
    follows = torch.rand(4000, generator=gen) < 0.5
    experts = torch.where(follows, classes, random_expert).unsqueeze(1)
    s = specialisation(experts, classes, 4, 4, generator=gen)
    assert s.baseline_mean + 0.1 < s.nmi < 0.9


def test_specialisation_ignores_unlabelled_tokens_and_rejects_bad_shapes():
    experts = torch.tensor([[0], [1], [0], [1]])
    labels = torch.tensor([0, 1, -1, -1])  # the unlabelled tokens would break the pattern
    s = specialisation(experts, labels, 2, 2, shuffles=2)
    assert s.counts.sum() == 2 and s.nmi == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shuffles"):
        specialisation(experts, labels, 2, 2, shuffles=0)
    with pytest.raises(ValueError, match="experts must be"):
        contingency(experts, labels[:3], 2, 2)


def test_top_tokens_by_count_and_by_share():
    # token 7 appears 6 times, always to expert 0; token 3 appears 10 times, split 5/5.
    ids = torch.tensor([7] * 6 + [3] * 10 + [9])
    experts = torch.tensor([[0]] * 6 + [[0]] * 5 + [[1]] * 5 + [[1]])
    by_count, distinctive = top_tokens(experts, ids, 2, n=5, min_occurrences=5)
    assert [(t.token_id, t.count) for t in by_count[0]] == [(7, 6), (3, 5)]
    assert [(t.token_id, t.count, t.occurrences) for t in by_count[1]] == [(3, 5, 10), (9, 1, 1)]
    assert [t.token_id for t in distinctive[0]] == [7, 3]
    assert distinctive[0][0].share == 1.0 and distinctive[0][1].share == 0.5
    assert [t.token_id for t in distinctive[1]] == [3]  # token 9 is too rare to count
    assert math.isclose(by_count[1][1].share, 1.0)


def test_display_token_makes_whitespace_visible():
    assert display_token(" x\n\t") == "␣x↵⇥"
    assert display_token("") == "∅"
