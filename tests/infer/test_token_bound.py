"""The size bound on prompts: never more tokens claimed than the tokenizer gives, and no bound
where one would not hold."""

import json

import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import models, normalizers, pre_tokenizers

from moekit.data.tokenizer import Tokenizer
from moekit.infer.token_bound import TokenBound

from .test_detokenize import byte_fallback_tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return Tokenizer.load(tiny_model_dir)


TEXTS = st.text(st.characters(codec="utf-8"), max_size=200) | st.text(" \n\tab語é", max_size=200)


@given(text=TEXTS)
def test_the_bound_never_exceeds_the_tokens_of_byte_level_bpe(tiny_tokenizer, text):
    bound = TokenBound(tiny_tokenizer)
    assert bound.chars_per_token is not None
    assert bound.at_least(text) <= len(tiny_tokenizer.encode_prompt(text))


@given(text=TEXTS)
def test_the_bound_never_exceeds_the_tokens_of_byte_fallback_bpe(text):
    tokenizer = byte_fallback_tokenizer()
    bound = TokenBound(tokenizer)
    assert bound.chars_per_token is not None
    assert bound.at_least(text) <= len(tokenizer.encode_prompt(text))


def test_text_made_of_the_longest_token_meets_the_bound(tiny_tokenizer):
    bound = TokenBound(tiny_tokenizer)
    vocab = tiny_tokenizer.backend.get_vocab()
    longest = max(vocab, key=len)
    text = tiny_tokenizer.decode([vocab[longest]]) * 1000
    tokens = len(tiny_tokenizer.encode_prompt(text))
    assert bound.at_least(text) <= tokens
    assert bound.at_least(text) * 20 > tokens  # and it is not uselessly weak


def variant(tokenizer: Tokenizer, change) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    change(backend)
    return Tokenizer(backend)


@pytest.mark.parametrize(
    "change",
    [
        lambda b: setattr(b, "normalizer", normalizers.NFC()),  # joins characters
        lambda b: setattr(b, "normalizer", normalizers.Strip()),
        lambda b: setattr(b, "normalizer", normalizers.Replace("  ", " ")),
        lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.Whitespace()),  # drops spaces
        lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.Split(" ", "removed")),
        lambda b: b.enable_truncation(16),
        lambda b: b.add_tokens([tokenizers.AddedToken("<mask>", lstrip=True)]),
    ],
    ids=["nfc", "strip", "replace-shorter", "whitespace", "split-removed", "truncation",
         "lstrip"],
)  # fmt: skip
def test_no_bound_where_it_would_not_hold(tiny_tokenizer, change):
    tokenizer = variant(tiny_tokenizer, change)
    bound = TokenBound(tokenizer)
    assert bound.chars_per_token is None and bound.at_least("x" * 10_000) == 0


def test_no_bound_for_models_that_make_one_token_of_an_unknown_word():
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "<|pad|>": 2, "a": 3}
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    assert TokenBound(Tokenizer(backend)).chars_per_token is None
    spec = json.loads(byte_fallback_tokenizer().backend.to_str())
    spec["model"]["fuse_unk"], spec["model"]["byte_fallback"] = True, False
    fused = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), eos="</s>", pad=None)
    assert TokenBound(fused).chars_per_token is None


def test_a_sequence_of_length_keeping_steps_keeps_the_bound(tiny_tokenizer):
    def change(b):
        b.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase()])

    tokenizer = variant(tiny_tokenizer, change)
    assert TokenBound(tokenizer).chars_per_token is not None
