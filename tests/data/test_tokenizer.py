import hashlib
import json
import os
import time

import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st

from moekit.data.corpus import Document, fingerprint
from moekit.data.tokenizer import (
    EOS,
    MAX_RUN,
    PAD,
    TOKENIZER_FILE,
    Tokenizer,
    cut_long_runs,
    default_cache_dir,
    get_tokenizer,
    long_runs,
)

SAMPLES = {
    "prose": "Assignment statements are used to (re)bind names to values.\n\nSee also: del.",
    "code": 'def f(x: int) -> int:\n\t"""Doc."""\n    return {"a": [x ** 2, x // 3]}  # ok\n',
    "unicode": "naïve café — 日本語のテキスト, Ελληνικά, עברית, emoji 🙂👍🏽, e\u0301 combining",
    "whitespace": "  leading\ttabs\t\ttrailing   \r\n\r\nblank lines\n\n\n   ",
    "control": "\x00\x01\x7f NUL and DEL bytes \u200b zero width \ufeff BOM",
    "special text": f"literal {EOS} and {PAD} inside a document",
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(small_tokenizer, name):
    text = SAMPLES[name]
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert all(0 <= i < small_tokenizer.vocab_size for i in ids)


@given(st.text(max_size=200))
def test_round_trip_any_text(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    # Only the packer emits document separators, whatever the text contains.
    assert small_tokenizer.eos_id not in ids and small_tokenizer.pad_id not in ids


def test_trained_merges_compress(small_tokenizer):
    text = SAMPLES["prose"]
    assert len(small_tokenizer.encode(text)) < 0.6 * len(text.encode())


def test_special_tokens(small_tokenizer):
    tok = small_tokenizer
    assert tok.eos_id != tok.pad_id
    assert tok.backend.token_to_id(EOS) == tok.eos_id
    assert tok.backend.token_to_id(PAD) == tok.pad_id
    assert tok.decode([tok.eos_id]) == EOS
    assert tok.decode([5, tok.eos_id, 6], skip_special_tokens=True) == tok.decode([5, 6])
    assert tok.encode(EOS) != [tok.eos_id]
    assert max(tok.eos_id, tok.pad_id) < tok.vocab_size


def test_encode_batch_matches_encode(small_tokenizer):
    texts = list(SAMPLES.values())
    assert small_tokenizer.encode_batch(texts) == [small_tokenizer.encode(t) for t in texts]


def test_prompts_of_a_trained_tokenizer_get_no_bos(small_tokenizer):
    assert small_tokenizer.bos_id is None
    for text in SAMPLES.values():
        assert small_tokenizer.encode_prompt(text) == small_tokenizer.encode(text)


def test_a_bos_post_processor_reaches_prompts_only_and_survives_save(tmp_path, small_tokenizer):
    """An imported tokenizer whose post-processor adds a BOS (parity with transformers is
    tested in tests/parity): prompts start with it, training data does not, and saving the
    tokenizer (as training does into a run directory) keeps both."""
    backend = tokenizers.Tokenizer.from_str(small_tokenizer.backend.to_str())
    backend.add_special_tokens(["<s>"])
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_id)]
    )
    tok = Tokenizer(backend, bos="<s>", split_special_tokens=False)
    text = SAMPLES["code"]
    for t in (tok, Tokenizer.load(tok.save(tmp_path / "saved"))):
        assert t.bos_id == bos_id
        assert t.encode(text) == small_tokenizer.encode(text)
        assert t.encode_prompt(text) == [bos_id, *small_tokenizer.encode(text)]
        assert t.encode_prompt("") == [bos_id]
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>"


def test_vocab_size(small_tokenizer, small_corpus):
    assert small_tokenizer.vocab_size == 512
    smallest = Tokenizer.train(["hello world"], vocab_size=258)
    assert smallest.vocab_size == 258
    assert smallest.decode(smallest.encode(SAMPLES["unicode"])) == SAMPLES["unicode"]
    # Asking for more tokens than the text can merge gives fewer, never more.
    assert 258 < Tokenizer.train(["abab abab"], vocab_size=1000).vocab_size < 1000
    with pytest.raises(ValueError, match=r"vocab_size=257 is invalid: must be >= 258"):
        Tokenizer.train(["x"], vocab_size=257)


def test_save_and_load(tmp_path, small_tokenizer):
    written = small_tokenizer.save(tmp_path / "model")
    assert written == tmp_path / "model" / TOKENIZER_FILE
    # The tokenizer and its Hugging Face config, and no temporary file left behind.
    assert sorted(p.name for p in written.parent.iterdir()) == [
        TOKENIZER_FILE,
        "tokenizer_config.json",
    ]
    as_file = small_tokenizer.save(tmp_path / "other.json")
    assert as_file == tmp_path / "other.json"
    for path in (tmp_path / "model", written, as_file):
        loaded = Tokenizer.load(path)
        assert loaded.vocab_size == small_tokenizer.vocab_size
        assert (loaded.eos_id, loaded.pad_id) == (small_tokenizer.eos_id, small_tokenizer.pad_id)
        for text in SAMPLES.values():
            assert loaded.encode(text) == small_tokenizer.encode(text)


def test_load_errors(tmp_path, small_tokenizer):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer file at .*tokenizer\.json"):
        Tokenizer.load(tmp_path)
    good = small_tokenizer.save(tmp_path / "good").read_text(encoding="utf-8")
    corrupt = tmp_path / "corrupt" / TOKENIZER_FILE
    corrupt.parent.mkdir()
    corrupt.write_text(good[: len(good) // 2], encoding="utf-8")
    with pytest.raises(ValueError, match=r"corrupt/tokenizer\.json' is not a valid tokenizer file"):
        Tokenizer.load(corrupt.parent)
    corrupt.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(ValueError, match="is not a valid tokenizer file"):
        Tokenizer.load(corrupt)
    plain = tokenizers.Tokenizer(tokenizers.models.BPE())
    corrupt.write_text(plain.to_str())
    with pytest.raises(
        ValueError, match=r"lacks the special token\(s\) <\|endoftext\|>, <\|pad\|>"
    ):
        Tokenizer.load(corrupt)


@pytest.fixture
def train_calls(monkeypatch):
    """Record every call to Tokenizer.train; the real training still runs."""
    calls = []
    original = Tokenizer.train.__func__

    def counting(cls, texts, vocab_size, **options):
        texts = list(texts)
        calls.append((texts, vocab_size))
        return original(cls, texts, vocab_size, **options)

    monkeypatch.setattr(Tokenizer, "train", classmethod(counting))
    return calls


def docs_of(*texts):
    return [Document(text=t, domain="d", source=f"s{i}") for i, t in enumerate(texts)]


def test_get_tokenizer_caches(tmp_path, small_corpus, train_calls):
    first = get_tokenizer(small_corpus, 300, cache_dir=tmp_path)
    assert len(train_calls) == 1
    assert train_calls[0][0] == [d.text for d in small_corpus]
    (cached,) = (tmp_path / "tokenizers").iterdir()
    mtime = cached.stat().st_mtime_ns

    second = get_tokenizer(small_corpus, 300, cache_dir=tmp_path)
    assert len(train_calls) == 1
    assert cached.stat().st_mtime_ns == mtime
    for text in SAMPLES.values():
        assert second.encode(text) == first.encode(text)

    # A different vocabulary size or different documents are different cache entries.
    get_tokenizer(small_corpus, 301, cache_dir=tmp_path)
    get_tokenizer(small_corpus[1:], 300, cache_dir=tmp_path)
    assert len(train_calls) == 3
    assert len(list((tmp_path / "tokenizers").iterdir())) == 3


def test_get_tokenizer_replaces_a_damaged_cache_entry(tmp_path, train_calls):
    docs = docs_of("some text to train on", "and some more text")
    get_tokenizer(docs, 270, cache_dir=tmp_path)
    (cached,) = (tmp_path / "tokenizers").iterdir()
    cached.write_text("{ not json")
    again = get_tokenizer(docs, 270, cache_dir=tmp_path)
    assert len(train_calls) == 2
    assert Tokenizer.load(cached).encode("some text") == again.encode("some text")


def test_default_cache_dir_from_environment(tmp_path, monkeypatch, train_calls):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    get_tokenizer(docs_of("text"), 260)
    assert len(os.listdir(tmp_path / "env-cache" / "tokenizers")) == 1
    monkeypatch.delenv("MOEKIT_CACHE_DIR")
    assert default_cache_dir().parts[-2:] == (".cache", "moekit")


def test_the_cache_key_of_ordinary_documents_is_unchanged(tmp_path, small_corpus):
    get_tokenizer(small_corpus, 300, cache_dir=tmp_path)
    key = hashlib.sha256(f"v1:300:{fingerprint(small_corpus)}".encode()).hexdigest()[:32]
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [f"{key}.json"]


def test_a_multi_megabyte_line_without_spaces_trains_in_seconds(tmp_path, train_calls):
    line = "moekit" * 500_000  # 3 MB of letters: one pre-token, minutes for the BPE trainer
    docs = docs_of("a short ordinary document", line)
    said = []
    start = time.perf_counter()
    tokenizer = get_tokenizer(docs, 300, cache_dir=tmp_path, say=said.append)
    assert time.perf_counter() - start < 30  # about a second; uncut, over 100 seconds
    assert said == [
        f"tokenizer training: 1 text(s) hold a run of more than {MAX_RUN:,} characters of one "
        "kind (no space or change between letters, digits and symbols); such runs are trained "
        f"on in pieces of {MAX_RUN:,} characters (one piece would take the BPE trainer minutes)"
    ]
    ((texts, _),) = train_calls
    assert texts[0] == "a short ordinary document" and "".join(texts[1:]) == line
    assert tokenizer.decode(tokenizer.encode(line[:10_000])) == line[:10_000]
    # Cut documents never share a cache entry with what an uncut training made.
    key = hashlib.sha256(f"v1:300:{fingerprint(docs)}".encode()).hexdigest()[:32]
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] != [f"{key}.json"]
    get_tokenizer(docs, 300, cache_dir=tmp_path, say=said.append)
    assert len(train_calls) == 1 and len(said) == 1  # from the cache, without a word


def test_training_alone_warns_of_the_runs_it_cut():
    with pytest.warns(UserWarning, match=r"2 text\(s\) hold a run of more than 1,000"):
        Tokenizer.train(["x" * 5000, "ordinary words", " " * 3000], 270)


def test_only_long_runs_of_one_kind_are_cut():
    ordinary = " ".join(["word", "12345", "{'a': [1, 2]}", "x" * MAX_RUN] * 500)
    assert long_runs(ordinary) == [] and cut_long_runs(ordinary) == [ordinary]
    # Minified data alternates letters, digits and symbols: no run is long.
    assert long_runs("ab12{};" * 2000) == []
    text = "start " + "a" * 2500 + "1" * 1001 + "\n" * 1001 + " end"
    assert long_runs(text) == [(6, 2506), (2506, 3507), (3507, 4509)]  # the newlines and a space
    pieces = cut_long_runs(text)
    assert "".join(pieces) == text
    assert all(not long_runs(p) for p in pieces)
    assert [len(p) for p in pieces] == [1006, 1000, 1500, 1001, 5]


def test_a_long_training_is_announced(tmp_path, monkeypatch):
    import moekit.data.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "LONG_TRAINING_CHARS", 30)
    said = []
    get_tokenizer(docs_of("some text to train on", "and some more"), 270, tmp_path, say=said.append)
    assert said == ["training a tokenizer of 270 tokens on 34 characters ..."]
