"""The tokenizer inside a GGUF file, both ways.

GGUF stores a byte-level BPE tokenizer as `tokenizer.ggml.model = "gpt2"`: the token strings
by id, the merges in rank order ("a b"), a type per token (normal, control for special tokens,
user-defined for other added ones), the special token ids and a pre-tokenizer name that
llama.cpp implements in its own code. moekit's tokenizers (and any byte-level BPE whose
pre-tokenizer is GPT-2's: the ByteLevel split with its standard regex and no normaliser) are
"gpt-2" there. llama.cpp's own converter names the pre-tokenizer by hashing a fixed text's
token ids, so it recognises only vocabularies it has registered; writing the GGUF here states
the pre-tokenizer directly. A tokenizer of another kind (SentencePiece, another split regex)
is refused by name rather than written with a pre-tokenizer that would split text
differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.files import read_json, write_json
from moekit.interop.fields import UnsupportedError
from moekit.model_dir import ModelDir

# llama.cpp's token types (llama_token_type).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
GPT2_PRE = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def tokenizer_metadata(model_dir: ModelDir, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.*` GGUF metadata of a model directory's tokenizer (empty without one);
    UnsupportedError naming what a GGUF cannot state exactly. Ids the model embeds beyond the
    tokenizer's (`vocab_size` rows) are listed as unused `[PAD{id}]` tokens: llama.cpp wants
    one token per embedding row."""
    if not model_dir.tokenizer_path.is_file():
        return {}
    spec = read_json(model_dir.tokenizer_path, what="the tokenizer")
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedError(
            f"{model_dir.tokenizer_path}: a {model.get('type')} tokenizer"
            f"{' with byte fallback' if model.get('byte_fallback') else ''} is not written to "
            "GGUF; moekit writes byte-level BPE tokenizers (GGUF's gpt2 model)"
        )
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") or any(pre.get(k) != v for k, v in GPT2_PRE.items()):
        raise UnsupportedError(
            f"{model_dir.tokenizer_path}: pre_tokenizer {json.dumps(pre)} (normalizer "
            f"{json.dumps(spec.get('normalizer'))}) is not GPT-2's byte-level split, the one "
            "pre-tokenizer moekit names in GGUF files"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for token_id, t in added.items():
        vocab.setdefault(t["content"], token_id)
    size = max(vocab.values()) + 1
    if size > vocab_size:
        raise UnsupportedError(
            f"{model_dir.tokenizer_path}: the tokenizer has {size} ids, more than the model's "
            f"vocab_size={vocab_size}"
        )
    tokens = [""] * size
    for text, token_id in vocab.items():
        tokens[token_id] = text
    missing = [i for i, t in enumerate(tokens) if not t]
    if missing:
        raise UnsupportedError(f"{model_dir.tokenizer_path}: token ids {missing[:5]} have no text")
    types = [NORMAL] * size
    for token_id, t in added.items():
        types[token_id] = CONTROL if t.get("special") else USER_DEFINED
    tokens += [f"[PAD{i}]" for i in range(size, vocab_size)]
    types += [UNUSED] * (vocab_size - size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    meta.update(_specials(model_dir))
    return meta


def _specials(model_dir: ModelDir) -> dict[str, Any]:
    """Special token ids, whether BOS/EOS are added to a prompt, and the chat template."""
    from moekit.data.tokenizer import Tokenizer
    from moekit.interop.tokenizer import added_specials

    tok = Tokenizer.load(model_dir.path)
    meta: dict[str, Any] = {}
    for key, value in (
        ("tokenizer.ggml.bos_token_id", tok.bos_id),
        ("tokenizer.ggml.eos_token_id", tok.eos_id),
        ("tokenizer.ggml.padding_token_id", tok.pad_id if tok.pad_token else None),
    ):
        if value is not None:
            meta[key] = value
    adds = added_specials(model_dir)
    meta["tokenizer.ggml.add_bos_token"] = adds["add_bos_token"]
    meta["tokenizer.ggml.add_eos_token"] = adds["add_eos_token"]
    config_file = model_dir / ModelDir.TOKENIZER_CONFIG
    config = read_json(config_file) if config_file.is_file() else {}
    if isinstance(config.get("chat_template"), str):
        meta["tokenizer.chat_template"] = config["chat_template"]
    return meta


def write_tokenizer(meta: dict[str, Any], out: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into `out` from a GGUF file's
    `tokenizer.*` metadata; UnsupportedError naming a tokenizer model moekit cannot rebuild."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in ("gpt-2", "default"):
        raise UnsupportedError(
            f"GGUF tokenizer.ggml.model={kind!r} with tokenizer.ggml.pre={pre!r} is not "
            "supported: moekit rebuilds byte-level BPE tokenizers with GPT-2's pre-tokenizer "
            "(model 'gpt2', pre 'gpt-2')"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    special = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    # Added tokens too (they keep their ids); unused padding ids past the tokenizer's end are
    # left out, as the tokenizer the file was written from had them.
    used = len(tokens)
    while used and types[used - 1] == UNUSED:
        used -= 1
    vocab = {t: i for i, t in enumerate(tokens[:used])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Added tokens are in the vocabulary already, so marking them keeps their ids.
    for i in special:
        token = AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
        backend.add_special_tokens([token]) if types[i] == CONTROL else backend.add_tokens([token])
    bos, eos, pad = (meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding"))
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)],
        )
    wrong = [i for i in special if backend.token_to_id(tokens[i]) != i]
    if wrong:
        raise UnsupportedError(
            f"GGUF added tokens {wrong[:5]} did not keep their ids (two tokens with one text?)"
        )
    backend.save(str(out / ModelDir.TOKENIZER))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, token_id in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)):
        if token_id is not None:
            config[key] = tokens[token_id]
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token"))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token"))
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    config["clean_up_tokenization_spaces"] = False
    write_json(out / ModelDir.TOKENIZER_CONFIG, config)
