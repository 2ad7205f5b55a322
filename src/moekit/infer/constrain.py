"""Constrained decoding: generation that follows a JSON schema, a regular expression, a list of
choices or a grammar, token by token.

`compile_constraint(tokenizer, kind, spec)` turns a constraint into a `Grammar` (or raises
`ConstraintError` naming what is wrong or unsupported); `Grammar.matcher()` starts one
generation's state; before each token is sampled, `Matcher.mask_` sets the logits of the tokens
the constraint forbids to -inf, and `Matcher.accept` advances past the chosen token. Once
`Matcher.done`, nothing but end-of-text may follow: generation ends there.

The work is done by llguidance (a Rust library: a lazily built lexer and an Earley parser over
the tokenizer's token trie). It needs no precomputation per vocabulary or per schema, so a
new schema compiles in about a millisecond and a mask costs tens of microseconds even for a
150k-token vocabulary, and it refuses the JSON Schema keywords it cannot enforce instead of
ignoring them (docs/serving.md has the measurements).

Kinds and their `spec`:
- "json_object": any JSON object (spec ignored);
- "json_schema": a JSON Schema (a dict);
- "regex": a regular expression the whole output must match (Rust `regex` syntax);
- "choice": a non-empty list of strings, the output is exactly one of them;
- "grammar": a context-free grammar in llguidance's Lark syntax, or in GBNF (llama.cpp's
  format, recognised by its `::=` rules and converted).

JSON is generated compact: `,` and `:` without spaces, no other whitespace (a schema can ask
for other separators through llguidance's "x-guidance" key).

Compiled grammars are cached (by kind and spec, per tokenizer). Compiling validates, so call
it where a bad constraint can still be refused (a server's request handler), not in a decode
loop. The first constraint for a tokenizer also builds llguidance's view of the vocabulary:
20-40 ms for a 512-token vocabulary, 2-4 s for 150k tokens (on a 2-core CPU).
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
CACHE_SIZE = 64  # compiled grammars kept per process
MAX_MESSAGE = 400  # characters of an error message (they may quote the constraint)
# Compact JSON, and nothing but what the schema allows (llguidance's defaults are flexible
# whitespace, which a weak model can fill with newlines until it runs out of tokens).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")


class ConstraintError(ValueError):
    """A constraint that is invalid or that cannot be enforced; the message names the part."""


class Matcher:
    """One generation's position in a grammar (from `Grammar.matcher()`)."""

    def __init__(self, matcher: Any, vocab_size: int, forbid: tuple[int, ...] = ()) -> None:
        self._m = matcher
        self._vocab = vocab_size
        self._forbid = list(forbid)  # end tokens never allowed (see `compile_constraint`)

    @property
    def done(self) -> bool:
        """The output is complete and nothing may follow it but end-of-text."""
        return bool(self._m.is_stopped())

    @property
    def accepting(self) -> bool:
        """The output so far is complete (it may also go on)."""
        return bool(self._m.is_accepting())

    def allowed(self) -> np.ndarray:
        """Over the tokenizer's vocabulary: whether each token may come next."""
        bits = self._m.compute_bitmask()
        if self._m.is_error():
            raise RuntimeError(f"the output constraint failed: {self._m.get_error()}")
        flags = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
        allowed = flags[: self._vocab].view(np.bool_)
        allowed[self._forbid] = False
        return allowed

    def mask_(self, logits_V: Tensor) -> Tensor:
        """Set the logits of the tokens that may not come next to -inf, in place (a row of V
        logits; ids past the tokenizer's vocabulary are never allowed). Returns the row."""
        allowed = self.allowed()
        V, n = logits_V.shape[-1], allowed.shape[0]
        if n < V:
            logits_V[..., n:] = float("-inf")
        # Adding 0 / -inf runs without branches: several times faster than a masked fill
        # when the allowed tokens are scattered over a large vocabulary.
        bias = torch.from_numpy(np.where(allowed[:V], np.float32(0), np.float32(-np.inf)))
        logits_V[..., : bias.shape[0]] += bias.to(logits_V.device, logits_V.dtype)
        return logits_V

    def accept(self, token: int) -> None:
        """Advance past `token`, which must be one that `mask_` allowed."""
        if not self._m.consume_token(int(token)):
            raise RuntimeError(
                f"token {token} does not follow the output constraint: {self._m.get_error()}"
            )


class Grammar:
    """A compiled constraint; `matcher()` starts a generation that follows it. Thread-safe:
    one Grammar serves many generations at once."""

    def __init__(
        self, kind: str, template: Any, vocab_size: int, forbid: tuple[int, ...] = ()
    ) -> None:
        self.kind = kind
        self._template = template  # never advanced: each matcher starts from a copy
        self._vocab = vocab_size
        self._forbid = forbid

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy(), self._vocab, self._forbid)

    def __repr__(self) -> str:
        return f"Grammar({self.kind})"


def compile_constraint(
    tokenizer: Any,
    kind: str,
    spec: Any = None,
    *,
    eos_ids: Iterable[int] | None = None,
    vocab_size: int | None = None,
) -> Grammar:
    """Compile a constraint of `kind` (one of KINDS; see the module docstring for `spec`) for
    `tokenizer` (a moekit Tokenizer). `eos_ids`: the tokens that end a generation (default: the
    tokenizer's end-of-text; none: only a complete output ends it); `vocab_size`: the model's,
    when its logits are longer than the tokenizer's vocabulary. Raises ConstraintError for a
    bad or unsupported constraint."""
    if kind not in KINDS:
        raise ConstraintError(f"unknown constraint kind {kind!r}; one of {', '.join(KINDS)}")
    lltok, forbid = _lltokenizer(tokenizer, eos_ids, vocab_size)
    key = (id(lltok), forbid, kind, _spec_key(kind, spec))
    with _lock:
        cached = _grammars.get(key)
        if cached is not None:
            _grammars.move_to_end(key)
            return cached
    try:
        template = _matcher(lltok, kind, _grammar_text(kind, spec))
    except RecursionError:
        raise ConstraintError(f"{kind}: nested too deeply") from None
    grammar = Grammar(kind, template, lltok.vocab_size, forbid)
    with _lock:
        _grammars[key] = grammar
        while len(_grammars) > CACHE_SIZE:
            _grammars.popitem(last=False)
    return grammar


def _spec_key(kind: str, spec: Any) -> str:
    if kind == "json_object":
        return ""
    try:
        return json.dumps(spec, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"{kind}: not a JSON value ({e})") from None
    except RecursionError:
        raise ConstraintError(f"{kind}: nested too deeply") from None


def _grammar_text(kind: str, spec: Any) -> str:
    """llguidance's grammar for a constraint, checked for its shape (not yet for validity)."""
    import llguidance

    from_schema = llguidance.LLMatcher.grammar_from_json_schema
    if kind == "json_object":
        return from_schema({"type": "object"}, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
    if kind == "json_schema":
        if not isinstance(spec, dict):
            raise ConstraintError(f"json_schema: must be a JSON object, not {_type(spec)}")
        return from_schema(spec, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
    if kind == "regex":
        if not isinstance(spec, str) or not spec:
            raise ConstraintError("regex: must be a non-empty string")
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec):
            raise ConstraintError("choice: must be a non-empty list of strings")
        if any(not c for c in spec):
            raise ConstraintError("choice: the choices must be non-empty strings")
        # JSON string literals are Lark string literals.
        alternatives = " | ".join(json.dumps(c) for c in dict.fromkeys(spec))
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    if not isinstance(spec, str) or not spec.strip():
        raise ConstraintError("grammar: must be a non-empty string")
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(spec)
    except Exception as e:  # the converter's own errors name the line
        raise ConstraintError(f"grammar: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _matcher(lltok: Any, kind: str, text: str) -> Any:
    """A fresh llguidance matcher for a grammar, or ConstraintError saying what is wrong."""
    import llguidance

    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, lltok)
    if failed:
        raise ConstraintError(_message(kind, messages[0] if messages else "invalid"))
    matcher = llguidance.LLMatcher(lltok, text, log_level=0)
    if matcher.is_error():
        raise ConstraintError(_message(kind, matcher.get_error()))
    return matcher


def _message(kind: str, error: str) -> str:
    keys = _UNIMPLEMENTED.search(error)
    if keys:
        names = [n.strip().strip('"') for n in keys.group(1).split(",")]
        quoted = ", ".join(repr(n) for n in names)
        verb = "is" if len(names) == 1 else "are"
        return f"{kind}: {quoted} {verb} not supported"
    error = re.sub(r"^at \d+\(\d+\): ", "", error.strip())  # a position in llguidance's text
    first = error.splitlines()[0] if error else "invalid"
    detail = " ".join(line.strip() for line in error.splitlines()[1:4])
    message = f"{kind}: {first}" + (f" ({detail})" if detail and kind != "json_schema" else "")
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def _type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    return "a string" if isinstance(value, str) else "a scalar"


# ---- llguidance's view of a tokenizer, built once per (tokenizer, end tokens, vocabulary) ----

_lock = threading.Lock()
_grammars: collections.OrderedDict[tuple[Any, ...], Grammar] = collections.OrderedDict()
_lltokenizers: dict[tuple[int, tuple[int, ...], int], tuple[Any, Any]] = {}


def _lltokenizer(
    tokenizer: Any, eos_ids: Iterable[int] | None, vocab_size: int | None
) -> tuple[Any, tuple[int, ...]]:
    """llguidance's tokenizer, and the end tokens it knows that must never be allowed (when
    no token may end a generation but the grammar: llguidance needs one all the same)."""
    import llguidance

    backend = tokenizer.backend
    n = max(tokenizer.vocab_size, vocab_size or 0)
    if eos_ids is None:
        eos_ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    eos: tuple[int, ...] = tuple(sorted(set(eos_ids)))
    forbid: tuple[int, ...] = ()
    if not eos:
        eos = forbid = (tokenizer.pad_id if tokenizer.eos_id is None else tokenizer.eos_id,)
    key = (id(backend), eos, n)
    with _lock:
        hit = _lltokenizers.get(key)
        if hit is not None and hit[0] is backend:
            return hit[1], forbid
    lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=n, eos_token=list(eos))
    with _lock:
        _lltokenizers[key] = (backend, lltok)  # keeps `backend` alive, so its id stays its own
    return lltok, forbid
