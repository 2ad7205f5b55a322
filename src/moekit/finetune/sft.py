"""Supervised fine-tuning data: prompt/completion pairs or chat messages, loss on completions.

A .jsonl file holds one example per line, either

    {"prompt": "Translate: cat", "completion": " chat"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

Chat messages are laid out with the model's chat template (moekit.infer.chat). Only the
completion, or the assistant turns, are prediction targets; an end-of-text token closes every
example (also a target, so the model learns to stop). Each example is one row, padded with the
pad token (never a target) to the length of the longest example, at most seq_len + 1 tokens; an
example longer than that is cut at the end, and one left without any target token is skipped
and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.config import ModelConfig
from moekit.data.loader import TokenizedData
from moekit.data.token_rows import TokenRow, check_token_ids, token_row
from moekit.data.tokenizer import Tokenizer
from moekit.files import read_jsonl
from moekit.finetune.replay_data import routed_rows
from moekit.infer.chat import ChatTemplate


@dataclass
class Example:
    """An example as (text, is_target) segments, and where it came from (file:line); or a
    row of token ids, with the routing to replay that was recorded on it (replay_data.py)."""

    segments: list[tuple[str, bool]]
    source: str
    tokens: TokenRow | None = None

    def prompt(self) -> str:
        """The text before the first target segment (what generation would start from)."""
        out = []
        for text, target in self.segments:
            if target:
                break
            out.append(text)
        return "".join(out)


def load_examples(path: str | Path, template: ChatTemplate) -> list[Example]:
    """Read a .jsonl file of examples; a malformed line is an error naming file and line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"fine-tuning data {file} does not exist")
    examples = []
    for lineno, where, row in read_jsonl(file):
        source = f"{file.name}:{lineno}"
        if isinstance(row, dict) and "token_ids" in row:
            examples.append(Example([], source, token_row(row, where)))
        elif isinstance(row, dict) and "routed_experts" in row:
            raise ValueError(
                f"{where}: 'routed_experts' needs 'token_ids' (a routing is one row per token, "
                "and text may tokenize otherwise than the tokens it was recorded on)"
            )
        else:
            examples.append(Example(_segments(row, template, where), source))
    if not examples:
        raise ValueError(f"{file} holds no examples")
    return examples


def _segments(row: Any, template: ChatTemplate, where: str) -> list[tuple[str, bool]]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with prompt/completion or messages")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        segments: list[tuple[str, bool]] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in template.turn:
                raise ValueError(f"{where}: message {i} needs a role in {', '.join(template.turn)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: message {i} needs a text 'content'")
            before, _, after = template.turn[m["role"]].partition("{content}")
            target = m["role"] == "assistant"
            segments += [(before, False), (m["content"] + after, target)]
        if not any(t for _, t in segments):
            raise ValueError(f"{where}: the messages have no assistant turn to learn from")
        return segments
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise ValueError(
            f"{where}: expected 'prompt' and a non-empty 'completion' (strings), or 'messages'"
        )
    return [(prompt, False), (completion, True)]


def encode_example(
    example: Example, tokenizer: Tokenizer, seq_len: int
) -> tuple[list[int], list[bool]]:
    """Token ids and target flags of an example, laid out as generation will see it (the
    tokenizer's prompt prefix, e.g. an imported model's beginning-of-sequence token, in front;
    end-of-text appended), cut to seq_len + 1. A row of token ids is taken as it is: its
    targets are the tokens after its prompt."""
    if example.tokens is not None:
        row = example.tokens.ids[: seq_len + 1]
        return row, [i >= example.tokens.prompt_tokens for i in range(len(row))]
    ids: list[int] = tokenizer.prompt_prefix
    mask: list[bool] = [False] * len(ids)
    for text, target in example.segments:
        if text:
            tokens = tokenizer.encode(text)
            ids += tokens
            mask += [target] * len(tokens)
    ids.append(tokenizer.require_eos("marking where an example ends"))
    mask.append(True)
    return ids[: seq_len + 1], mask[: seq_len + 1]


def _split(
    examples: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    def draw(e: Example) -> float:
        digest = hashlib.sha256(f"{seed}:{e.source}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    val = [e for e in examples if draw(e) < val_fraction]
    if val_fraction > 0 and not val and len(examples) >= 2:
        val = [min(examples, key=draw)]
    held = {id(e) for e in val}
    return [e for e in examples if id(e) not in held], val


def prepare_sft(
    path: str | Path,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    template: ChatTemplate,
    val_fraction: float = 0.1,
    seed: int = 0,
    model: ModelConfig | None = None,
) -> tuple[TokenizedData, list[Example]]:
    """Rows, target masks and statistics for fine-tuning, and the validation examples. Rows
    of token ids with a recorded routing (finetune/replay_data.py) give the training rows a
    routing to replay (`train_routing`; checked against `model`); validation routes itself."""
    examples = load_examples(path, template)
    check_token_ids([(e.source, e.tokens) for e in examples], (model or tokenizer).vocab_size)
    train, val = _split(examples, val_fraction, seed)
    encoded: dict[str, list[tuple[list[int], list[bool]]]] = {}
    kept: list[Example] = []  # the training examples, row by row
    skipped = 0
    for name, part in (("train", train), ("val", val)):
        encoded[name] = []
        for example in part:
            ids, mask = encode_example(example, tokenizer, seq_len)
            if not any(mask[1:]):
                skipped += 1
                continue
            encoded[name].append((ids, mask))
            if name == "train":
                kept.append(example)
    # Rows are as wide as the longest example (at most seq_len + 1): short examples do not
    # pay for a long context in padding.
    width = max((len(ids) for pairs in encoded.values() for ids, _ in pairs), default=2)
    splits = {}
    for name, pairs in encoded.items():
        rows = [ids + [tokenizer.pad_id] * (width - len(ids)) for ids, _ in pairs]
        masks = [mask + [False] * (width - len(mask)) for _, mask in pairs]
        shape = (len(rows), width)
        splits[name] = (
            torch.tensor(rows, dtype=torch.long).view(shape),
            torch.tensor(masks, dtype=torch.bool).view(shape),
        )
    if not len(splits["train"][0]):
        raise ValueError(f"{path}: no training example fits train.seq_len={seq_len}")
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.source, e.segments]).encode())
        if e.tokens is not None:
            digest.update(json.dumps(dataclasses.astuple(e.tokens)).encode())
    stats = {
        "source": str(path),
        "fingerprint": digest.hexdigest(),
        "examples": len(examples),
        "train_examples": len(splits["train"][0]),
        "val_examples": len(splits["val"][0]),
        "skipped_too_long": skipped,
        "target_tokens": int(splits["train"][1][:, 1:].sum()),
        "row_tokens": width,
    }
    data = TokenizedData(
        train=splits["train"][0],
        val=splits["val"][0],
        val_by_domain={},
        stats=stats,
        train_mask=splits["train"][1],
        val_mask=splits["val"][1],
        train_routing=routed_rows([(e.source, e.tokens) for e in kept], width, seq_len, model),
    )
    return data, val
