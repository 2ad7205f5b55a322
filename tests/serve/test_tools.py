"""Tool calling through the real server and the official openai client: conversations with
calls and results render as transformers renders them, and bad tool requests are 400s that
name the problem while the server keeps serving."""

import json
import shutil

import pytest

from tests.serve.conftest import running_server

openai = pytest.importorskip("openai")

# A ChatML template that shows tools, writes calls in <tool_call> tags and results in a
# <tool_response> (the shape Qwen's checkpoints carry).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "Tools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' or (message['role'] == 'assistant' "
    "and not message.tool_calls) %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% elif message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if message['content'] %}{{ message['content'] }}\n{% endif %}"
    "{% for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message['content'] }}\n</tool_response><|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Rome", "unit": "C"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
]


@pytest.fixture(scope="module")
def tools_dir(long_model_dir, tmp_path_factory):
    """A model of a context long enough for tool definitions, with TOOLS_TEMPLATE."""
    out = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(long_model_dir, out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def tools_server(tools_dir):
    with running_server(tools_dir) as (url, engine):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), engine


def test_a_conversation_with_calls_renders_as_transformers_renders_it(tools_dir, tools_server):
    """The server's prompt (counted by usage) is transformers' rendering of the same
    conversation, where a call's arguments are an object and a result names its call."""
    transformers = pytest.importorskip("transformers")
    client, _ = tools_server
    reference = transformers.AutoTokenizer.from_pretrained(tools_dir)
    hf_messages = json.loads(json.dumps(CONVERSATION))
    call = hf_messages[2]["tool_calls"][0]["function"]
    call["arguments"] = json.loads(call["arguments"])
    for tools in ([WEATHER], None):
        text = reference.apply_chat_template(
            hf_messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
        assert ("Tools:" in text) == bool(tools) and '"city": "Rome"' in text
        expected = len(reference(text, add_special_tokens=False)["input_ids"])
        extra = {"tools": tools} if tools else {}
        answer = client.chat.completions.create(
            model="tiny", messages=CONVERSATION, max_tokens=3, temperature=0, **extra
        )
        assert answer.usage.prompt_tokens == expected
        message = answer.choices[0].message
        # The tiny model's three tokens are no call: they are its text.
        assert message.tool_calls is None and isinstance(message.content, str)
        assert answer.choices[0].finish_reason == "length"


BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "two tools are named 'weather'"),
    (
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
        "tools",
        "should match pattern",
    ),
    (
        {"messages": [{"role": "user", "content": "Hi"}, CONVERSATION[3]]},
        "messages",
        "answers tool_call_id 'call_1', but no earlier assistant message made a call",
    ),
    (
        {"messages": [{"role": "tool", "content": "21"}]},
        "messages",
        "needs the 'tool_call_id'",
    ),
    (
        {"messages": [{"role": "user", "content": None}]},
        "messages",
        "a user message needs 'content'",
    ),
    (
        {"messages": [{"role": "user", "content": "Hi", "tool_calls": []}]},
        None,
        None,
    ),
]


@pytest.mark.parametrize(("change", "param", "words"), BAD)
def test_bad_tool_requests_are_400s_and_the_server_keeps_serving(
    tools_server, change, param, words
):
    client, _ = tools_server
    request = {"model": "tiny", "messages": CONVERSATION, "tools": [WEATHER], "max_tokens": 2}
    request.update(change)
    request = {k: v for k, v in request.items() if v is not None}
    if words is None:  # an empty tool_calls list is no call: accepted
        client.chat.completions.create(**request)
        return
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**request)
    assert e.value.body["param"] == param
    assert words in e.value.body["message"]
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    # the server kept serving (a sampled answer may end early on the end-of-text token)
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage.completion_tokens <= 2


def _validates(arguments, schema):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(arguments), schema)


def test_a_named_tool_choice_forces_a_valid_call(tools_server):
    client, _ = tools_server
    schema = WEATHER["function"]["parameters"]
    answers = client.chat.completions.create(
        model="tiny",
        messages=CONVERSATION[:2],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "weather"}},
        max_tokens=200,
        temperature=1.0,
        n=3,
        seed=7,
    )
    for choice in answers.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "weather"
        assert call.id.startswith("call_")
        _validates(call.function.arguments, schema)


def test_required_calls_name_the_tools_and_stream_as_deltas(tools_server):
    client, _ = tools_server
    clock = {
        "type": "function",
        "function": {
            "name": "clock",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    }
    request = dict(
        model="tiny",
        messages=CONVERSATION[:2],
        tools=[WEATHER, clock],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=1.0,
        seed=3,
    )
    whole = client.chat.completions.create(**request)
    (call,) = whole.choices[0].message.tool_calls  # parallel_tool_calls false: one call
    assert call.function.name in ("weather", "clock")
    schemas = {
        "weather": WEATHER["function"]["parameters"],
        "clock": clock["function"]["parameters"],
    }
    _validates(call.function.arguments, schemas[call.function.name])
    # Streamed, the same seed gives the same call, as tool_calls deltas that reassemble.
    calls, content, reasons = {}, "", []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or ():
                entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = entry["id"] or delta.id
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert content == "" and reasons[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments)
    ]


def test_auto_reads_the_calls_the_model_writes(tools_server):
    """With tool_choice "auto" the server reads what the model wrote: here a regex (vLLM's
    guided_regex) makes the tiny model write text and then a call in the hermes format."""
    client, _ = tools_server
    pattern = r'Checking\.\n<tool_call>\n\{"name": "weather", "arguments": \{"city": "(Rome|Oslo)"\}\}\n</tool_call>'
    request = dict(
        model="tiny",
        messages=CONVERSATION[:2],
        tools=[WEATHER],
        max_tokens=100,
        extra_body={"guided_regex": pattern},
    )
    answer = client.chat.completions.create(**request)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.content == "Checking."
    (call,) = message.tool_calls
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments)["city"] in ("Rome", "Oslo")
    text, calls = "", []
    for chunk in client.chat.completions.create(**request, stream=True, temperature=0):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
    assert text == "Checking." and [c.function.name for c in calls] == ["weather"]
    # tool_choice "none": the same output is text.
    plain = client.chat.completions.create(**request, tool_choice="none")
    assert plain.choices[0].message.tool_calls is None
    assert "<tool_call>" in plain.choices[0].message.content


def test_a_forced_call_and_a_response_format_together_are_refused(tools_server):
    client, _ = tools_server
    with pytest.raises(openai.BadRequestError, match="already constrains the answer"):
        client.chat.completions.create(
            model="tiny",
            messages=CONVERSATION[:2],
            tools=[WEATHER],
            tool_choice="required",
            response_format={"type": "json_object"},
        )
