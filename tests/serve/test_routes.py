"""The endpoints end to end, driven by the official openai client and by raw HTTP: the
answers are the library's answers, batching or not."""

import concurrent.futures

import httpx

from moekit.infer.sampling import SamplingParams

from .conftest import greedy


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_matches_the_library(client, reference):
    out = client.completions.create(
        model="tiny", prompt="def add(a, b):", max_tokens=12, temperature=0
    )
    params = SamplingParams(temperature=0, max_new_tokens=12)
    expected = reference.generate("def add(a, b):", params)[0]
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    # Usage counts every token the model chose: the library's ids, plus the end-of-text token
    # when that is what stopped it (the library does not return that one).
    stopped_by_eos = expected.finish_reason == "stop"
    assert out.usage.completion_tokens == len(expected.token_ids) + stopped_by_eos
    assert out.usage.prompt_tokens == len(reference.tokenizer.encode("def add(a, b):"))


def test_chat_and_streaming_chat(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_seeded_sampling_n_and_stop(client, reference):
    a = client.completions.create(
        model="tiny", prompt="The", max_tokens=10, temperature=1.0, seed=5, n=2
    )
    b = client.completions.create(
        model="tiny", prompt="The", max_tokens=10, temperature=1.0, seed=5, n=2
    )
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    free = greedy(reference, "The", 20)
    stop = free[4:7]
    out = client.completions.create(
        model="tiny", prompt="The", max_tokens=20, temperature=0, stop=[stop]
    )
    assert out.choices[0].text == free[: free.find(stop)] and out.choices[0].finish_reason == "stop"


def test_twenty_concurrent_requests_are_all_answered_correctly(server, reference):
    url, engine = server
    prompts = [f"{i} + {i} = " for i in range(20)]
    steps_before = engine.stats.decode_steps

    def ask(prompt):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True}, timeout=120)  # fmt: skip
        return r.status_code, r.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(ask, prompts))
    for prompt, (status, text) in zip(prompts, results, strict=True):
        assert status == 200
        params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
        assert text == reference.generate(prompt, params)[0].text  # batching changes nothing
    # They really were decoded together: far fewer steps than tokens.
    steps = engine.stats.decode_steps - steps_before
    assert steps < 20 * 8 / 2
