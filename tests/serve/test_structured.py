"""Structured output through the real server on loopback, with the official openai client. The
tiny model's weights are random: only the constraint makes its outputs valid."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

HI = [{"role": "user", "content": "Describe it."}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS = {
    "required fields": PERSON,
    "enum": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["colour", "ok"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -50, "maximum": 50},
        "minItems": 2,
        "maxItems": 4,
    },
    "nested": {
        "type": "object",
        "properties": {
            "owner": PERSON,
            "tags": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                "maxItems": 3,
            },
        },
        "required": ["owner", "tags"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "x": {"type": "number", "minimum": -10, "maximum": 10},
            "n": {"type": "integer", "minimum": 1, "maximum": 9},
            "z": {"type": "null"},
        },
        "required": ["x", "n", "z"],
        "additionalProperties": False,
    },
}


def json_schema_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_outputs_validate(client, name):
    schema = SCHEMAS[name]
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=HI,
            response_format=json_schema_format(schema),
            seed=seed,
            max_tokens=90,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_parses(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=HI,
        response_format={"type": "json_object"},
        seed=3,
        max_tokens=90,
        temperature=0.3,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_regex_choice_and_grammar_extensions(client):
    regex = r"[A-Z][a-z]{2,6}-[0-9]{3}"
    r = client.chat.completions.create(
        model="tiny", messages=HI, seed=1, max_tokens=30, extra_body={"guided_regex": regex}
    )
    assert re.fullmatch(regex, r.choices[0].message.content), r.choices[0].message.content
    choices = ["positive", "negative", "neutral"]
    r = client.chat.completions.create(
        model="tiny", messages=HI, n=4, max_tokens=30, extra_body={"guided_choice": choices}
    )
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in r.choices)
    # vLLM's newer form, on the completions endpoint
    r = client.completions.create(
        model="tiny",
        prompt="The answer is",
        max_tokens=30,
        seed=2,
        extra_body={"structured_outputs": {"grammar": 'root ::= "(" [0-9]{1,3} ")"'}},
    )
    assert re.fullmatch(r"\([0-9]{1,3}\)", r.choices[0].text), r.choices[0].text
    r = client.completions.create(
        model="tiny",
        prompt="The answer is",
        max_tokens=60,
        seed=2,
        extra_body={"guided_json": json.dumps(SCHEMAS["enum"])},
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["enum"])


def test_each_request_of_a_batch_has_its_own_constraint(client):
    """Different constraints decoded together (one server, concurrent requests, n > 1)."""

    def ask(i):
        if i % 3 == 0:
            schema = list(SCHEMAS.values())[i % len(SCHEMAS)]
            r = client.chat.completions.create(
                model="tiny", messages=HI, n=2, seed=i, max_tokens=90,
                response_format=json_schema_format(schema),
            )  # fmt: skip
            return "json", schema, [c.message.content for c in r.choices]
        if i % 3 == 1:
            r = client.chat.completions.create(
                model="tiny", messages=HI, seed=i, max_tokens=20,
                extra_body={"guided_regex": "[0-9]{4}"},
            )  # fmt: skip
            return "regex", "[0-9]{4}", [r.choices[0].message.content]
        r = client.chat.completions.create(model="tiny", messages=HI, seed=i, max_tokens=10)
        return "free", None, [r.choices[0].message.content]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(9)))
    for kind, spec, texts in results:
        for text in texts:
            if kind == "json":
                jsonschema.validate(json.loads(text), spec)
            elif kind == "regex":
                assert re.fullmatch(spec, text), text
    free = [texts[0] for kind, _, texts in results if kind == "free"]
    assert not all(re.fullmatch("[0-9]{4}", t) for t in free)  # unconstrained ones stay free


def test_streaming_reassembles_valid_json(client):
    schema = SCHEMAS["nested"]
    stream = client.chat.completions.create(
        model="tiny",
        messages=HI,
        stream=True,
        seed=5,
        max_tokens=90,
        response_format=json_schema_format(schema),
    )
    parts, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop" and len([p for p in parts if p]) > 3
    jsonschema.validate(json.loads("".join(parts)), schema)


def test_logprobs_are_of_the_constrained_distribution(client):
    """Forbidden tokens never show up among the alternatives, and the chosen ones are finite."""
    r = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=10,
        logprobs=True,
        top_logprobs=5,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content in ("yes", "no")
    for entry in content:
        assert entry.logprob > float("-inf")
        assert len(entry.top_logprobs) < 5  # only the few allowed tokens are alternatives
        assert all(t.logprob > float("-inf") for t in entry.top_logprobs)


def test_max_tokens_cut_gives_length(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=3,
        seed=0,
        response_format=json_schema_format(SCHEMAS["nested"]),
    )
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert '{"owner":'.startswith(choice.message.content)  # on its way, cut before it closes
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


BAD = [
    (
        {"response_format": json_schema_format({"type": "object", "not": {"required": ["a"]}})},
        "response_format",
        "'not' is not supported",
    ),
    (
        {"response_format": json_schema_format({"type": "array", "uniqueItems": True})},
        "response_format",
        "'uniqueItems' is not supported",
    ),
    (
        {"response_format": json_schema_format({"type": "obj"})},
        "response_format",
        "obj",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format",
        "'json_schema.schema' is missing",
    ),
    ({"response_format": {"type": "xml"}}, "response_format", "type 'xml' is not supported"),
    ({"guided_regex": "([a-z]"}, "guided_regex", "unclosed group"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_grammar": "start: nothing_here"}, "guided_grammar", "nothing_here"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    (
        {"structured_outputs": {"structural_tag": "{}"}},
        "structured_outputs",
        "'structural_tag' is not supported",
    ),
    (
        {"guided_json": {"type": "object"}, "guided_whitespace_pattern": " *"},
        "guided_whitespace_pattern",
        "not supported",
    ),
    (
        {"guided_regex": "[0-9]+", "response_format": {"type": "json_object"}},
        "guided_regex",
        "set only one",
    ),
]


@pytest.mark.parametrize("extra, param, message", BAD)
def test_bad_constraints_are_400s_naming_the_problem(server, client, extra, param, message):
    url, _ = server
    body = {"model": "tiny", "messages": HI, "max_tokens": 5, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    # through the openai client too, and the server keeps serving
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, extra_body=extra)
    ok = client.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
    # a sampled answer may end early on the end-of-text token
    assert ok.choices[0].finish_reason in ("length", "stop") and ok.usage.completion_tokens <= 2


def test_text_format_is_no_constraint(client):
    r = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=8, seed=0, response_format={"type": "text"}
    )
    plain = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, seed=0)
    assert r.choices[0].message.content == plain.choices[0].message.content


def test_ignore_eos_runs_until_the_output_is_complete(client):
    """With ignore_eos, end-of-text is not allowed where the output could stop early: it goes
    on until the constraint is done."""
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=HI, seed=seed, max_tokens=20,
            extra_body={"guided_regex": "[a-z]{1,4}", "ignore_eos": True},
        )  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "stop" and re.fullmatch("[a-z]{4}", choice.message.content)


def test_engine_requests_carry_their_own_grammar(tiny_model_dir):
    """The engine on its own (what other features build on): requests decoded in one batch,
    each with its compiled constraint or none; a completed output ends with "stop", and its
    TokenEvents' text is the whole output."""
    import threading

    from moekit.infer.constrain import compile_constraint
    from moekit.infer.generate import Generator
    from moekit.infer.sampling import SamplingParams
    from moekit.serve.engine import DoneEvent, Engine, EngineRequest, TokenEvent

    generator = Generator.from_dir(tiny_model_dir)
    tok = generator.tokenizer
    engine = Engine(generator, max_batch=4)
    grammars = [
        compile_constraint(tok, "json_schema", SCHEMAS["enum"], eos_ids=generator.eos_ids),
        compile_constraint(tok, "regex", "[0-9]{3}", eos_ids=generator.eos_ids),
        compile_constraint(tok, "choice", ["alpha", "beta"], eos_ids=generator.eos_ids),
        None,
    ]
    inboxes = [([], threading.Event()) for _ in grammars]

    def emit(box):
        return lambda e: (box[0].append(e), isinstance(e, DoneEvent) and box[1].set())

    requests = [
        EngineRequest(
            tok.encode("Answer:"),
            SamplingParams(max_new_tokens=60, seed=i, ignore_eos=g is None),
            emit(box),
            grammar=g,
        )
        for i, (g, box) in enumerate(zip(grammars, inboxes, strict=True))
    ]
    engine.start()
    try:
        engine.submit(*requests)
        for _, done in inboxes:
            assert done.wait(60)
    finally:
        engine.stop()
    ends = [next(e for e in events if isinstance(e, DoneEvent)) for events, _ in inboxes]
    texts = ["".join(e.text for e in events if isinstance(e, TokenEvent)) for events, _ in inboxes]
    assert [d.text for d in ends] == texts
    jsonschema.validate(json.loads(texts[0]), SCHEMAS["enum"])
    assert re.fullmatch("[0-9]{3}", texts[1]) and texts[2] in ("alpha", "beta")
    assert [d.finish_reason for d in ends[:3]] == ["stop"] * 3
    assert ends[3].finish_reason == "length" and ends[3].completion_tokens == 60
