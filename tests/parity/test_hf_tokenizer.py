"""Prompts encode as transformers' own tokenizer encodes them: with the beginning-of-sequence
token an imported tokenizer's post-processor asks for (Mixtral's `<s>`, DeepSeek's
begin-of-sentence), while training data (`encode`) stays without one.

Each tokenizer is a real file pair, written by transformers itself or laid out as the published
checkpoints lay it out, and the reference is `transformers.AutoTokenizer` loaded from the same
directory.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

transformers = pytest.importorskip("transformers")

from moekit.data.tokenizer import Tokenizer  # noqa: E402
from moekit.interop.hf import export_hf, import_hf  # noqa: E402

TEXTS = ["the quick brown fox", "  two leading spaces", "Ünïcödé and </s> in text", ""]
CORPUS = ["the quick brown fox jumps over the lazy dog, twice over. " * 20]


def llama_tokenizer(directory):
    """A Mixtral-style SentencePiece-BPE tokenizer, built and saved by transformers'
    LlamaTokenizer with add_bos_token=True (tokenizer.json's post-processor adds `<s>`)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}  # byte fallback
    for ch in sorted(set("".join(CORPUS)) | {"▁"}):
        vocab.setdefault(ch.replace(" ", "▁"), len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "q"), ("o", "x")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tok.save_pretrained(directory)
    return len(vocab)


def deepseek_tokenizer(directory, template="bos"):
    """A DeepSeek-V3-style byte-level BPE tokenizer: its special tokens, a post-processor that
    puts the begin-of-sentence token first (`template="bos+eos"`: and one that appends the
    end-of-sentence as well), and DeepSeek's tokenizer_config.json fields."""
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    backend.train_from_iterator(CORPUS, trainer=trainer)
    single = f"{bos}:0 $A:0" + (f" {eos}:0" if template == "bos+eos" else "")
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=single, pair=f"{single} {bos}:1 $B:1",
            special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))],
        ),
    ])  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))

    def special(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}  # fmt: skip

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": special(bos),
              "eos_token": special(eos), "pad_token": special(eos), "legacy": True,
              "clean_up_tokenization_spaces": False, "model_max_length": 16384,
              "tokenizer_class": "LlamaTokenizerFast", "unk_token": None}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return backend.get_vocab_size()


def trained_tokenizer(directory):
    """A tokenizer moekit trains itself (no beginning-of-sequence token)."""
    tok = Tokenizer.train(CORPUS, 300)
    tok.save(directory)
    return tok.vocab_size


@pytest.mark.parametrize(
    "make, has_bos",
    [(llama_tokenizer, True), (deepseek_tokenizer, True), (trained_tokenizer, False)],
    ids=["mixtral-llama", "deepseek", "moekit"],
)
def test_prompts_encode_as_transformers_does(tmp_path, make, has_bos):
    make(tmp_path)
    ours = Tokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours.encode_prompt(text) == theirs(text)["input_ids"], text
        # Training data stays as it was: the text alone.
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
    assert ours.bos_id == theirs.bos_token_id if has_bos else ours.bos_id is None
    assert (ours.encode_prompt("the fox")[0] == ours.bos_id) is has_bos


def test_a_trailing_end_of_sequence_is_left_off_prompts(tmp_path):
    deepseek_tokenizer(tmp_path, template="bos+eos")
    ours = Tokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = theirs("the fox")["input_ids"]
    assert ids[-1] == theirs.eos_token_id
    assert ours.encode_prompt("the fox") == ids[:-1]


def test_an_imported_and_reexported_checkpoint_keeps_its_bos(tmp_path):
    """Import carries the tokenizer over with its BOS; export names it in config.json and
    generation_config.json and transformers still adds it to prompts."""
    vocab = llama_tokenizer(tmp_path / "hf")
    config = transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = Tokenizer.load(tmp_path / "ours")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert ours.encode_prompt("the fox") == reference("the fox")["input_ids"]
    assert ours.encode_prompt("the fox")[0] == ours.bos_id == 1

    export_hf(tmp_path / "ours", tmp_path / "exported")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "exported" / name).read_text())["bos_token_id"] == 1
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert exported("the fox")["input_ids"] == ours.encode_prompt("the fox")
