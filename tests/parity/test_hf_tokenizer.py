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


def _tiny_mixtral(vocab, **extra):
    return transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, **extra,
    )  # fmt: skip


def test_a_checkpoint_without_end_of_text_converts_both_ways(tmp_path):
    """transformers allows eos_token_id=None; the imported directory is one moekit reads,
    generates from (stopping on length) and exports again."""
    from moekit.infer.generate import Generator
    from moekit.infer.sampling import SamplingParams

    vocab = deepseek_tokenizer(tmp_path / "hf")
    config_file = tmp_path / "hf" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["eos_token"], config["pad_token"]
    config_file.write_text(json.dumps(config))
    torch.manual_seed(0)
    hf_config = _tiny_mixtral(vocab, eos_token_id=None, pad_token_id=None, bos_token_id=0)
    transformers.MixtralForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    tok = Tokenizer.load(tmp_path / "ours")
    assert tok.eos_id is None and tok.eos_token is None
    with pytest.raises(ValueError, match=r"no end-of-text token.*packing documents"):
        tok.require_eos("packing documents")

    generator = Generator.from_dir(tmp_path / "ours", device="cpu")
    out = generator.generate(["the fox"], SamplingParams(max_new_tokens=5))
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 5

    export_hf(tmp_path / "ours", tmp_path / "exported")
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["eos_token_id"] is None and exported["bos_token_id"] == 0
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert reference.eos_token is None
    assert reference("the fox")["input_ids"] == tok.encode_prompt("the fox")


def test_export_states_bos_and_eos_settings_and_the_usual_file_mode(tmp_path):
    """A moekit-trained tokenizer has no BOS: the export says so (`add_bos_token: false`)
    rather than leaving consumers to guess, and every file has the usual mode."""
    import stat

    from moekit.files import umask

    vocab = trained_tokenizer(tmp_path / "ours")
    from moekit.config import AttentionConfig, ModelConfig, MoEConfig
    from moekit.model import build_model
    from moekit.model_dir import ModelDir

    ours = ModelConfig(
        vocab_size=vocab, dim=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_hidden=48,
        max_seq_len=64, attention=AttentionConfig(),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=48),
    )  # fmt: skip
    ModelDir(tmp_path / "ours").save_model(build_model(ours), ours)
    export_hf(tmp_path / "ours", tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert reference("the fox")["input_ids"] == Tokenizer.load(tmp_path / "ours").encode("the fox")
    for file in (tmp_path / "exported").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask(), file.name


def test_generation_config_and_chat_template_travel_both_ways(tmp_path):
    """A checkpoint's generation_config.json (EOS ids, sampling defaults) and Jinja chat
    template come along on import, are used by moekit, and go out again on export."""
    from moekit.infer.generate import Generator
    from moekit.infer.jinja_chat import JinjaChatTemplate, load_chat_template

    vocab = deepseek_tokenizer(tmp_path / "hf")
    config_file = tmp_path / "hf" / "tokenizer_config.json"
    template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{% endfor %}"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "chat_template": template}))  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(_tiny_mixtral(vocab)).save_pretrained(tmp_path / "hf")
    generation = {"eos_token_id": [1, 5], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(generation))
    import_hf(tmp_path / "hf", tmp_path / "ours")
    generator = Generator.from_dir(tmp_path / "ours", device="cpu")
    assert generator.eos_ids == {1, 5}
    assert generator.defaults.sampling() == {"temperature": 0.6, "top_p": 0.9}
    chat = load_chat_template(tmp_path / "ours")
    assert isinstance(chat, JinjaChatTemplate)
    assert chat.format([{"role": "user", "content": "hi"}]) == "<｜begin▁of▁sentence｜>hi"

    export_hf(tmp_path / "ours", tmp_path / "exported")
    written = json.loads((tmp_path / "exported" / "generation_config.json").read_text())
    assert written["eos_token_id"] == [1, 5] and written["temperature"] == 0.6
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert reference.chat_template == template


def test_a_chat_template_saved_as_its_own_file_is_carried(tmp_path):
    """transformers 5 saves a chat template as chat_template.jinja, not in
    tokenizer_config.json: import carries it (before any template in tokenizer_config.json),
    moekit renders it as transformers does, and the export gives transformers the same
    template back."""
    from moekit.infer.jinja_chat import JinjaChatTemplate, load_chat_template

    vocab = deepseek_tokenizer(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "chat_template.jinja").is_file()
    config_file = tmp_path / "hf" / "tokenizer_config.json"
    assert "chat_template" not in json.loads(config_file.read_text())
    # A stale template left in tokenizer_config.json: the file of its own comes first, as in
    # transformers.
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "chat_template": "stale"}))  # fmt: skip
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template != "stale"
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(_tiny_mixtral(vocab)).save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    chat = load_chat_template(tmp_path / "ours")
    assert isinstance(chat, JinjaChatTemplate)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "more"}]  # fmt: skip
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.format(messages) == expected
    export_hf(tmp_path / "ours", tmp_path / "exported")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert back.chat_template == tok.chat_template


def test_a_processor_chat_template_is_carried_when_the_tokenizer_has_none(tmp_path):
    """A multimodal checkpoint's chat_template.json ({"chat_template": ...}) is the template
    when tokenizer_config.json and chat_template.jinja have none."""
    from moekit.infer.jinja_chat import load_chat_template

    vocab = deepseek_tokenizer(tmp_path / "hf")
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (tmp_path / "hf" / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(_tiny_mixtral(vocab)).save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    assert load_chat_template(tmp_path / "ours").format([{"role": "user", "content": "a"}]) == "[a]"
    assert not (tmp_path / "ours" / "chat_template.json").exists()  # moekit's own format
