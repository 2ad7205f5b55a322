"""Incremental detokenisation with the tokenizers people import: byte-level BPE (ours) and
SentencePiece-style byte fallback with a Metaspace pre-tokenizer (Llama, Mistral, Mixtral)."""

import pytest
import tokenizers
from hypothesis import example, given
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers

from moekit import build_model
from moekit.config import ModelConfig
from moekit.data.tokenizer import Tokenizer
from moekit.infer.detokenize import TextTracker, TokenBytes, decode_with_offsets
from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams


def byte_fallback_tokenizer() -> Tokenizer:
    """A tiny Llama-style tokenizer.json: characters and a few merges, every byte as a
    <0xNN> fallback token, "▁" for spaces, and the decoder Llama ships."""
    chars = ["▁", "A", "B", "H", "e", "l", "o", "w", "r", "d"]
    merges = [("l", "l"), ("e", "ll"), ("H", "ell"), ("Hell", "o"), ("▁", "Hello"), ("▁", "w"),
              ("o", "r"), ("▁w", "or"), ("▁wor", "l"), ("▁worl", "d"), ("▁", "A")]  # fmt: skip
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token in chars + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    )
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(content=" ", left=1, right=0)]
    )  # fmt: skip
    return Tokenizer(backend, eos="</s>", pad=None, split_special_tokens=False)


def stream(tokenizer, ids, context=()) -> list[str]:
    tracker = TextTracker(tokenizer, [], context=context)
    pieces = [tracker.add(t) for t in ids]
    pieces.append(tracker.flush())
    assert "".join(pieces) == tracker.text
    return pieces


def test_a_character_split_over_byte_fallback_tokens_streams_whole():
    tok = byte_fallback_tokenizer()
    ids = tok.encode("A語B")
    assert len(ids) == 5  # "▁A", three byte tokens for 語, "B"
    pieces = stream(tok, ids)
    assert "".join(pieces) == "A語B" == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "語" in pieces  # released as soon as its last byte arrives


def test_a_continuation_keeps_its_leading_space():
    tok = byte_fallback_tokenizer()
    prompt, whole = tok.encode("Hello"), tok.encode("Hello world")
    assert whole[: len(prompt)] == prompt
    continuation = whole[len(prompt) :]
    assert tok.decode(continuation) == "world"  # the decoder strips the space on its own
    assert "".join(stream(tok, continuation, context=prompt)) == " world"
    # And a character split over byte tokens after a prompt.
    ids = tok.encode("Hello A語B")
    assert "".join(stream(tok, ids[len(prompt) :], context=prompt)) == " A語B"


def test_byte_level_bpe_splits_characters_too(tiny_model_dir):
    tok = Tokenizer.load(tiny_model_dir)
    text = "x = '語 ü €'"
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    decoded, offsets = decode_with_offsets(tok, ids)
    assert decoded == text and offsets == sorted(offsets) and offsets[0] == 0


def test_stop_strings_are_never_streamed_in_part():
    tok = byte_fallback_tokenizer()
    prompt = tok.encode("Hello")
    tracker = TextTracker(tok, ["wor"], context=prompt)
    out = [tracker.add(t) for t in tok.encode("Hello world")[len(prompt) :]]
    assert tracker.stopped and "".join(out) + tracker.flush() == " "


@pytest.mark.parametrize("text", ["A語B", "Hello world", " A"])
def test_token_bytes_spell_the_text(text, tiny_model_dir):
    for tok in (byte_fallback_tokenizer(), Tokenizer.load(tiny_model_dir)):
        token_bytes = TokenBytes(tok)
        ids = tok.encode(text)
        spelled = b"".join(token_bytes(i) for i in ids)
        # Metaspace turns a word's first space into "▁", which is a space in the bytes.
        assert spelled.decode().removeprefix(" ") == text.removeprefix(" ")
    assert TokenBytes(byte_fallback_tokenizer())(2) == b"</s>"


def test_generating_with_a_byte_fallback_tokenizer_streams_the_completion_text():
    """A random model over the byte-fallback vocabulary emits byte tokens all the time (and
    mostly invalid UTF-8): the stream still adds up to exactly the completion's text."""
    tok = byte_fallback_tokenizer()
    cfg = ModelConfig.from_dict(
        dict(vocab_size=tok.vocab_size, dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
             ffn_hidden=32, max_seq_len=64)
    )  # fmt: skip
    generator = Generator(build_model(cfg, seed=0), tok)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=3, ignore_eos=True)
    completion = generator.generate("Hello", params)[0]
    streamed = "".join(chunk.text for chunk in generator.stream("Hello", params))
    assert streamed == completion.text and len(completion.token_ids) == 40


class CharTokenizer:
    """Token i is the text PIECES[i]: a decoder with no windows of its own, so the tracker's
    stop-string logic is all that shapes what it releases."""

    PIECES = ("a", "b", "ab", "ba", "aab", "\n", "c")

    def decode(self, ids) -> str:
        return "".join(self.PIECES[i] for i in ids)


def expected_releases(pieces: list[str], stops: list[str]) -> list[str]:
    """What a tracker must release after each piece and at the flush, from the definition:
    the output is the text before the earliest stop string; after each piece, all of it but
    the longest end that is the start of a stop string."""
    text, released, out = "", 0, []
    for piece in pieces:
        text += piece
        found = [text.find(s) for s in stops if s in text]
        if found:
            out.append(text[released : min(found)])
            return out + [""] * (len(pieces) - len(out)) + [""]
        held = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        out.append(text[released : len(text) - held])
        released = len(text) - held
    return [*out, text[released:]]


@given(
    ids=st.lists(st.integers(0, len(CharTokenizer.PIECES) - 1), max_size=30),
    stops=st.lists(st.text("abc\n", min_size=1, max_size=5), max_size=4),
)
@example(ids=[0, 1, 6], stops=["ba", "abc"])  # "ab" may still become "abc": hold it all
def test_stop_strings_release_exactly_what_the_definition_says(ids, stops):
    tracker = TextTracker(CharTokenizer(), stops)
    got = [tracker.add(t) for t in ids] + [tracker.flush()]
    pieces = [CharTokenizer.PIECES[t] for t in ids]
    assert got == expected_releases(pieces, stops)
    assert tracker.text == "".join(got)
    assert tracker.stopped == any(s in "".join(pieces) for s in stops)


def test_checking_stop_strings_costs_the_same_late_in_a_long_output():
    """The work per token does not grow with the output: a stretch of tokens late in a long
    output takes about as long as the first one (it grew with the output's length, up to the
    longest stop string's)."""
    import time

    stops = ["ab" * 500 + "c", "\n" * 1000]  # long, and never found
    tracker = TextTracker(CharTokenizer(), stops)
    ids = [0, 1, 5] * 800  # "a", "b", "\n": always the start of a stop string, never one

    def seconds(chunk) -> float:
        start = time.process_time()
        for t in chunk:
            tracker.add(t)
        return time.process_time() - start

    first = seconds(ids[:200])
    seconds(ids[200:2200])
    last = seconds(ids[2200:])
    assert not tracker.stopped and last < 2 * first + 0.01, (first, last)
