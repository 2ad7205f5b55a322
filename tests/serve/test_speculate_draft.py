"""Speculative decoding in the serving engine with a draft model (`--speculative draft --draft
DIR`): every request gets the tokens, logprobs and finish reasons plain decoding gives, greedy
or seeded, batched, in slots that earlier requests used; the target as its own draft model has
every greedy draft kept; draft models that cannot work are refused at startup."""

import shutil

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.data.tokenizer import Tokenizer
from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams, apply_repetition_penalty
from moekit.model_dir import load_model, save_model
from moekit.serve.draft import Drafter, load_drafter
from moekit.serve.engine import Engine, EngineRequest, TokenEvent
from tests.serve.test_engine import Inbox
from tests.serve.test_speculate import PROMPTS, SETTINGS

MORE_PROMPTS = [*PROMPTS, "Mixture", "In the beginning the experts were chosen one token at a time"]


def _with_tokenizer(src, out):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="module")
def near_draft_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with noise on its weights: a draft model whose greedy drafts the target
    keeps often but not always."""
    model = load_model(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std().nan_to_num())
    out = tmp_path_factory.mktemp("near-draft")
    save_model(model, ModelConfig.load(tiny_model_dir), out)
    return _with_tokenizer(tiny_model_dir, out)


def small_draft(tiny_model_dir, out, *, vocab=512, max_seq_len=128):
    """A random one-layer model with the tiny model's tokenizer."""
    cfg = ModelConfig.from_dict(
        dict(vocab_size=vocab, dim=32, num_layers=1, num_heads=2, num_kv_heads=2, ffn_hidden=64,
             max_seq_len=max_seq_len, moe=dict(num_experts=4, top_k=1, expert_hidden=32))
    )  # fmt: skip
    save_model(build_model(cfg, seed=3), cfg, out)
    return _with_tokenizer(tiny_model_dir, out)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir, device="cpu")


def run(engine, generator, prompts, settings):
    """Every (prompt, setting) request submitted at once (or each prompt with its own setting,
    when `prompts` is a dict); their (finish, text, tokens)."""
    pairs = prompts.items() if isinstance(prompts, dict) else [(p, s) for p in prompts for s in settings]  # fmt: skip
    inboxes, reqs = [], []
    for prompt, params in pairs:
        inbox = Inbox()
        ids = generator.tokenizer.encode_prompt(prompt)
        reqs.append(EngineRequest(ids, SamplingParams(**params), inbox.emit, logprobs=2))
        inboxes.append(inbox)
    engine.submit(*reqs)
    out = []
    for inbox in inboxes:
        done = inbox.finish
        out.append((done.finish_reason, done.text, [e for e in inbox.events if isinstance(e, TokenEvent)]))  # fmt: skip
    return out


def serve_all(generator, draft_dir, prompts, settings, **options):
    """The answers of an engine without speculation and of one drafting with `draft_dir`;
    and the latter's stats."""
    results, stats = [], None
    for draft in (None, draft_dir):
        engine = Engine(generator, speculative_tokens=4 if draft else 0, **options)
        if draft is not None:
            engine.drafter = load_drafter(draft, engine)
        engine.start()
        try:
            results.append(run(engine, generator, prompts, settings))
        finally:
            engine.stop()
        stats = engine.stats
    return results[0], results[1], stats


def assert_same(plain, drafted):
    for (reason0, text0, tokens0), (reason1, text1, tokens1) in zip(plain, drafted, strict=True):
        assert (reason1, text1) == (reason0, text0)
        assert [t.id for t in tokens1] == [t.id for t in tokens0]
        for a, b in zip(tokens0, tokens1, strict=True):
            if a.logprob is not None:
                assert b.logprob.logprob == pytest.approx(a.logprob.logprob, abs=1e-4)
            assert (a.routing is None) == (b.routing is None)


def test_draft_model_speculation_changes_no_token(generator, near_draft_dir):
    """Greedy, seeded, penalised, per-request top-k and routing-traced requests, 25 of them
    through 3 slots (each slot's draft row serves several requests in turn)."""
    plain, drafted, stats = serve_all(
        generator, near_draft_dir, MORE_PROMPTS, SETTINGS, max_batch=3, max_queue=64
    )
    assert_same(plain, drafted)
    assert 0 < stats.accepted_tokens < stats.drafted_tokens, "both kept and refused drafts"
    assert stats.decode_steps < stats.generated_tokens


def test_the_target_as_its_own_draft_keeps_every_greedy_draft(generator, tiny_model_dir):
    """Its draft cache holds exactly each request's text: 10 requests through 2 slots, each
    row taken over by requests with another prompt or the same one."""
    greedy = [
        dict(temperature=0.0, max_new_tokens=30, ignore_eos=True),
        dict(temperature=0.0, max_new_tokens=21, ignore_eos=True, repetition_penalty=1.3),
    ]
    plain, drafted, stats = serve_all(generator, tiny_model_dir, MORE_PROMPTS, greedy, max_batch=2)
    assert_same(plain, drafted)
    assert stats.drafted_tokens > 0
    assert stats.accepted_tokens == stats.drafted_tokens
    # 51 tokens per prompt in passes of up to 5 tokens: 12 passes or so, not 51.
    assert stats.decode_steps <= 14 * len(MORE_PROMPTS)


class CheckedDrafter(Drafter):
    """A Drafter that compares every draft with the draft model's own greedy choice after the
    whole text, run without a cache; `wrong` collects the drafts that differ."""

    def __init__(self, drafter):
        self.__dict__.update(drafter.__dict__)
        self.wrong, self.checked = [], 0

    def propose(self, slots, rooms):
        out = super().propose(slots, rooms)
        for i, drafts in out.items():
            text = slots[i].seen.tolist()
            penalty = slots[i].req.params.repetition_penalty
            for j, token in enumerate(drafts):
                ids = torch.tensor(text + drafts[:j])
                with torch.no_grad():
                    logits = self.model(ids[None], causal_routing=True).logits[0, -1]
                logits = apply_repetition_penalty(logits, ids, penalty)
                self.checked += 1
                if float(logits.max() - logits[token]) > 1e-4:
                    self.wrong.append((i, text, drafts))
        return out


def test_drafts_are_the_draft_models_greedy_choices(generator, near_draft_dir):
    """Whatever each step kept of the last drafts, and whichever request a row served before,
    every draft is what the draft model chooses after the request's text."""
    engine = Engine(generator, max_batch=3, speculative_tokens=3)
    engine.drafter = drafter = CheckedDrafter(load_drafter(near_draft_dir, engine))
    settings = [
        dict(temperature=0.0, max_new_tokens=24, ignore_eos=True),
        dict(temperature=0.9, seed=3, max_new_tokens=16, ignore_eos=True, repetition_penalty=1.2),
    ]
    engine.start()
    try:
        run(engine, generator, MORE_PROMPTS, settings)
    finally:
        engine.stop()
    assert drafter.checked > 100
    assert 0 < engine.stats.accepted_tokens < engine.stats.drafted_tokens
    assert drafter.wrong == []


def test_a_draft_model_with_a_shorter_context_drafts_within_it(generator, tiny_model_dir, tmp_path):
    """A draft model of 24 positions beside a target of 128: requests that grow past them
    decode a token per step from there, with the same answers."""
    short = small_draft(tiny_model_dir, tmp_path, max_seq_len=24)
    greedy = [dict(temperature=0.0, max_new_tokens=40, ignore_eos=True)]
    plain, drafted, stats = serve_all(generator, short, PROMPTS, greedy, max_batch=2)
    assert_same(plain, drafted)
    assert stats.drafted_tokens > 0


def test_drafts_stay_within_the_context_beside_a_full_request(generator, tiny_model_dir):
    """A request that fills max_context a token per step (its routing traced) decodes beside
    one that drafts: the batch's pass never runs past the cache, and both answer as without
    speculation."""
    long = "The cat sat on the mat. " * 8
    context = len(generator.tokenizer.encode_prompt(long)) + 12
    requests = {
        long: dict(temperature=0.0, max_new_tokens=12, ignore_eos=True, return_routing=True),
        "a b a b": dict(temperature=0.0, max_new_tokens=context - 8, ignore_eos=True),
    }
    plain, drafted, stats = serve_all(
        generator, tiny_model_dir, requests, None, max_batch=2, max_context=context
    )
    assert_same(plain, drafted)
    assert [reason for reason, _, _ in drafted] == ["length", "length"]
    assert stats.accepted_tokens > 0


# ---- the server -------------------------------------------------------------------------------


def test_the_server_drafts_with_a_model_and_answers_as_without(tiny_model_dir, near_draft_dir):
    """Through the real server and the openai client: greedy and seeded answers with
    --speculative draft equal those without, and /metrics counts the kept drafts."""
    openai = pytest.importorskip("openai")
    import httpx

    from tests.serve.conftest import running_server

    answers = {}
    for draft in (None, near_draft_dir):
        k = 4 if draft else 0
        with running_server(tiny_model_dir, speculative_tokens=k, draft_dir=draft) as (url, _):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            chat = client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": PROMPTS[1]}],
                max_tokens=40,
                temperature=0,
            )
            text = client.completions.create(
                model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0.8, seed=5, n=2
            )
            answers[draft] = (chat.choices[0].message.content, [c.text for c in text.choices])
            metrics = httpx.get(f"{url}/metrics").text
        counts = {
            line.split()[0]: int(float(line.split()[1]))
            for line in metrics.splitlines()
            if line.startswith("moekit_speculative_")
        }
        accepted = counts["moekit_speculative_accepted_tokens_total"]
        drafted = counts["moekit_speculative_drafted_tokens_total"]
        assert (0 < accepted <= drafted) == bool(draft)
    assert answers[near_draft_dir] == answers[None]


def test_draft_models_that_cannot_work_are_refused_at_startup(tiny_model_dir, tmp_path):
    from moekit.serve import build

    other = _mkdir(tmp_path / "other-tokenizer")
    cfg = ModelConfig.load(tiny_model_dir)
    save_model(build_model(cfg, seed=1), cfg, other)
    Tokenizer.train(["completely different text, another vocabulary"] * 3, 300).save(other)
    with pytest.raises(ValueError, match="has another tokenizer than the target: "):
        build(tiny_model_dir, speculative_tokens=3, draft_dir=other)

    wider = small_draft(tiny_model_dir, _mkdir(tmp_path / "vocab"), vocab=640)
    with pytest.raises(ValueError, match="has vocab_size 640, the target 512"):
        build(tiny_model_dir, speculative_tokens=3, draft_dir=wider)


def _mkdir(path):
    path.mkdir()
    return path


def test_serve_flags_for_a_draft_model_name_the_problem(tiny_model_dir, tmp_path, capsys):
    from moekit.cli.commands import main

    model = str(tiny_model_dir)
    assert main(["serve", model, "--port", "0", "--speculative", "draft", "--draft", str(tmp_path)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "must be a model directory (it has no config.json) (--draft)" in err
    assert main(["serve", model, "--port", "0", "--speculative", "draft"]) == 2
    assert "--speculative draft needs --draft MODEL_DIR" in capsys.readouterr().err
    assert main(["serve", model, "--port", "0", "--draft", model]) == 2
    assert "--draft MODEL_DIR needs --speculative draft" in capsys.readouterr().err
    assert main(["serve", model, "--port", "0", "--speculative", "ngram", "--draft", model]) == 2
    assert "--draft is for --speculative draft" in capsys.readouterr().err

    from moekit.serve import build
    from moekit.serve.config import SettingError

    with pytest.raises(SettingError, match="a draft model needs speculative_tokens"):
        build(tiny_model_dir, draft_dir=tiny_model_dir)
