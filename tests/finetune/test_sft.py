import json

import pytest
import torch
import torch.nn.functional as F

from moekit.data.loader import IGNORE_INDEX, PackedLoader, iter_eval_batches
from moekit.data.tokenizer import Tokenizer
from moekit.finetune.sft import encode_example, load_examples, prepare_sft
from moekit.infer.chat import ChatTemplate
from moekit.training.step import lm_loss


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.load(tiny_model_dir)


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_prompt_completion_targets_are_the_completion_and_end_of_text(tmp_path, tokenizer):
    file = write(tmp_path / "d.jsonl", [{"prompt": "12 + 7 = ", "completion": "19"}])
    (example,) = load_examples(file, ChatTemplate())
    ids, mask = encode_example(example, tokenizer, 64)
    prompt = tokenizer.encode("12 + 7 = ")
    completion = tokenizer.encode("19")
    assert ids == prompt + completion + [tokenizer.eos_id]
    assert mask == [False] * len(prompt) + [True] * (len(completion) + 1)


def test_chat_targets_are_the_assistant_turns_only(tmp_path, tokenizer):
    template = ChatTemplate()
    row = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Bye."}]}  # fmt: skip
    (example,) = load_examples(write(tmp_path / "c.jsonl", [row]), template)
    ids, mask = encode_example(example, tokenizer, 256)
    target_text = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m][:-1])
    assert target_text == "Hello.\nBye.\n"
    assert tokenizer.decode(ids[:-1]) == template.format(
        row["messages"], add_generation_prompt=False
    )
    assert example.prompt() == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "malformed JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"prompt": "a"}', "non-empty 'completion'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "needs a role"),
    ],
)
def test_malformed_lines_are_named_with_file_and_line(tmp_path, line, message):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_examples(file, ChatTemplate())
    assert "bad.jsonl:2" in str(err.value)


def test_loss_is_on_completion_tokens_only(tmp_path, tokenizer):
    rows = [{"prompt": f"{a} + {a} = ", "completion": str(2 * a)} for a in range(40)]
    data, val = prepare_sft(write(tmp_path / "d.jsonl", rows), tokenizer, 16,
                            template=ChatTemplate(), val_fraction=0.2, seed=0)  # fmt: skip
    assert data.stats["train_examples"] + data.stats["val_examples"] == 40
    assert data.stats["val_examples"] == len(val) >= 1
    loader = PackedLoader(data.train, 4, seed=0, loss_mask=data.train_mask)
    inputs, targets = loader.next_batch()
    kept = targets != IGNORE_INDEX
    # Every row: the targets are the completion tokens and end-of-text; prompt and padding are
    # ignored.
    for row_inputs, row_targets, row_kept in zip(inputs, targets, kept, strict=True):
        full = torch.cat([row_inputs[:1], row_targets.masked_fill(~row_kept, -1)])
        text = tokenizer.decode(
            [t for t in row_targets[row_kept].tolist() if t != tokenizer.eos_id]
        )
        prompt = tokenizer.decode(row_inputs[: int(row_kept.nonzero()[0])].tolist())
        a = int(prompt.split(" + ")[0])
        assert text == str(2 * a), (prompt, text)
        assert row_targets[row_kept][-1] == tokenizer.eos_id
        assert (full[1:][~row_kept] == -1).all()
    # The loss is the mean over completion tokens: changing the logits at prompt positions
    # changes nothing.
    logits = torch.randn(*targets.shape, 512)
    loss = lm_loss(logits, targets)
    manual = F.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(loss, manual)
    logits[~kept] += 10 * torch.randn_like(logits[~kept])
    torch.testing.assert_close(lm_loss(logits, targets), manual)
    # Evaluation batches use the same masks.
    _, val_targets = next(iter_eval_batches(data.val, 8, data.val_mask))
    assert (val_targets == IGNORE_INDEX).any() and (val_targets != IGNORE_INDEX).any()


def test_examples_cut_without_a_target_are_skipped_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": "word " * 50, "completion": "x"}] + [
        {"prompt": "a", "completion": "b"} for _ in range(5)
    ]
    data, _ = prepare_sft(write(tmp_path / "d.jsonl", rows), tokenizer, 16,
                          template=ChatTemplate(), val_fraction=0.0)  # fmt: skip
    assert data.stats["skipped_too_long"] == 1 and data.stats["train_examples"] == 5
    with pytest.raises(ValueError, match="no training example fits"):
        prepare_sft(write(tmp_path / "long.jsonl", rows[:1]), tokenizer, 16,
                    template=ChatTemplate(), val_fraction=0.0)  # fmt: skip


def test_examples_start_with_the_prompt_prefix_generation_uses(tmp_path):
    """An imported tokenizer whose post-processor puts a beginning-of-sequence token first:
    fine-tuning rows start with it (not a target), as prompts at generation do."""
    from ..parity.test_hf_tokenizer import deepseek_tokenizer

    deepseek_tokenizer(tmp_path)
    tokenizer = Tokenizer.load(tmp_path)
    assert tokenizer.prompt_prefix == [tokenizer.bos_id]
    file = write(tmp_path / "d.jsonl", [{"prompt": "the quick ", "completion": "fox"}])
    (example,) = load_examples(file, ChatTemplate())
    ids, mask = encode_example(example, tokenizer, 64)
    prompt = tokenizer.encode_prompt("the quick ")
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])


def _moe(**moe):
    from moekit import build_model
    from moekit.config import ModelConfig

    cfg = ModelConfig.from_dict(dict(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                                     num_kv_heads=2, ffn_hidden=48, max_seq_len=64,
                                     moe=dict(num_experts=4, top_k=2, expert_hidden=16, **moe)))  # fmt: skip
    return build_model(cfg, seed=0)


def test_padding_takes_no_part_in_routing():
    """Right padding with a token mask: the same routing counts, router losses and entropy as
    the rows without their padding."""
    model = _moe(z_loss_weight=0.001)
    rows = torch.randint(1, 64, (2, 8))
    padded = torch.cat([rows, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    plain = model(rows)
    masked = model(padded, token_mask=padded != 0)
    unmasked = model(padded)
    for layer, stats in plain.moe_stats.items():
        other = masked.moe_stats[layer]
        assert torch.equal(stats.tokens_per_expert, other.tokens_per_expert)
        for name in ("aux_loss", "z_loss", "entropy"):
            torch.testing.assert_close(getattr(other, name), getattr(stats, name))
        assert unmasked.moe_stats[layer].tokens_per_expert.sum() > stats.tokens_per_expert.sum()
    torch.testing.assert_close(masked.aux_loss, plain.aux_loss)
    torch.testing.assert_close(masked.logits[:, :8], plain.logits, rtol=1e-5, atol=1e-5)


def test_accumulated_masked_batches_equal_one_large_batch():
    """Micro-batches with very different numbers of targets: accumulating them gives the
    gradient of one batch holding them all (each target weighs the same)."""
    import copy

    from moekit.training.step import optimizer_step

    torch.manual_seed(0)
    inputs = torch.randint(1, 64, (8, 12))
    targets = torch.randint(1, 64, (8, 12))
    targets[:4, 2:] = IGNORE_INDEX  # rows 0-3: 2 targets each; rows 4-7: 12 each
    inputs[:4, 6:] = 0  # and padding
    results = []
    for split in (1, 2):
        model = _moe(aux_loss_weight=0.0, z_loss_weight=0.0)  # the LM loss alone
        before = copy.deepcopy(model.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        size = 8 // split
        batches = [(inputs[i * size : (i + 1) * size], targets[i * size : (i + 1) * size])
                   for i in range(split)]  # fmt: skip
        record = optimizer_step(model, opt, batches, grad_accum=split, grad_clip=0.0, pad_id=0)
        step = {k: before[k] - v for k, v in model.state_dict().items() if v.is_floating_point()}
        results.append((record, step))
    (one, step_one), (two, step_two) = results
    assert one["tokens"] == two["tokens"] == 8 * 12 - 4 * 6
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    for key, delta in step_one.items():
        torch.testing.assert_close(step_two[key], delta, rtol=1e-4, atol=1e-6, msg=key)
