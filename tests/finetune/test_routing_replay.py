"""Training that replays the routing a server recorded: rows of token ids with their
`routed_experts`, trained with the server's routing, give the per-token logprobs and the loss
the server reported for the sampled tokens."""

import json

import pytest
import torch

from moekit.data.config import DataConfig
from moekit.data.loader import PackedLoader, prepare_data
from moekit.data.token_rows import TokenRow
from moekit.data.tokenizer import Tokenizer
from moekit.finetune.replay_data import routing_decoder
from moekit.finetune.sft import prepare_sft
from moekit.infer.chat import ChatTemplate
from moekit.model_dir import ModelDir, load_model
from moekit.training.config import finetune_run_config, resolve_run_config
from moekit.training.step import optimizer_step
from moekit.training.trainer import train

from ..serve.conftest import running_server
from .conftest import FAST

PROMPTS = ["The history of the city", "A river runs", "In the beginning", "Numbers and"]


@pytest.fixture(scope="module")
def sampled(tiny_model_dir, tmp_path_factory):
    """Completions sampled by the server with one expert per token (the model's own choice
    would be two), as rows of token ids with their recorded routing, and the server's logprobs
    of the sampled tokens."""
    import httpx

    tokenizer = Tokenizer.load(tiny_model_dir)
    rows, logprobs = [], []
    with running_server(tiny_model_dir) as (url, _):
        for seed, prompt in enumerate(PROMPTS * 3):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "logprobs": 0,
                    "seed": seed, "ignore_eos": True,
                    "moekit": {"top_k": 1, "routing": True, "return_routed_experts": True}}  # fmt: skip
            choice = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
            choice = choice["choices"][0]
            ids = [t["token_id"] for t in choice["moekit"]["routing"]]
            prompt_ids = tokenizer.encode_prompt(prompt)
            rows.append({"token_ids": prompt_ids + ids, "prompt_tokens": len(prompt_ids),
                         "routed_experts": choice["moekit"]["routed_experts"]})  # fmt: skip
            logprobs.append(choice["logprobs"]["token_logprobs"])
    path = tmp_path_factory.mktemp("rl") / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows, logprobs


def load(tiny_model_dir, path):
    tokenizer = Tokenizer.load(tiny_model_dir)
    cfg = ModelDir(tiny_model_dir).config()
    data, _ = prepare_sft(path, tokenizer, 64, template=ChatTemplate(), val_fraction=0.0,
                          model=cfg)  # fmt: skip
    return tokenizer, data


def test_a_step_replaying_the_recorded_routing_has_the_servers_logprobs(tiny_model_dir, sampled):
    path, rows, logprobs = sampled
    tokenizer, data = load(tiny_model_dir, path)
    assert data.train_routing is not None
    loader = PackedLoader(data.train, 1, seed=0, shuffle=False, loss_mask=data.train_mask,
                          routing=data.train_routing)  # fmt: skip
    model = load_model(tiny_model_dir)
    for row, recorded in zip(rows[:3], logprobs[:3], strict=True):
        batch = loader.next_batch()
        inputs, targets, routing = batch
        assert inputs[0, : len(row["token_ids"]) - 1].tolist() == row["token_ids"][:-1]
        # Per token: the training forward pass (as the step runs it) scores the sampled tokens
        # as the server did.
        with torch.no_grad():
            logits = model(inputs, causal_routing=True, **routing.model_args()).logits[0]
        logp = logits.float().log_softmax(-1)
        picked = targets[0] != -100
        got = logp[picked].gather(1, targets[0][picked][:, None])[:, 0]
        assert got.tolist() == pytest.approx(recorded, abs=2e-6)
        with torch.no_grad():
            own = model(inputs, causal_routing=True).logits[0].float().log_softmax(-1)
        own = own[picked].gather(1, targets[0][picked][:, None])[:, 0]
        assert (own - got).abs().max() > 1e-3  # routing itself, the model scores otherwise
        # The step itself: its loss is the mean negative logprob the server reported; without
        # the routing it is not.
        frozen = torch.optim.SGD(model.parameters(), lr=0.0)
        step = optimizer_step(model, frozen, [batch], grad_accum=1, grad_clip=0.0,
                              pad_id=tokenizer.pad_id)  # fmt: skip
        expected = -sum(recorded) / len(recorded)
        assert step["loss"] == pytest.approx(expected, abs=2e-6)
        plain = optimizer_step(model, frozen, [batch[:2]], grad_accum=1, grad_clip=0.0,
                               pad_id=tokenizer.pad_id)  # fmt: skip
        assert abs(plain["loss"] - expected) > 2e-5


def test_finetune_trains_on_rows_with_a_recorded_routing(tmp_path, tiny_model_dir, sampled):
    path, _, _ = sampled
    cfg = finetune_run_config(tiny_model_dir, path, overrides=[*FAST, "finetune.method=full",
                              "train.batch_size=2", "finetune.val_fraction=0"])  # fmt: skip
    train(cfg, tmp_path / "ft", verbose=False)
    before, after = load_model(tiny_model_dir), load_model(tmp_path / "ft")
    assert not torch.equal(after.layers[0].ffn.router.weight, before.layers[0].ffn.router.weight)
    # The run's first loss is that of its first batch with the recorded routing.
    first = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    tokenizer, data = load(tiny_model_dir, path)
    loader = PackedLoader(data.train, 2, seed=cfg.train.seed, loss_mask=data.train_mask,
                          routing=data.train_routing)  # fmt: skip
    batch = loader.next_batch()
    frozen = torch.optim.SGD(before.parameters(), lr=0.0)
    replayed, plain = (
        optimizer_step(before, frozen, [b], grad_accum=1, grad_clip=0.0, pad_id=tokenizer.pad_id)
        for b in (batch, batch[:2])
    )
    assert first["loss"] == pytest.approx(replayed["loss"], abs=1e-6)
    assert abs(first["loss"] - plain["loss"]) > 2e-5


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a", "completion": "b", "routed_experts": {}}, r"needs 'token_ids'"),
        ({"token_ids": [1]}, r"at least 2 token ids"),
        ({"token_ids": [1, 2], "prompt_tokens": 2}, r"'prompt_tokens' must be an int in \[0, 1\]"),
        ({"token_ids": [1, 2], "text": "x"}, r"unknown fields \['text'\]"),
        ({"token_ids": [1, 9999]}, r"token id 9999 is outside the vocabulary"),
        ({"token_ids": [1, 2], "routed_experts": {"shape": [3, 2, 1], "dtype": "uint8",
          "data": "AAAAAAAA"}}, r"routed_experts has 3 rows for 2 tokens"),
        ({"token_ids": [1, 2], "routed_experts": {"shape": [2, 3, 1], "dtype": "uint8",
          "data": "AAAAAAAA"}}, r"this model has 2 MoE layers"),
    ],
)  # fmt: skip
def test_bad_rows_are_named(tmp_path, tiny_model_dir, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"token_ids": [3, 4, 5]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load(tiny_model_dir, path)
    assert "bad.jsonl:2" in str(info.value)


# Pre-training (`moekit train`) on the same rows: packed into rows of seq_len + 1 tokens.


def pretraining_data(tiny_model_dir, path, seq_len=32):
    cfg = ModelDir(tiny_model_dir).config()
    tokenizer = Tokenizer.load(tiny_model_dir)
    _, data = prepare_data(DataConfig(source=str(path), val_fraction=0.0), cfg.vocab_size, seq_len,
                           tokenizer=tokenizer, routing_of=routing_decoder(cfg))  # fmt: skip
    return tokenizer, data


def stream(rows):
    """Packed rows back as the one stream they were cut from."""
    return torch.cat([rows[0], *(r[1:] for r in rows[1:])])


def test_pretraining_packs_token_ids_targets_and_routing_in_step(tmp_path, tiny_model_dir, sampled):
    path, rows, _ = sampled
    mixed = tmp_path / "mixed.jsonl"  # a text document first, then the sampled rows
    mixed.write_text(json.dumps({"text": "Some text to pack first."}) + "\n" + path.read_text())
    tokenizer, data = pretraining_data(tiny_model_dir, mixed)
    cfg = ModelDir(tiny_model_dir).config()
    eos = tokenizer.eos_id
    text_ids = tokenizer.encode_batch(["Some text to pack first."])[0]
    ids, targets = [*text_ids, eos], [True] * (len(text_ids) + 1)
    experts: list = [None] * (len(text_ids) + 1)
    for row in rows:
        n, p = len(row["token_ids"]), row["prompt_tokens"]
        ids += row["token_ids"] + [eos]
        targets += [False] * p + [True] * (n - p) + [False]  # no prompt, no separator
        decoded = routing_decoder(cfg)("row", TokenRow(row["token_ids"], p, row["routed_experts"]))
        experts += list(decoded) + [None] * (n + 1 - len(decoded))
    got = stream(data.train)
    assert got.tolist() == ids[: len(got)]
    assert stream(data.train_mask).tolist() == targets[: len(got)]
    routing = data.train_routing
    assert routing is not None
    replayed, recorded = stream(routing.mask), stream(routing.experts)
    assert replayed.tolist() == [e is not None for e in experts[: len(got)]]
    for i in replayed.nonzero()[:, 0].tolist():
        want = experts[i]
        assert torch.equal(recorded[i, :, : want.shape[1]], want)
        assert bool((recorded[i, :, want.shape[1] :] == -1).all())


def test_pretraining_replays_the_routing_of_a_row_that_starts_a_packed_row(tiny_model_dir, sampled):
    # The first sampled row opens the first packed row: nothing before it in its context, so
    # its tokens score as the server scored them.
    path, rows, logprobs = sampled
    _, data = pretraining_data(tiny_model_dir, path)
    loader = PackedLoader(data.train, 1, seed=0, shuffle=False, loss_mask=data.train_mask,
                          routing=data.train_routing)  # fmt: skip
    inputs, targets, routing = loader.next_batch()
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        logits = model(inputs, causal_routing=True, **routing.model_args()).logits[0]
    n = len(rows[0]["token_ids"]) - 1  # the first row's targets; the next row's follow
    picked = (targets[0] != -100).nonzero()[:, 0]
    picked = picked[picked < n]
    got = logits.float().log_softmax(-1)[picked].gather(1, targets[0][picked][:, None])[:, 0]
    assert got.tolist() == pytest.approx(logprobs[0], abs=2e-6)


def test_moekit_train_continues_a_model_on_rows_with_a_recorded_routing(
    tmp_path, tiny_model_dir, sampled
):
    path, _, _ = sampled
    # No model section: train.init_from's model is the run's.
    cfg = resolve_run_config(overrides=[*FAST, "train.batch_size=2",
                                        f"train.init_from={tiny_model_dir}",
                                        f"data.source={path}", "data.val_fraction=0"])  # fmt: skip
    assert cfg.model == ModelDir(tiny_model_dir).config()
    train(cfg, tmp_path / "run", verbose=False)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    tokenizer, data = pretraining_data(tiny_model_dir, path)
    loader = PackedLoader(data.train, 2, seed=cfg.train.seed, loss_mask=data.train_mask,
                          routing=data.train_routing)  # fmt: skip
    batch = loader.next_batch()
    before = load_model(tiny_model_dir)
    frozen = torch.optim.SGD(before.parameters(), lr=0.0)
    replayed, plain = (
        optimizer_step(before, frozen, [b], grad_accum=1, grad_clip=0.0, pad_id=tokenizer.pad_id)
        for b in (batch, batch[:2])
    )
    assert first["loss"] == pytest.approx(replayed["loss"], abs=1e-6)
    assert abs(first["loss"] - plain["loss"]) > 2e-5
    after = load_model(tmp_path / "run")
    assert not torch.equal(after.layers[0].ffn.router.weight, before.layers[0].ffn.router.weight)


@pytest.mark.parametrize(
    ("line", "tokenizer", "message"),
    [
        ({"text": "x", "routed_experts": {}}, True, r"mixed.jsonl:2: 'routed_experts' needs 'token_ids'"),
        ({"token_ids": [1, 2]}, False, r"mixed.jsonl:2: a line of token ids needs the tokenizer"),
        ({"token_ids": [1, 9999]}, True, r"mixed.jsonl:2: token id 9999 is outside"),
        ({"token_ids": [1, 2], "meta": 1}, True, r"unknown fields \['meta'\]"),
        ({"token_ids": [1, 2], "routed_experts": {"shape": [2, 3, 1], "dtype": "uint8",
          "data": "AAAAAAAA"}}, True, r"mixed.jsonl:2: .*this model has 2 MoE layers"),
    ],
)  # fmt: skip
def test_pretraining_names_bad_lines_of_token_ids(
    tmp_path, tiny_model_dir, line, tokenizer, message
):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"text": "some text " * 40}) + "\n" + json.dumps(line) + "\n")
    cfg = ModelDir(tiny_model_dir).config()
    with pytest.raises(ValueError, match=message):
        prepare_data(DataConfig(source=str(path), val_fraction=0.0), cfg.vocab_size, 8,
                     tokenizer=Tokenizer.load(tiny_model_dir) if tokenizer else None,
                     routing_of=routing_decoder(cfg))  # fmt: skip
