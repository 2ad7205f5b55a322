"""Incremental detokenisation: streamed text that adds up to exactly the decoded output.

Decoding each new token on its own goes wrong in two ways. A character split over several
tokens (byte-level BPE, or the byte-fallback tokens of SentencePiece-style tokenizers, whose
decoder writes one U+FFFD per byte of an incomplete character) shows up as replacement
characters; and decoders that strip the leading space of what they decode (Metaspace, or a
`Strip` step) drop the space that begins a continuation. So, as vLLM and
text-generation-inference do, each step decodes a short window of earlier ids (starting with
the last few prompt tokens) with and without the new ids and releases the difference, holding
everything back while the decoded window ends in U+FFFD (an incomplete character).

Also here: the UTF-8 bytes of a single token, for the `bytes` field of OpenAI logprobs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

# Prompt tokens decoded in front of the first new token: enough for a decoder's view of the
# start of the continuation (whether it begins a word), few enough to be cheap.
CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns token ids, one at a time, into text pieces whose concatenation is the text of all
    the ids. `context`: ids decoded before the first new one (e.g. the prompt); they shape how
    the new ids decode but their own text is not returned."""

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)[-CONTEXT_TOKENS:]
        self.prefix = 0  # ids[prefix:read] were released already and are decoded for context
        self.read = len(self.ids)  # ids[read:] are not released yet

    def add(self, token: int) -> str:
        """The text that `token` releases ("" while a character is incomplete)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read])
        after = decode(self.ids[self.prefix :])
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return ""
        piece = after[len(before) :]
        # Keep the window short: the released ids become the next step's context.
        self.ids = self.ids[self.read :]
        self.prefix, self.read = 0, len(self.ids)
        return piece


def decode_with_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[int]]:
    """The text of `ids` and, for each id, where its text starts in it (the length of the text
    released before it: the tokens of a character split over several tokens share an offset)."""
    decoder = IncrementalDecoder(tokenizer)
    text, offsets = "", []
    for token in ids:
        offsets.append(len(text))
        text += decoder.add(token)
    return text + decoder.flush(), offsets


class TextTracker:
    """Incremental detokenisation with stop strings: releases only text that can no longer
    change (no incomplete character, no partial stop string at the end). `text` is the output
    so far, cut before the first stop string; `stopped` says one was found. `context`: the
    prompt's ids (see `IncrementalDecoder`).

    Released text never holds a stop string nor ends with the start of one (that part is held
    back), so a stop string can only begin in the text not yet released: every check looks at
    that tail alone, which is shorter than the longest stop string plus the newest piece. The
    cost per token depends on the stop strings and the token, never on the output's length."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], context: Sequence[int] = ()) -> None:
        self.decoder = IncrementalDecoder(tokenizer, context)
        self.stops = [_StopMatcher(s) for s in stops]
        self._released: list[str] = []  # the pieces returned to the caller
        self._held = ""  # the output after them: text not released yet
        self.stopped = False

    @property
    def text(self) -> str:
        """The output so far (cut before the first stop string)."""
        self._released = ["".join(self._released)]
        return self._released[0] + self._held

    def add(self, token: int) -> str:
        """The output text that `token` releases (often "")."""
        if self.stopped:
            return ""
        return self._release(self.decoder.add(token), final=False)

    def flush(self) -> str:
        """The rest of the output, held back until now."""
        piece = "" if self.stopped else self.decoder.flush()
        return self._release(piece, final=True)

    def _release(self, piece: str, *, final: bool) -> str:
        if not self.stopped and piece:
            self._held += piece
            found = [at for m in self.stops if (at := self._held.find(m.stop)) != -1]
            if found:  # the earliest stop string ends the output
                self._held, self.stopped = self._held[: min(found)], True
        keep = 0
        if not (self.stopped or final):
            # Hold back the longest end of the text that may still grow into a stop string.
            keep = max((m.feed(piece) for m in self.stops), default=0)
        cut = len(self._held) - min(keep, len(self._held))
        out, self._held = self._held[:cut], self._held[cut:]
        if out:
            self._released.append(out)
        return out


class _StopMatcher:
    """How much of one stop string the text seen so far ends with (Knuth-Morris-Pratt): each
    character costs amortised constant time, whatever the length of the text."""

    def __init__(self, stop: str) -> None:
        self.stop, self.matched = stop, 0
        # fail[i]: the longest proper prefix of stop[: i + 1] that is also its suffix.
        self.fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, text: str) -> int:
        """Read `text`; the length of the longest end of everything read that is a proper
        prefix of the stop string (a whole match is found by the caller before this)."""
        stop, fail, k = self.stop, self.fail, self.matched
        for c in text:
            while k and (k == len(stop) or stop[k] != c):
                k = fail[k - 1]
            if stop[k] == c:
                k += 1
        self.matched = k
        return k if k < len(stop) else fail[k - 1]


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map from the printable characters of byte-level BPE back to bytes."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    """The UTF-8 bytes each token stands for (OpenAI's logprob `bytes`): a token that holds part
    of a character gets its own bytes, not the replacement character its text decodes to.
    None where the tokenizer's decoder is one this does not know how to invert."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        spec = json.loads(backend.to_str())
        self.kinds = _decoder_kinds(spec.get("decoder"))
        self.byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        self.added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self.alphabet = _byte_level_alphabet() if "ByteLevel" in self.kinds else {}
        self._cache: dict[int, bytes | None] = {}

    def __call__(self, token_id: int) -> bytes | None:
        if token_id not in self._cache:
            self._cache[token_id] = self._compute(token_id)
        return self._cache[token_id]

    def _compute(self, token_id: int) -> bytes | None:
        if token_id in self.added:
            return self.added[token_id].encode()
        piece = self.tokenizer.backend.id_to_token(token_id)
        if piece is None:
            return None
        if self.alphabet:
            if any(c not in self.alphabet for c in piece):
                return None
            return bytes(self.alphabet[c] for c in piece)
        match = _BYTE_TOKEN.fullmatch(piece)
        if self.byte_fallback and match:
            return bytes([int(match[1], 16)])
        if self.kinds & {"Metaspace", "Replace"}:
            return piece.replace(_METASPACE, " ").encode()
        text = self.tokenizer.decode([token_id])
        return None if REPLACEMENT in text else text.encode()


def _decoder_kinds(spec: Any) -> set[str]:
    """The types of a tokenizer.json decoder and of the decoders inside a Sequence."""
    if not isinstance(spec, dict):
        return set()
    kinds = {str(spec.get("type"))}
    for inner in spec.get("decoders") or []:
        kinds |= _decoder_kinds(inner)
    return kinds
