import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.data.config import DataConfig
from moekit.data.corpus import DOMAINS, load_documents, split_documents
from moekit.data.loader import PackedLoader, TokenizedData, iter_eval_batches, pack, prepare_data
from moekit.data.tokenizer import Tokenizer

from .conftest import SMALL_CAP

EOS = 0

# ----------------------------------------------------------------------------- pack


def test_pack_example():
    rows = pack([[1, 2, 3], [4, 5], []], seq_len=3, eos_id=EOS)
    # stream: 1 2 3 EOS 4 5 EOS EOS -> rows start at 0 and 3; the tail "EOS" is dropped
    assert rows.dtype == torch.int64
    assert rows.tolist() == [[1, 2, 3, 0], [0, 4, 5, 0]]


@given(
    docs=st.lists(st.lists(st.integers(1, 1000), max_size=30), min_size=1, max_size=20),
    seq_len=st.integers(1, 24),
)
def test_pack_invariants(docs, seq_len):
    stream = [t for doc in docs for t in [*doc, EOS]]
    if len(stream) < seq_len + 1:
        with pytest.raises(ValueError, match="fewer than one row"):
            pack(docs, seq_len, EOS)
        return
    rows = pack(docs, seq_len, EOS)
    n = (len(stream) - 1) // seq_len
    assert rows.shape == (n, seq_len + 1) and rows.dtype == torch.int64
    # Consecutive rows share one token.
    assert torch.equal(rows[1:, 0], rows[:-1, -1])
    # Every token but the first is a target exactly once, in stream order; inputs likewise.
    assert rows[:, 1:].flatten().tolist() == stream[1 : n * seq_len + 1]
    assert rows[:, :-1].flatten().tolist() == stream[: n * seq_len]
    # Less than one row's worth of targets is left over.
    assert len(stream) - 1 - n * seq_len < seq_len


def test_pack_puts_eos_after_every_document():
    docs = [[7] * 5, [8] * 3, [9] * 4]
    rows = pack(docs, seq_len=14, eos_id=EOS)
    assert rows.tolist() == [
        [7, 7, 7, 7, 7, 0, 8, 8, 8, 0, 9, 9, 9, 9, 0]
    ]  # 15 tokens: one row of 14 + 1


def test_pack_errors():
    with pytest.raises(ValueError, match=r"2 document\(s\) hold 4 tokens .* seq_len \+ 1 = 9"):
        pack([[1], [2]], seq_len=8, eos_id=EOS)
    with pytest.raises(ValueError, match="seq_len=0 is invalid"):
        pack([[1, 2, 3]], seq_len=0, eos_id=EOS)


# ----------------------------------------------------------------------------- PackedLoader


def numbered_rows(n, seq_len=4):
    # Row i holds i * 100 + position, so a batch shows which rows it came from.
    return torch.arange(seq_len + 1) + 100 * torch.arange(n)[:, None]


def row_ids(inputs):
    return (inputs[:, 0] // 100).tolist()


def take(loader, k):
    return [loader.next_batch() for _ in range(k)]


def same_batches(a, b):
    return len(a) == len(b) and all(
        torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b, strict=True)
    )


def test_batches_are_shifted_rows():
    rows = numbered_rows(10)
    inputs, targets = PackedLoader(rows, 4, seed=0).next_batch()
    assert inputs.shape == targets.shape == (4, 4)
    assert inputs.is_contiguous() and targets.is_contiguous()
    for inp, tgt in zip(inputs, targets, strict=True):
        row = rows[inp[0] // 100]
        assert torch.equal(inp, row[:-1]) and torch.equal(tgt, row[1:])


def test_loader_is_deterministic_per_seed():
    rows = numbered_rows(50)
    assert same_batches(
        take(PackedLoader(rows, 5, seed=3), 25), take(PackedLoader(rows, 5, seed=3), 25)
    )
    assert not same_batches(
        take(PackedLoader(rows, 5, seed=3), 5), take(PackedLoader(rows, 5, seed=4), 5)
    )


def test_epochs_reshuffle_and_drop_the_partial_batch():
    rows = numbered_rows(11)
    loader = PackedLoader(rows, 3, seed=0)
    assert loader.batches_per_epoch == 3
    epochs = []
    for epoch in range(4):
        assert loader.epoch == epoch
        ids = [i for inputs, _ in take(loader, 3) for i in row_ids(inputs)]
        assert len(set(ids)) == 9  # nine distinct rows: no row twice within an epoch
        expected = torch.randperm(11, generator=torch.Generator().manual_seed(epoch))[:9]
        assert ids == expected.tolist()
        epochs.append(ids)
    assert len({tuple(e) for e in epochs}) == 4


def test_no_shuffle_is_row_order():
    loader = PackedLoader(numbered_rows(7), 2, seed=5, shuffle=False)
    ids = [row_ids(inputs) for inputs, _ in take(loader, 6)]
    assert ids == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("k", range(12))
def test_resume_is_exact(k):
    rows = numbered_rows(13)
    reference = take(PackedLoader(rows, 4, seed=7), 12 + 8)  # 3 batches per epoch
    loader = PackedLoader(rows, 4, seed=7)
    take(loader, k)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON round-trip
    assert state["epoch"] == k // 3 and state["index"] == k % 3
    fresh = PackedLoader(rows, 4, seed=7)
    fresh.load_state_dict(state)
    assert fresh.epoch == k // 3
    assert same_batches(take(fresh, 8), reference[k : k + 8])


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rows": numbered_rows(14)}, r"num_rows=13 but this loader has num_rows=14"),
        ({"batch_size": 3}, r"batch_size=4 but this loader has batch_size=3"),
        ({"seed": 8}, r"seed=7 but this loader has seed=8"),
        ({"shuffle": False}, r"shuffle=True but this loader has shuffle=False"),
    ],
)
def test_mismatched_state_is_rejected(kwargs, pattern):
    state = PackedLoader(numbered_rows(13), 4, seed=7).state_dict()
    args = {"rows": numbered_rows(13), "batch_size": 4, "seed": 7, **kwargs}
    loader = PackedLoader(args.pop("rows"), args.pop("batch_size"), **args)
    with pytest.raises(ValueError, match=pattern):
        loader.load_state_dict(state)


def test_invalid_state_and_arguments():
    loader = PackedLoader(numbered_rows(13), 4, seed=7)
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"index=3 is invalid: must be an int in \[0, 3\)"):
        loader.load_state_dict({**state, "index": 3})
    with pytest.raises(ValueError, match="epoch=-1 is invalid"):
        loader.load_state_dict({**state, "epoch": -1})
    with pytest.raises(ValueError, match="loader state lacks 'epoch'"):
        loader.load_state_dict({k: v for k, v in state.items() if k != "epoch"})
    with pytest.raises(ValueError, match="batch_size=14 is invalid: larger than the 13 rows"):
        PackedLoader(numbered_rows(13), 14, seed=0)
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        PackedLoader(numbered_rows(13), 0, seed=0)
    with pytest.raises(ValueError, match="integer token ids"):
        PackedLoader(numbered_rows(13).float(), 2, seed=0)


def test_iter_eval_batches_covers_every_row_in_order():
    rows = numbered_rows(10)
    batches = list(iter_eval_batches(rows, 4))
    assert [row_ids(inputs) for inputs, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(torch.cat([i for i, _ in batches]), rows[:, :-1])
    assert torch.equal(torch.cat([t for _, t in batches]), rows[:, 1:])
    assert list(iter_eval_batches(rows[:0], 4)) == []


# ----------------------------------------------------------------------------- prepare_data


@pytest.fixture
def train_texts(monkeypatch):
    """The texts that Tokenizer.train sees; the real training still runs."""
    seen = []
    original = Tokenizer.train.__func__

    def recording(cls, texts, vocab_size, **options):
        texts = list(texts)
        seen.extend(texts)
        return original(cls, texts, vocab_size, **options)

    monkeypatch.setattr(Tokenizer, "train", classmethod(recording))
    return seen


def test_prepare_data_builtin_end_to_end(tmp_path, train_texts):
    cfg = DataConfig(source="builtin", max_chars_per_domain=SMALL_CAP, val_fraction=0.2)
    tok, data = prepare_data(cfg, vocab_size=400, seq_len=32, cache_dir=tmp_path)
    assert isinstance(data, TokenizedData)
    assert tok.vocab_size == 400

    train_docs, val_docs = split_documents(load_documents(cfg), cfg.val_fraction, cfg.seed)
    # The tokenizer saw the training split only.
    assert sorted(train_texts) == sorted(d.text for d in train_docs)
    assert not {d.text for d in val_docs} & set(train_texts)

    for rows in (data.train, data.val, *data.val_by_domain.values()):
        assert rows.dtype == torch.int64 and rows.shape[1] == 33
        assert int(rows.min()) >= 0 and int(rows.max()) < tok.vocab_size
    assert set(data.val_by_domain) == set(DOMAINS)

    stats = json.loads(json.dumps(data.stats))
    assert stats["train"]["documents"] == len(train_docs)
    assert stats["val"]["documents"] == len(val_docs)
    assert stats["train"]["rows"] == data.train.shape[0]
    for split, docs in (("train", train_docs), ("val", val_docs)):
        for domain in DOMAINS:
            entry = stats[split]["by_domain"][domain]
            mine = [d for d in docs if d.domain == domain]
            assert entry["documents"] == len(mine)
            assert entry["characters"] == sum(len(d.text) for d in mine)
            assert entry["tokens"] == sum(
                len(ids) for ids in tok.encode_batch([d.text for d in mine])
            )
        assert stats[split]["tokens"] == sum(
            e["tokens"] for e in stats[split]["by_domain"].values()
        )
    tokens_with_eos = stats["train"]["tokens"] + stats["train"]["documents"]
    assert data.train.shape[0] == (tokens_with_eos - 1) // 32
    assert stats["val_domains_skipped"] == []

    # The same data again reuses the cached tokenizer and packs identical rows.
    calls = len(train_texts)
    _, again = prepare_data(cfg, vocab_size=400, seq_len=32, cache_dir=tmp_path)
    assert len(train_texts) == calls
    assert torch.equal(again.train, data.train) and torch.equal(again.val, data.val)


def test_prepare_data_with_given_tokenizer_and_no_validation(small_tokenizer, train_texts):
    cfg = DataConfig(source="builtin", max_chars_per_domain=5000, val_fraction=0.0)
    tok, data = prepare_data(cfg, vocab_size=512, seq_len=16, tokenizer=small_tokenizer)
    assert tok is small_tokenizer and train_texts == []
    assert data.val.shape == (0, 17) and data.val_by_domain == {}
    with pytest.raises(ValueError, match=r"has 512 tokens, more than vocab_size=500"):
        prepare_data(cfg, vocab_size=500, seq_len=16, tokenizer=small_tokenizer)


def test_prepare_data_errors(tmp_path, monkeypatch, small_tokenizer):
    # Relative sources hash the same in every run: at seed 0 and val_fraction 0.5, "a.txt"
    # lands in training and "e.txt" in validation.
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text("a training document of a dozen words or so, long enough")
    Path("e.txt").write_text("tiny")
    ((train,), (val,)) = split_documents(load_documents(DataConfig(source="a.txt,e.txt")), 0.5, 0)
    assert (train.source, val.source) == ("a.txt", "e.txt")

    cfg = DataConfig(source="a.txt,e.txt", val_fraction=0.5)
    with pytest.raises(ValueError, match="the training split is too small: 1 document"):
        prepare_data(cfg, vocab_size=512, seq_len=64, tokenizer=small_tokenizer)
    with pytest.raises(ValueError, match="the validation split is too small: 1 document"):
        prepare_data(cfg, vocab_size=512, seq_len=8, tokenizer=small_tokenizer)
    cfg = DataConfig(source="a.txt", val_fraction=0.5)
    with pytest.raises(ValueError, match=r"val_fraction=0\.5 chose no validation documents"):
        prepare_data(cfg, vocab_size=512, seq_len=2, tokenizer=small_tokenizer)
    cfg = DataConfig(source="e.txt", val_fraction=0.5)
    with pytest.raises(ValueError, match=r"val_fraction=0\.5 left no training documents"):
        prepare_data(cfg, vocab_size=512, seq_len=2, tokenizer=small_tokenizer)


def test_prepare_data_reports_domains_too_small_to_evaluate(tmp_path, small_tokenizer):
    for i in range(30):
        (tmp_path / "big").mkdir(exist_ok=True)
        (tmp_path / "big" / f"{i:02d}.txt").write_text(f"document {i} " + "words and more " * 20)
    (tmp_path / "tiny").mkdir()
    for name in ("a", "b"):
        (tmp_path / "tiny" / f"{name}.txt").write_text("hi")
    cfg = DataConfig(source=str(tmp_path), val_fraction=0.2)
    _, data = prepare_data(cfg, vocab_size=512, seq_len=16, tokenizer=small_tokenizer)
    assert set(data.val_by_domain) == {"big"}
    assert data.stats["val_domains_skipped"] == ["tiny"]
    assert data.stats["val"]["by_domain"]["tiny"]["documents"] == 1
    assert "rows" not in data.stats["val"]["by_domain"]["tiny"]


def test_prepare_data_passes_on_what_tokenizer_training_says(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "blob.txt").write_text("some words here\n" * 200 + "z" * 20_000 + "\n")
    cfg = DataConfig(source=str(tmp_path / "data"), val_fraction=0.0)
    said = []
    prepare_data(cfg, vocab_size=300, seq_len=16, cache_dir=tmp_path / "cache", say=said.append)
    assert len(said) == 1 and said[0].startswith("tokenizer training: 1 text(s) hold a run")
