"""Tool calls read from a model's answer in each family's format, while it streams and at the
end; the schema that forces a call; moekit's own template writing tools and calls."""

import json

import pytest

from moekit.infer.chat import ChatTemplate
from moekit.infer.tool_calls import (
    TOOL_PARSERS,
    ToolCallStream,
    detect_tool_parser,
    forced_call_schema,
    forced_calls,
    tool_parser,
)

WEATHER = {"city": "Paris", "unit": "°C"}
# One answer with two calls after some text, written in each format.
ANSWERS = {
    "hermes": 'Let me look.\n<tool_call>\n{"name": "weather", "arguments": '
    + json.dumps(WEATHER)
    + '}\n</tool_call>\n<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>',
    "mistral": 'Let me look.[TOOL_CALLS] [{"name": "weather", "arguments": '
    + json.dumps(WEATHER)
    + '}, {"name": "time", "arguments": {}}]',
    "deepseek_v3": "Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
    "weather\n```json\n"
    + json.dumps(WEATHER)
    + "\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>time\n```json\n{}\n```"
    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
}


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_each_format_gives_the_text_and_the_calls(name):
    parser = tool_parser(name)
    text, calls = parser.parse(ANSWERS[name])
    assert text == "Let me look."
    assert [c.name for c in calls] == ["weather", "time"]
    assert json.loads(calls[0].arguments) == WEATHER
    assert json.loads(calls[1].arguments) == {}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    # The answer streamed a few characters at a time reads the same.
    for step in (1, 3, 7):
        stream = ToolCallStream(parser)
        released = "".join(
            stream.feed(ANSWERS[name][i : i + step])[0] for i in range(0, len(ANSWERS[name]), step)
        )
        rest, streamed = stream.finish()
        assert (released + rest).rstrip() == "Let me look."
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]


def test_llama3_json_calls_are_the_whole_answer():
    parser = tool_parser("llama3_json")
    answer = '<|python_tag|>{"name": "weather", "parameters": {"city": "Oslo"}}; {"name": "time", "parameters": {}}'
    text, calls = parser.parse(answer)
    assert text == "" and [c.name for c in calls] == ["weather", "time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    # Text that merely contains braces is text.
    plain = "Use {braces} like this."
    assert parser.parse(plain) == (plain, [])
    stream = ToolCallStream(parser)
    assert stream.feed("Use {") == ("Use {", [])
    assert stream.feed("braces}") == ("braces}", [])
    stream = ToolCallStream(parser)
    assert stream.feed("<|python") == ("", [])
    assert stream.feed(answer[len("<|python") :]) == ("", [])
    assert [c.name for c in stream.finish()[1]] == ["weather", "time"]


@pytest.mark.parametrize(
    "answer",
    [
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # not an object
        '<tool_call>\n{"name": "f", "arguments": {"a": 1',  # cut off by max_tokens
    ],
)
def test_a_malformed_call_stays_text(answer):
    parser = tool_parser("hermes")
    assert parser.parse("Hi " + answer) == ("Hi " + answer, [])
    stream = ToolCallStream(parser)
    released = stream.feed("Hi " + answer)[0]
    assert released + stream.finish()[0] == "Hi " + answer


def test_the_format_is_read_from_the_template():
    assert detect_tool_parser(None).name == "hermes"
    assert detect_tool_parser("{{ '<tool_call>' }}").name == "hermes"
    assert detect_tool_parser("{{ '[TOOL_CALLS] ' }}").name == "mistral"
    assert detect_tool_parser("<｜tool▁calls▁begin｜>").name == "deepseek_v3"
    assert detect_tool_parser("{{ '<|python_tag|>' }}").name == "llama3_json"
    assert set(TOOL_PARSERS) == {"hermes", "mistral", "llama3_json", "deepseek_v3"}
    with pytest.raises(ValueError, match="unknown tool-call format 'xml'"):
        tool_parser("xml")


TOOLS = [
    {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["°C", "°F"]}},
            "required": ["city"],
        },
    },
    {"name": "time", "parameters": None},
]


def test_the_forcing_schema_takes_exactly_the_calls_it_should():
    jsonschema = pytest.importorskip("jsonschema")
    named = forced_call_schema(TOOLS, "weather")
    jsonschema.validate({"city": "Rome"}, named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"unit": "°C"}, named)
    required = forced_call_schema(TOOLS, None)
    jsonschema.validate([{"name": "time", "parameters": {}}], required)
    jsonschema.validate(
        [{"name": "weather", "parameters": {"city": "Rome"}}, {"name": "time", "parameters": {}}],
        required,
    )
    for wrong in (
        [],
        [{"name": "nope", "parameters": {}}],
        [{"name": "weather", "parameters": {}}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, required)
    one = forced_call_schema(TOOLS, None, parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "time", "parameters": {}}] * 2, one)
    # Answers written under them read back as calls; a cut-off answer as none.
    (call,) = forced_calls('{"city": "Rome"}', "weather")
    assert (call.name, json.loads(call.arguments)) == ("weather", {"city": "Rome"})
    calls = forced_calls('[{"name": "time", "parameters": {}}]', None)
    assert [c.name for c in calls] == ["time"]
    assert forced_calls('{"city": "Ro', "weather") == []


def test_moekits_template_writes_tools_calls_and_results():
    template = ChatTemplate()
    tools = [{"type": "function", "function": TOOLS[0]}]
    messages = [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "weather", "arguments": '{"city": "Rome"}'}, "id": "c1"}
            ],
        },
        {"role": "tool", "content": "21 °C", "tool_call_id": "c1"},
    ]
    text = template.format(messages, tools=tools)
    assert text.startswith("<|system|>\n") and json.dumps(tools[0], ensure_ascii=False) in text
    assert "<|tool|>\n21 °C\n" in text and text.endswith("<|assistant|>\n")
    # The call it wrote is one the hermes parser reads back.
    turn = text.split("<|assistant|>\n")[1].split("<|tool|>")[0]
    _, calls = tool_parser("hermes").parse(turn)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("weather", {"city": "Rome"})]
    # A system message of the conversation keeps its text, the tools after it.
    with_system = template.format(
        [{"role": "system", "content": "Be brief."}, *messages], tools=tools
    )
    assert with_system.startswith("<|system|>\nBe brief.\n\nYou may call")
    assert "<|tool|>" in template.stop
