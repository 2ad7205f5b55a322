"""Jinja chat templates and generation_config.json, as Hugging Face checkpoints carry them:
rendered as transformers renders them, used by chat and the server, and the model's own EOS
ids and sampling defaults applied where the user sets nothing."""

import json
import shutil

import pytest

from moekit.infer.defaults import GenerationDefaults
from moekit.infer.generate import Generator
from moekit.infer.jinja_chat import JinjaChatTemplate, load_chat_template
from moekit.infer.sampling import SamplingParams

# A ChatML-style template (the shape Qwen's checkpoints carry), with a refusal and tojson.
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% if message['content'] == '' %}{{ raise_exception('an empty message') }}{% endif %}"
    "{{ bos_token }}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Grüße, what is 2+2?"},
]


@pytest.fixture
def templated_dir(tiny_model_dir, tmp_path):
    """The tiny model with a Jinja chat template in tokenizer_config.json."""
    out = tmp_path / "templated"
    shutil.copytree(tiny_model_dir, out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHATML}))
    return out


def test_renders_as_transformers_does(templated_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(templated_dir)
    template = load_chat_template(templated_dir)
    assert isinstance(template, JinjaChatTemplate)
    for generation in (True, False):
        expected = reference.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=generation
        )
        assert template.format(MESSAGES, add_generation_prompt=generation) == expected
    tools = [{"type": "function", "function": {"name": "add", "description": "adds"}}]
    expected = reference.apply_chat_template(
        MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert template.format(MESSAGES, tools=tools) == expected


def test_refusals_and_broken_templates_are_value_errors(templated_dir):
    template = load_chat_template(templated_dir)
    with pytest.raises(ValueError, match="refused the messages: unknown role robot"):
        template.format([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="does not parse"):
        JinjaChatTemplate("{% for m in messages %}").format(MESSAGES)


def test_moekits_own_template_comes_first(templated_dir):
    from moekit.infer.chat import ChatTemplate

    (templated_dir / "chat_template.json").write_text(ChatTemplate().to_json())
    assert isinstance(load_chat_template(templated_dir), ChatTemplate)


def test_generation_config_is_read_and_checked(tmp_path):
    assert GenerationDefaults.load(tmp_path) == GenerationDefaults()
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [7, 3, 7], "temperature": 0.6, "top_k": 20, "top_p": 0.95})
    )
    defaults = GenerationDefaults.load(tmp_path)
    assert defaults.eos_token_ids == (7, 3)
    assert defaults.sampling() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert GenerationDefaults.load(tmp_path).sampling() == {"temperature": 0.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id='x' must be"):
        GenerationDefaults.load(tmp_path)


def test_generation_stops_at_the_models_own_eos_ids(tiny_model_dir, tmp_path):
    """An id listed in generation_config.json ends generation as end-of-text does."""
    prompt = "The cat sat"
    plain = Generator.from_dir(tiny_model_dir, device="cpu")
    free = plain.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8))[0]
    assert free.finish_reason == "length"
    out = tmp_path / "eos"
    shutil.copytree(tiny_model_dir, out)
    third = free.token_ids[2]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, third]}))
    stopped = Generator.from_dir(out, device="cpu").generate(
        prompt, SamplingParams(temperature=0, max_new_tokens=8)
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(third)]


def test_the_server_renders_the_jinja_template_and_uses_the_defaults(templated_dir):
    """A chat completion's prompt is the rendered template encoded without extra special
    tokens (its usage counts exactly those ids), and a request without a temperature takes
    the model's (greedy here: do_sample false), answering as greedy decoding does."""
    openai = pytest.importorskip("openai")
    from moekit.data.tokenizer import Tokenizer
    from tests.serve.conftest import running_server

    (templated_dir / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    tokenizer = Tokenizer.load(templated_dir)
    template = load_chat_template(templated_dir)
    prompt_ids = tokenizer.encode(template.format(MESSAGES))
    greedy = Generator.from_dir(templated_dir, device="cpu").generate(
        [prompt_ids], SamplingParams(temperature=0, max_new_tokens=6)
    )[0]
    with running_server(templated_dir) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        answers = [
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, seed=s)
            for s in (1, 2)
        ]
        with pytest.raises(openai.BadRequestError, match="refused the messages: an empty"):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": ""}], max_tokens=2
            )
    for answer in answers:
        assert answer.usage.prompt_tokens == len(prompt_ids)
        assert answer.choices[0].message.content == greedy.text
