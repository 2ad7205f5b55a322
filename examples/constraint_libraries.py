"""Compare constrained-decoding libraries on moekit's tokenizers: per-token mask time and
JSON Schema coverage.

    pip install llguidance outlines-core
    pip install --no-deps xgrammar 'apache-tvm-ffi>=0.1.11'   # without triton, on a CPU
    PYTHONPATH=src python examples/constraint_libraries.py [--vocab 150000] [--repeats 5]

Two tokenizers: the 512-token one the tests use (trained on a slice of the builtin corpus),
and a byte-level BPE of `--vocab` tokens: trained on the builtin corpus as far as it goes, then
grown with merges of existing tokens (deterministic) up to that size. Real 150k vocabularies
(Qwen, DeepSeek) have the same structure: 256 byte symbols and merges of them.

For each library: the time to compile a JSON schema, and the time per generated token to
compute the set of allowed tokens (the bitmask) and to advance the state, over the tokens of
a valid instance. Then, for each JSON Schema keyword, whether the library enforces it (refuses
an instance that breaks only that keyword), ignores it (accepts that instance) or refuses the
schema. Last, moekit's serving engine with and without a JSON schema constraint: its whole
cost per generated token.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import tokenizers
import torch

from moekit.data.corpus import builtin_corpus
from moekit.data.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "height": {"type": "number"},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
        },
    },
    "required": ["name", "age", "role", "address"],
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "height": 1.65,
    "member": True,
    "role": "admin",
    "tags": ["mathematics", "engines", "poetry of science"],
    "address": {"street": "12 St James's Square", "city": "London"},
}

# keyword: (schema, an instance that is valid, one that breaks only that keyword)
FEATURES: dict[str, tuple[dict[str, Any], Any, Any]] = {
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                 {"a": 1}, {}),
    "additionalProperties: false": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"a": 1}, {"a": 1, "b": 2}),
    "enum": ({"enum": ["x", "y"]}, "x", "z"),
    "const": ({"const": "x"}, "x", "y"),
    "minimum/maximum": ({"type": "integer", "minimum": 1, "maximum": 9}, 5, 12),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 1, 0),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 10, 7),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 3}, "ab", "abcdef"),
    "pattern": ({"type": "string", "pattern": "^[a-c]+$"}, "abc", "xyz"),
    "format: date": ({"type": "string", "format": "date"}, "2024-01-31", "yesterday"),
    "format: email": ({"type": "string", "format": "email"}, "a@b.co", "not an email"),
    "format: uuid": ({"type": "string", "format": "uuid"},
                     "123e4567-e89b-12d3-a456-426614174000", "1234"),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 1,
                           "maxItems": 2}, [1], [1, 2, 3]),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
                    [1, 2], [1, 1]),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                     "items": False}, [1, "a"], ["a", 1]),
    "contains": ({"type": "array", "contains": {"const": 3}}, [1, 3], [1, 2]),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, 1, "s"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, 1, "s"),
    "allOf": ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, 4, 1),
    "not": ({"not": {"type": "string"}}, 1, "s"),
    "if/then/else": ({"if": {"type": "integer"}, "then": {"minimum": 3},
                      "else": {"type": "string"}}, 4, 1),
    "$ref (recursive)": (
        {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array",
                                                                 "items": {"$ref": "#/$defs/n"}}},
                         "additionalProperties": False}}, "$ref": "#/$defs/n"},
        {"c": [{"c": []}]}, {"c": [{"d": 1}]}),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                           "additionalProperties": False}, {"x1": 1}, {"x1": "s"}),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
                      {"ab": 1}, {"A1": 1}),
    "minProperties": ({"type": "object", "minProperties": 1}, {"a": 1}, {}),
    "dependentRequired": ({"type": "object", "dependentRequired": {"a": ["b"]}},
                          {"a": 1, "b": 2}, {"a": 1}),
}  # fmt: skip


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([d.text for d in builtin_corpus(max_chars_per_domain=20_000)], 512)


def big_tokenizer(vocab: int) -> Tokenizer:
    """A byte-level BPE of exactly `vocab` tokens (see the module docstring)."""
    base = Tokenizer.train([d.text for d in builtin_corpus(max_chars_per_domain=500_000)], vocab)
    data = json.loads(base.backend.to_str())
    model = data["model"]
    tokens: dict[str, int] = model["vocab"]
    merges: list[Any] = model["merges"]
    pool = [t for t in tokens if len(t) > 1]
    rng = random.Random(0)
    alphabet = pre_alphabet()
    while len(tokens) < vocab:
        a = rng.choice(pool)
        b = rng.choice(pool) if rng.random() < 0.5 else rng.choice(alphabet)
        if a + b in tokens or len(a + b) > 16:
            continue
        tokens[a + b] = len(tokens)
        merges.append([a, b])
        pool.append(a + b)
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    return Tokenizer(backend)


def pre_alphabet() -> list[str]:
    return sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())


def byte_decoder() -> dict[str, int]:
    """The byte-level pre-tokenizer's printable stand-in for each byte (GPT-2's table)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def raw_vocab(tok: Tokenizer) -> list[bytes]:
    """Every token's bytes, in id order (special tokens as their text)."""
    table, special = (
        byte_decoder(),
        {a.content for a in tok.backend.get_added_tokens_decoder().values()},
    )
    out = []
    for t, _ in sorted(tok.backend.get_vocab(with_added_tokens=True).items(), key=lambda x: x[1]):
        out.append(t.encode() if t in special else bytes(table[c] for c in t))
    return out


# ---- one adapter per library: compile(schema) -> state; state.mask(); state.accept(tok) ------


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer) -> None:
        import llguidance as llg

        self.llg = llg
        self.lt = llg.LLTokenizer(tok.backend.to_str(), eos_token=tok.eos_id)
        self.n = tok.vocab_size

    def compile(self, schema: dict[str, Any]) -> Any:
        g = self.llg.LLMatcher.grammar_from_json_schema(schema)
        err, msgs = self.llg.LLMatcher.validate_grammar_with_warnings(g, self.lt)
        if err:
            raise ValueError(msgs[0])
        return self.llg.LLMatcher(self.lt, g)

    def mask(self, m: Any) -> Any:
        return m.compute_bitmask()

    def accept(self, m: Any, t: int) -> bool:
        return bool(m.consume_token(t))

    def complete(self, m: Any, eos: int) -> bool:
        return bool(m.is_accepting())


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        vocab = [t for t, _ in sorted(tok.backend.get_vocab(True).items(), key=lambda x: x[1])]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, stop_token_ids=[tok.eos_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))

    def mask(self, m: Any) -> Any:
        m.fill_next_token_bitmask(self.bitmask)
        return self.bitmask

    def accept(self, m: Any, t: int) -> bool:
        return bool(m.accept_token(t))

    def complete(self, m: Any, eos: int) -> bool:
        return bool(m.accept_token(eos))


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Tokenizer) -> None:
        import outlines_core as oc

        self.oc = oc
        eos = tok.eos_id
        table: dict[bytes, list[int]] = {}
        for i, b in enumerate(raw_vocab(tok)):
            if i not in (eos, tok.pad_id):
                table.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(eos, table)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def mask(self, g: Any) -> Any:
        return g.get_tokens()

    def accept(self, g: Any, t: int) -> bool:
        try:
            g.advance(t, return_tokens=False)
        except Exception:
            return False
        return True

    def complete(self, g: Any, eos: int) -> bool:
        return bool(g.is_finished()) or eos in g.get_tokens()


def timed(f: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def speed(lib: Any, tok: Tokenizer, repeats: int) -> dict[str, float]:
    ids = tok.encode(json.dumps(INSTANCE))
    _, compile_s = timed(lambda: lib.compile(SCHEMA))
    per_token = []
    for _ in range(repeats):
        m = lib.compile(SCHEMA)
        for t in ids:
            _, s = timed(lambda m=m, t=t: (lib.mask(m), lib.accept(m, t)))
            per_token.append(s)
    return {"compile_ms": compile_s * 1e3, "token_us": statistics.median(per_token) * 1e6,
            "token_us_mean": statistics.mean(per_token) * 1e6,
            "token_us_p90": statistics.quantiles(per_token, n=10)[-1] * 1e6}  # fmt: skip


def apply_cost(vocab: int) -> float:
    """The time to set the disallowed logits of one row to -inf from a packed bitmask (the same
    for every library), as moekit.infer.constrain does it."""
    import numpy as np

    packed = np.random.default_rng(0).integers(0, 256, (vocab + 31) // 32 * 4, dtype=np.uint8)
    times = []
    for _ in range(200):
        logits = torch.randn(vocab)
        t0 = time.perf_counter()
        allowed = np.unpackbits(packed, bitorder="little")[:vocab].view(np.bool_)
        logits += torch.from_numpy(np.where(allowed, np.float32(0), np.float32(-np.inf)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def engine_cost(tok: Tokenizer, tokens: int, repeats: int) -> tuple[float, float]:
    """Milliseconds per generated token in moekit's serving engine, without and with a JSON
    schema constraint (llguidance), on a random debug-size MoE with this vocabulary: the
    constraint's whole cost per token (mask, apply, advance) against a small forward pass."""
    import threading

    from moekit import build_model
    from moekit.config import ModelConfig
    from moekit.infer.constrain import compile_constraint
    from moekit.infer.generate import Generator
    from moekit.infer.sampling import SamplingParams
    from moekit.serve.engine import DoneEvent, Engine, EngineRequest

    cfg = ModelConfig.from_dict(
        dict(vocab_size=tok.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
             ffn_hidden=128, max_seq_len=tokens + 16,
             moe=dict(num_experts=8, top_k=2, expert_hidden=64))
    )  # fmt: skip
    engine = Engine(Generator(build_model(cfg, seed=0).eval(), tok), max_batch=1)
    engine.start()
    # Records without end: the output is cut by max_new_tokens, never finished by the schema.
    many = {"type": "array", "items": SCHEMA, "minItems": 1000}
    grammar = compile_constraint(tok, "json_schema", many)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True, seed=0)

    def run(constrained: bool) -> float:
        done = threading.Event()
        req = EngineRequest(tok.encode("Records:"), params, lambda e: isinstance(e, DoneEvent)
                            and done.set(), grammar=grammar if constrained else None)  # fmt: skip
        t0 = time.perf_counter()
        engine.submit(req)
        done.wait()
        return (time.perf_counter() - t0) / tokens * 1e3

    plain, masked = [], []
    for _ in range(repeats):
        plain.append(run(False))
        masked.append(run(True))
    engine.stop()
    return statistics.median(plain), statistics.median(masked)


def accepts(lib: Any, tok: Tokenizer, schema: Any, instance: Any) -> bool:
    m = lib.compile(schema)
    ids = tok.encode(json.dumps(instance))
    return all(lib.accept(m, t) for t in ids) and lib.complete(m, tok.eos_id)


def coverage(lib: Any, tok: Tokenizer) -> dict[str, str]:
    out = {}
    for name, (schema, good, bad) in FEATURES.items():
        try:
            ok, broken = accepts(lib, tok, schema, good), accepts(lib, tok, schema, bad)
        except Exception as e:
            out[name] = f"refused ({str(e).splitlines()[0][:60]})"
            continue
        out[name] = "enforced" if ok and not broken else "ignored" if ok else "wrong"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engine-tokens", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    libs = (LLGuidance, XGrammar, OutlinesCore)
    big, build_s = timed(lambda: big_tokenizer(args.vocab))
    print(f"built a {big.vocab_size}-token byte-level BPE in {build_s:.1f} s")
    for label, tok in (("tiny (512)", tiny_tokenizer()), (f"{big.vocab_size}", big)):
        print(f"\n== tokenizer {label}: schema of {len(json.dumps(SCHEMA))} chars, "
              f"instance of {len(tok.encode(json.dumps(INSTANCE)))} tokens")  # fmt: skip
        print(f"   applying a mask to one row of logits: {apply_cost(tok.vocab_size):.0f} us")
        for cls in libs:
            try:
                lib, setup_s = timed(lambda cls=cls, tok=tok: cls(tok))
                r = speed(lib, tok, args.repeats)
            except Exception as e:
                print(f"   {cls.name:14s} failed: {e}")
                continue
            print(f"   {cls.name:14s} tokenizer setup {setup_s * 1e3:8.1f} ms  compile "
                  f"{r['compile_ms']:8.1f} ms  per token: median {r['token_us']:7.1f} us, "
                  f"p90 {r['token_us_p90']:.1f}, mean {r['token_us_mean']:.1f}")  # fmt: skip
    print(f"\n== serving engine, {args.engine_tokens} tokens per request, debug-size MoE")
    for label, tok in (("tiny (512)", tiny_tokenizer()), (f"{big.vocab_size}", big)):
        plain, masked = engine_cost(tok, args.engine_tokens, args.repeats)
        print(f"   vocabulary {label:10s}: {plain:.2f} ms/token unconstrained, {masked:.2f} "
              f"ms/token with a JSON schema ({masked / plain:.2f}x)")  # fmt: skip
    tok = tiny_tokenizer()
    table = {cls.name: coverage(cls(tok), tok) for cls in libs}
    print("\n== JSON Schema keywords (enforced / ignored / refused)")
    print(f"{'keyword':30s}" + "".join(f"{n:26s}" for n in table))
    for name in FEATURES:
        print(f"{name:30s}" + "".join(f"{table[n][name][:25]:26s}" for n in table))


if __name__ == "__main__":
    main()
