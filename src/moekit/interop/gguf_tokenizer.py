"""The tokenizer inside a GGUF file, both ways.

GGUF stores a byte-level BPE tokenizer as `tokenizer.ggml.model = "gpt2"`: the token strings by
id, the merges in rank order ("a b"), a type per token (normal, control for special tokens,
user-defined for other added ones), the special token ids and a pre-tokenizer name that
llama.cpp implements in its own code. moekit's tokenizers (and any byte-level BPE whose pre-
tokenizer is GPT-2's: the ByteLevel split with its standard regex and no normaliser) are "gpt-2"
there; byte-level tokenizers with Qwen2's, Llama 3's, the o200k (gpt-oss, Llama 4) or
DeepSeek-V3's splits are "qwen2", "llama-bpe", "gpt-4o" and "deepseek-v3" (`SPLITS`).
llama.cpp's own converter names the pre-tokenizer by hashing a fixed text's token ids, so it
recognises only vocabularies it has registered; writing the GGUF here states the pre-tokenizer
directly. A tokenizer of another kind (SentencePiece, another split) is refused by name rather
than written with a pre-tokenizer that would split text differently.
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
# GPT-2's byte-level split alone, by normaliser: none (GPT-2's, moekit's own tokenizers) or NFC
# (GPT-NeoX's: OLMo and OLMoE, which llama.cpp names "olmo").
BYTE_LEVEL = {"gpt-2": None, "olmo": "NFC"}

# The split expressions of the byte-level pre-tokenizers moekit names in GGUF files, as the
# published tokenizer.json files of each family spell them (`Split`s, in order, before a
# ByteLevel that maps bytes only), with the normaliser that goes with them. llama.cpp
# implements each under the name on the left.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS: dict[str, tuple[tuple[str, ...], str | None]] = {
    # Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE: digits one by one, NFC-normalised text.
    "qwen2": ((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _REST,), "NFC"),
    # Llama 3: digits in groups of up to three.
    "llama-bpe": ((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _REST,), None),
    # gpt-oss and Llama 4 (OpenAI's o200k split): words by letter case, contractions attached,
    # digits in groups of up to three. llama.cpp reads it as "gpt-4o" or "llama4".
    "gpt-4o": (
        (
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        None,
    ),
    # DeepSeek-V3 (and R1): digit groups of up to three, runs of CJK ideographs and kana, then
    # words, punctuation runs and whitespace.
    "deepseek-v3": (
        (
            r"\p{N}{1,3}",
            r"[一-龥぀-ゟ゠-ヿ]+",
            # Spelt as the published file holds it once read: a plain quote, and carriage
            # return and line feed as the characters themselves.
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
            "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
        ),
        None,
    ),
}
ALIASES = {"llama4": "gpt-4o", "default": "gpt-2"}  # other names llama.cpp reads them by
# The pre-tokenizers after which llama.cpp takes a piece that is a token as it is, before any
# merge (the BPE model's `ignore_merges`, which Llama 3's tokenizer.json sets).
IGNORE_MERGES = {"llama-bpe"}


def pre_tokenizer_name(spec: dict[str, Any], where: str) -> str:
    """llama.cpp's name for the pre-tokenizer of tokenizer.json `spec`; UnsupportedError
    naming it when it is none moekit knows (it would split text differently there)."""
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if normalizer == {"type": "Sequence", "normalizers": []}:  # DeepSeek-V3's: none at all
        normalizer = None
    if all(pre.get(k) == v for k, v in GPT2_PRE.items()):
        for name, norm in BYTE_LEVEL.items():
            if (normalizer or {}).get("type") == norm:
                return name
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) >= 2:
        *splits, byte_level = steps
        plain = all(
            split.get("type") == "Split"
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            for split in splits
        )
        patterns = tuple((split.get("pattern") or {}).get("Regex") for split in splits)
        bytes_only = byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex")
        norm = (normalizer or {}).get("type")
        for name, (expected, expected_norm) in SPLITS.items():
            if plain and bytes_only and patterns == expected and norm == expected_norm:
                return name
    raise UnsupportedError(
        f"{where}: pre_tokenizer {json.dumps(pre)} (normalizer {json.dumps(normalizer)}) is "
        f"none moekit names in GGUF files: GPT-2's byte-level split without a normaliser "
        f"(gpt-2, moekit's own) or with NFC (olmo), {', '.join(SPLITS)}"
    )


def pre_tokenizer_of(name: str) -> tuple[Any, Any]:
    """The `tokenizers` (normaliser, pre-tokenizer) of llama.cpp's pre-tokenizer `name`."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    name = ALIASES.get(name, name)
    if name in BYTE_LEVEL:
        normalizer = normalizers.NFC() if BYTE_LEVEL[name] == "NFC" else None
        return normalizer, pre_tokenizers.ByteLevel(add_prefix_space=False)
    patterns, norm = SPLITS[name]
    splits = [
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
        for pattern in patterns
    ]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    normalizer = normalizers.NFC() if norm == "NFC" else None
    return normalizer, pre_tokenizers.Sequence([*splits, byte_level])


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
    pre = pre_tokenizer_name(spec, str(model_dir.tokenizer_path))
    if bool(model.get("ignore_merges")) != (pre in IGNORE_MERGES):
        state = "takes" if pre in IGNORE_MERGES else "does not take"
        raise UnsupportedError(
            f"{model_dir.tokenizer_path}: llama.cpp {state} whole-word tokens before merging "
            f"after the {pre!r} pre-tokenizer, but this BPE model's ignore_merges is "
            f"{bool(model.get('ignore_merges'))}"
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
        "tokenizer.ggml.pre": pre,
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
    adds = added_specials(tok)
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
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    names = [*BYTE_LEVEL, *SPLITS, *ALIASES]
    if kind != "gpt2" or pre not in names:
        raise UnsupportedError(
            f"GGUF tokenizer.ggml.model={kind!r} with tokenizer.ggml.pre={pre!r} is not "
            "supported: moekit rebuilds byte-level BPE tokenizers (model 'gpt2') with the "
            f"pre-tokenizers {', '.join(names)}"
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
    ignore = ALIASES.get(pre, pre) in IGNORE_MERGES
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore))
    normalizer, backend.pre_tokenizer = pre_tokenizer_of(pre)
    if normalizer is not None:
        backend.normalizer = normalizer
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
