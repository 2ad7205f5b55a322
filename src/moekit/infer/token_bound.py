"""The fewest tokens a text can encode to, read from its length alone, so that a prompt far too
long for the context is refused without tokenizing it (which takes a second per megabyte).

The bound must never refuse a prompt that would fit, so it holds only for tokenizers where
every token stands for at most as many characters of the text as its piece has: a BPE model
(a piece is the text it covers, in byte-level symbols one per byte, or with "▁" for a space),
fed by normalizers and pre-tokenizers that never drop or join characters. Then a text of N
characters takes at least N / (the longest piece) tokens. Anything else (a normalizer that
composes or strips characters, a pre-tokenizer that drops whitespace, a model that turns a
whole unknown word into one token, an added token that swallows the spaces around it,
truncation) gives no bound, and every prompt is tokenized.
"""

from __future__ import annotations

import json
from typing import Any

# Normalizers that map every character to one or more characters.
_NORMALIZERS = {"NFD", "NFKD", "Lowercase", "Prepend", "ByteLevel"}
# Pre-tokenizers that split the text (or map characters to one or more) and drop nothing.
_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"}


class TokenBound:
    """`at_least(text)`: the fewest tokens `tokenizer.encode_prompt(text)` can give. It is 0
    for every text when the tokenizer is not one the bound holds for (see the module's
    docstring); `chars_per_token` is None then."""

    def __init__(self, tokenizer: Any) -> None:
        self.chars_per_token = _chars_per_token(tokenizer)
        self.prefix = len(getattr(tokenizer, "prompt_prefix", []))

    def at_least(self, text: str) -> int:
        if self.chars_per_token is None:
            return 0
        return self.prefix + -(-len(text) // self.chars_per_token)


def _chars_per_token(tokenizer: Any) -> int | None:
    """The most characters of input one token can stand for, or None when unknown."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if spec.get("truncation") is not None or model.get("type") != "BPE":
        return None
    if model.get("fuse_unk") and model.get("unk_token") is not None:
        return None  # a run of unknown characters becomes one token
    if not (_keeps_length(spec.get("normalizer"), _normalizer_ok)):
        return None
    if not (_keeps_length(spec.get("pre_tokenizer"), _pre_tokenizer_ok)):
        return None
    longest = max((len(piece) for piece in backend.get_vocab(with_added_tokens=True)), default=0)
    split_special = bool(getattr(backend, "encode_special_tokens", False))
    for token in backend.get_added_tokens_decoder().values():
        matched = not (token.special and split_special)  # found in the text as one token
        if matched and (token.lstrip or token.rstrip):
            return None
        longest = max(longest, len(token.content))
    return longest or None


def _keeps_length(spec: Any, ok: Any) -> bool:
    """Whether a normalizer or pre-tokenizer spec (None, one step, or a Sequence of steps)
    keeps every character, by `ok` for a single step."""
    if spec is None:
        return True
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "Sequence":
        steps = spec.get("normalizers") or spec.get("pretokenizers") or []
        return all(_keeps_length(step, ok) for step in steps)
    return bool(ok(spec))


def _normalizer_ok(spec: dict[str, Any]) -> bool:
    kind = spec.get("type")
    if kind == "Replace":  # a plain string for one at least as long
        pattern = spec.get("pattern") or {}
        content = spec.get("content")
        return (
            isinstance(pattern, dict)
            and isinstance(pattern.get("String"), str)
            and isinstance(content, str)
            and len(content) >= len(pattern["String"])
        )
    return kind in _NORMALIZERS


def _pre_tokenizer_ok(spec: dict[str, Any]) -> bool:
    kind = spec.get("type")
    if kind in ("Split", "Punctuation"):
        return spec.get("behavior") != "Removed"
    return kind in _PRE_TOKENIZERS
