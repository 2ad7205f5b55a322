"""The serving engine on its own: every request gets exactly one answer, whatever happens."""

import threading
import time

import pytest

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.serve.engine import (
    DoneEvent,
    Engine,
    EngineRequest,
    EngineStoppedError,
    RequestTooLargeError,
)


class Inbox:
    """Collects one request's events; `done` is set by its DoneEvent."""

    def __init__(self) -> None:
        self.events: list = []
        self.done = threading.Event()

    def emit(self, event) -> None:
        self.events.append(event)
        if isinstance(event, DoneEvent):
            self.done.set()

    @property
    def finish(self) -> DoneEvent:
        assert self.done.wait(timeout=60), "the request never finished"
        [done] = [e for e in self.events if isinstance(e, DoneEvent)]
        return done


def request(generator, inbox, **params):
    ids = generator.tokenizer.encode("def f(x):")
    return EngineRequest(ids, SamplingParams(**params), inbox.emit)


def test_a_request_that_cannot_start_fails_alone(tiny_model_dir, caplog):
    caplog.set_level("ERROR", logger="moekit.serve")
    generator = Generator.from_dir(tiny_model_dir)
    engine = Engine(generator, max_batch=2)
    engine.start()
    try:
        bad, good = Inbox(), Inbox()
        broken = request(generator, bad, max_new_tokens=4)
        broken.params.seed = 2**70  # past validation: no torch generator takes it
        engine.submit(broken)
        assert bad.finish.finish_reason == "error"
        assert "could not start generation" in (bad.finish.error or "")
        [record] = [r for r in caplog.records if r.name == "moekit.serve"]
        assert "could not start" in record.getMessage() and record.exc_info  # with traceback
        engine.submit(request(generator, good, max_new_tokens=4, ignore_eos=True))
        assert good.finish.finish_reason == "length"  # the engine kept serving
    finally:
        engine.stop()


def test_seeds_outside_64_bits_are_refused_up_front():
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**63)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=-1)


def test_stopping_answers_waiting_and_running_requests(long_model_dir):
    generator = Generator.from_dir(long_model_dir)
    engine = Engine(generator, max_batch=1, max_queue=4)
    engine.start()
    inboxes = [Inbox() for _ in range(3)]
    engine.submit(
        *(request(generator, box, max_new_tokens=3000, ignore_eos=True) for box in inboxes)
    )
    deadline = time.monotonic() + 30
    while not inboxes[0].events:  # the first is generating, the others wait
        assert time.monotonic() < deadline and not inboxes[0].done.is_set()
        time.sleep(0.01)
    engine.stop()
    for box in inboxes:
        assert box.finish.finish_reason == "abort"
    with pytest.raises(EngineStoppedError):
        engine.submit(request(generator, Inbox(), max_new_tokens=4))


def test_more_generations_than_the_queue_holds_are_refused(tiny_model_dir):
    generator = Generator.from_dir(tiny_model_dir)
    engine = Engine(generator, max_batch=1, max_queue=2)
    with pytest.raises(RequestTooLargeError, match="at most 2"):
        engine.submit(*(request(generator, Inbox(), max_new_tokens=2) for _ in range(3)))


def test_max_context_must_fit_the_model(tiny_model_dir):
    generator = Generator.from_dir(tiny_model_dir)
    with pytest.raises(ValueError, match="max_context=129"):
        Engine(generator, max_context=129)
    assert Engine(generator).max_context == 128  # the model's own, under the 4096 cap
