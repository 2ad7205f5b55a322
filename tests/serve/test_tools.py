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
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
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
    assert answer.choices[0].finish_reason == "length"
