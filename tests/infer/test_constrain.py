"""Output constraints (moekit.infer.constrain) on the tiny test tokenizer: random logits, masked,
always give outputs the constraint allows."""

import json
import re

import pytest
import torch

from moekit.data.tokenizer import Tokenizer
from moekit.infer.constrain import ConstraintError, compile_constraint

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.load(tiny_model_dir)


def sample(tok, grammar, seed, max_tokens=200, vocab=None):
    """Sample from random logits under the grammar until it is done or end-of-text comes.
    Returns (text, how it ended)."""
    g = torch.Generator().manual_seed(seed)
    m, out = grammar.matcher(), []
    for _ in range(max_tokens):
        logits = torch.randn(vocab or tok.vocab_size, generator=g) * 3
        m.mask_(logits)
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        if token == tok.eos_id:
            return tok.decode(out), "eos"
        m.accept(token)
        out.append(token)
        if m.done:
            return tok.decode(out), "done"
    return tok.decode(out), "length"


SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["point", "ok"],
        "additionalProperties": False,
    },
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_outputs_validate(tok, schema):
    grammar = compile_constraint(tok, "json_schema", schema)
    for seed in range(3):
        text, how = sample(tok, grammar, seed)
        assert how in ("done", "eos"), text
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_grammar_and_json_object(tok):
    g = compile_constraint(tok, "regex", r"[A-Z][a-z]{1,5} [0-9]{2}")
    for seed in range(3):
        text, _ = sample(tok, g, seed)
        assert re.fullmatch(r"[A-Z][a-z]{1,5} [0-9]{2}", text), text
    choices = ["yes", "no", 'say "maybe"\\']
    g = compile_constraint(tok, "choice", choices)
    assert {sample(tok, g, seed)[0] for seed in range(8)} <= set(choices)
    g = compile_constraint(tok, "grammar", 'root ::= "(" [0-9]+ ")"')  # GBNF
    text, how = sample(tok, g, 0)
    assert re.fullmatch(r"\([0-9]+\)", text) and how == "done", text
    g = compile_constraint(tok, "grammar", 'start: "<" NAME ">"\nNAME: /[a-z]+/')  # Lark
    text, _ = sample(tok, g, 0)
    assert re.fullmatch(r"<[a-z]+>", text), text
    g = compile_constraint(tok, "json_object")
    text, how = sample(tok, g, 1, max_tokens=400)
    assert how == "done" and isinstance(json.loads(text), dict), text


def test_done_allows_only_end_of_text(tok):
    m = compile_constraint(tok, "choice", ["ok"]).matcher()
    for t in tok.encode("ok"):
        m.accept(t)
    assert m.done
    logits = m.mask_(torch.zeros(tok.vocab_size))
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [tok.eos_id]


def test_longer_logits_than_vocabulary_are_masked(tok):
    """A model whose logits are longer than its tokenizer's vocabulary never samples the ids
    past it."""
    grammar = compile_constraint(tok, "regex", "[a-z]+", vocab_size=tok.vocab_size + 40)
    logits = grammar.matcher().mask_(torch.zeros(tok.vocab_size + 40))
    assert not torch.isfinite(logits[tok.vocab_size :]).any()
    assert torch.isfinite(logits[: tok.vocab_size]).any()


def test_extra_end_tokens(tok):
    """Every token that ends a generation is allowed once the output may end."""
    other = tok.vocab_size - 1
    m = compile_constraint(tok, "choice", ["ok"], eos_ids=[tok.eos_id, other]).matcher()
    for t in tok.encode("ok"):
        m.accept(t)
    allowed = torch.isfinite(m.mask_(torch.zeros(tok.vocab_size))).nonzero().flatten().tolist()
    assert allowed == sorted([tok.eos_id, other])


def test_compiled_grammars_are_cached_and_independent(tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    g1 = compile_constraint(tok, "json_schema", schema)
    assert compile_constraint(tok, "json_schema", dict(reversed(schema.items()))) is g1
    m1, m2 = g1.matcher(), g1.matcher()
    m1.accept(tok.encode("{")[0])
    assert not m2.accepting and m2.allowed()[tok.encode("{")[0]]


@pytest.mark.parametrize(
    "kind, spec, message",
    [
        ("json_schema", {"type": "object", "not": {"type": "string"}}, "'not' is not supported"),
        ("json_schema", {"type": "array", "uniqueItems": True}, "'uniqueItems' is not supported"),
        ("json_schema", {"type": "strng"}, "strng"),
        ("json_schema", {"$ref": "#/$defs/missing"}, "/$defs/missing"),
        ("json_schema", [1], "must be a JSON object"),
        ("regex", "a(b", "unclosed group"),
        ("regex", "", "non-empty string"),
        ("choice", [], "non-empty list"),
        ("choice", ["a", 3], "non-empty list of strings"),
        ("grammar", "start: missing_rule", "missing_rule"),
        ("xml", "<a/>", "unknown constraint kind 'xml'"),
    ],
)
def test_bad_constraints_name_the_problem(tok, kind, spec, message):
    with pytest.raises(ConstraintError, match=re.escape(message)) as e:
        compile_constraint(tok, kind, spec)
    if kind in ("json_schema", "regex", "choice", "grammar"):
        assert str(e.value).startswith(f"{kind}: ")


def test_no_end_tokens_means_only_the_grammar_ends(tok):
    """eos_ids=[] (a request that ignores end-of-text): end-of-text is never allowed, so an
    output that could end or go on goes on."""
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    with_eos = compile_constraint(tok, "regex", "ab?").matcher()
    without = compile_constraint(tok, "regex", "ab?", eos_ids=[]).matcher()
    for m in (with_eos, without):
        m.accept(a)
        assert m.accepting and not m.done
    assert with_eos.allowed()[tok.eos_id] and with_eos.allowed()[b]
    allowed = without.mask_(torch.zeros(tok.vocab_size))
    assert torch.isfinite(allowed).nonzero().flatten().tolist() == [b]


def test_pathological_constraints_are_refused_briefly(tok):
    deep = {"type": "integer"}
    for _ in range(3000):  # deeper than Python's recursion limit
        deep = {"type": "array", "items": deep}
    with pytest.raises(ConstraintError, match="json_schema: nested too deeply"):
        compile_constraint(tok, "json_schema", deep)
    deep = {"type": "integer"}
    for _ in range(500):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ConstraintError, match="recursion limit"):
        compile_constraint(tok, "json_schema", deep)
    with pytest.raises(ConstraintError) as e:
        compile_constraint(tok, "regex", "(" * 3000 + "a" + ")" * 3000)
    assert len(str(e.value)) <= 400
