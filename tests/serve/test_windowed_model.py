"""A model with gpt-oss's attention (sinks, a sliding window on some layers) served in one
batch with chunked prefill: every request gets the tokens it gets generated alone."""

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.serve.engine import Engine, EngineRequest

from ..infer.test_gpt_oss_paths import _model
from .test_engine import Inbox


def test_batched_serving_gives_each_request_its_own_greedy_tokens():
    from moekit.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["a b c d e f g h"], 300)
    generator = Generator(_model(), tokenizer)
    prompts = [[5, 9, 17, 33, 2, 41, 7, 8, 120], [12, 60, 3]]
    params = dict(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    alone = [generator.generate([p], SamplingParams(**params))[0].token_ids for p in prompts]
    engine = Engine(generator, max_batch=2, prefill_chunk=3)  # prefill across the window
    engine.start()
    try:
        inboxes = [Inbox(), Inbox()]
        for prompt, inbox in zip(prompts, inboxes, strict=True):
            engine.submit(EngineRequest(prompt, SamplingParams(**params), inbox.emit))
        for inbox, want in zip(inboxes, alone, strict=True):
            assert inbox.finish.finish_reason == "length"
            got = [e.id for e in inbox.events if hasattr(e, "id") and e.id >= 0]
            assert got == want
    finally:
        engine.stop()
