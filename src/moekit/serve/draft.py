"""Speculative decoding in the serving engine with a small draft model (`moekit serve MODEL
--speculative draft --draft DRAFT_DIR`): the draft model proposes, the batch's decode pass
checks (speculate.py).

The draft model decodes greedily: its argmax after the request's repetition penalty. A greedy
draft is a single token for sure given the text so far, so speculate.verify's check (sample
the target's token as plain decoding would, keep the draft while they are equal) is the
speculative-sampling rule for it, and answers are plain decoding's: the same tokens under
greedy decoding, and for a seeded request.

The drafter keeps its own batched KV cache, a row per engine slot, and remembers the tokens
each row holds. At each step it brings every drafting row up to its slot's text, keeping the
longest common start of what the row holds (what the target kept of the last drafts, or an
earlier request's prompt that starts the same way) and feeding the rest: the few tokens since
the last step in one pass for all rows (padded on the right, the padding masked out), a longer
catch-up (a new request's prompt) alone in a one-row cache. Then k - 1 one-token passes draft
the rest, for the rows that still have room.

Rows draft only while their text, drafts included, leaves `margin` (k + 1) positions of the
draft cache free: every pass then fits, whatever the other rows hold. The draft cache holds
the server's max_context, or the draft model's own context when that is shorter: past it, a
request decodes a token per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from moekit.infer.sampling import apply_repetition_penalty
from moekit.infer.speculative import load_draft_model
from moekit.model import Transformer
from moekit.nn.kv_cache import KVCache
from moekit.serve.config import SettingError

if TYPE_CHECKING:
    from moekit.serve.engine import Engine


class Drafter:
    """Greedy drafts of a draft `model` for up to `rows` slots of `max_context` tokens, `k` at
    most per slot and step; on the model's device and in its dtype."""

    def __init__(self, model: Transformer, *, rows: int, max_context: int, k: int) -> None:
        self.model = model.eval()
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        size = min(max_context, model.cfg.max_seq_len)
        self.margin = k + 1  # the widest batched pass
        self.limit = size - self.margin  # the tokens a drafting row may hold
        self.cache = KVCache(model.cfg, rows, size, device=device, dtype=dtype)
        self.alone = KVCache(model.cfg, 1, size, device=device, dtype=dtype)
        self.fed: list[list[int]] = [[] for _ in range(rows)]  # the tokens in each row

    @torch.no_grad()
    def propose(self, slots: dict[int, Any], rooms: dict[int, int]) -> dict[int, list[int]]:
        """Up to rooms[i] drafts after each slot's text (`slots[i].seen`), by row."""
        texts = {i: slots[i].seen.tolist() for i in rooms}
        rooms = {i: min(r, self.limit - len(texts[i]) + 1) for i, r in rooms.items()}
        rooms = {i: r for i, r in rooms.items() if r > 0}
        if not rooms:
            return {}
        logits = self._catch_up({i: texts[i] for i in rooms})
        drafts: dict[int, list[int]] = {i: [] for i in rooms}
        while True:
            for i, logits_V in logits.items():
                drafts[i].append(self._greedy(logits_V, slots[i], drafts[i]))
            more = {i: [d[-1]] for i, d in drafts.items() if len(d) < rooms[i]}
            if not more:
                return drafts
            logits = self._pass(more)

    @staticmethod
    def _greedy(logits_V: Tensor, slot: Any, drafts: list[int]) -> int:
        penalty = slot.req.params.repetition_penalty
        if penalty != 1.0:
            seen = torch.cat([slot.seen, slot.seen.new_tensor(drafts)])
            logits_V = apply_repetition_penalty(logits_V, seen.to(logits_V.device), penalty)
        return int(logits_V.argmax())

    def _catch_up(self, texts: dict[int, list[int]]) -> dict[int, Tensor]:
        """Bring each row i to texts[i]; the logits after it, by row."""
        short: dict[int, list[int]] = {}
        logits: dict[int, Tensor] = {}
        for i, text in texts.items():
            kept = _common_start(self.fed[i], text, len(text) - 1)  # feed one token at least
            self.cache.truncate_row(i, kept)
            del self.fed[i][kept:]
            new = text[kept:]
            if len(new) <= self.margin:
                short[i] = new
            else:
                logits[i] = self._alone(i, new)
        if short:
            logits.update(self._pass(short))
        return logits

    def _pass(self, feeds: dict[int, list[int]]) -> dict[int, Tensor]:
        """Feed each row i the tokens feeds[i] in one padded pass (the other rows masked
        out); the logits after each row's last token."""
        B, width = max(feeds) + 1, max(len(t) for t in feeds.values())
        device = self.cache.end.device
        tokens = torch.zeros(B, width, dtype=torch.long, device=device)
        valid = torch.zeros(B, width, dtype=torch.bool, device=device)
        for i, fed in feeds.items():
            tokens[i, : len(fed)] = torch.tensor(fed, dtype=torch.long)
            valid[i, : len(fed)] = True
        start = {i: self.cache.length(i) for i in feeds}
        out = self.model(
            tokens,
            cache=self.cache.first_rows(B),
            valid=valid,
            causal_routing=True,
            routing_stats=False,
        )
        logits = {}
        for i, fed in feeds.items():
            self.cache.truncate_row(i, start[i] + len(fed))  # the padding's positions go
            self.fed[i] += fed
            logits[i] = out.logits[i, len(fed) - 1].float()
        return logits

    def _alone(self, i: int, new: list[int]) -> Tensor:
        """Feed row i a long run of tokens in a pass of its own."""
        self.alone.load_row(0, self.cache, i)
        out = self.model(
            torch.tensor([new], device=self.cache.end.device),
            cache=self.alone,
            causal_routing=True,
            routing_stats=False,
            last_logits=True,
        )
        self.cache.load_row(i, self.alone, 0)
        self.fed[i] += new
        return out.logits[0, -1].float()


def _common_start(a: list[int], b: list[int], most: int) -> int:
    """The length of the longest common start of `a` and `b`, at most `most`."""
    n = min(len(a), len(b), most)
    if a[:n] == b[:n]:
        return n
    return next(j for j in range(n) if a[j] != b[j])


def check_draft_dir(draft_dir: str | Path | None, speculative_tokens: int) -> None:
    """A SettingError for a draft model the server cannot take, before any model loads: one
    without speculation, or one that is no model directory."""
    from moekit.model_dir import ModelDir

    if draft_dir is None:
        return
    if not speculative_tokens:
        raise SettingError("draft_dir", str(draft_dir), "a draft model needs speculative_tokens")
    if not ModelDir(draft_dir).config_path.is_file():
        raise SettingError(
            "draft_dir",
            str(draft_dir),
            "must be a model directory (it has no config.json)",
        )


def load_drafter(draft_dir: str | Path, engine: Engine) -> Drafter:
    """The Drafter of the draft model in `draft_dir` for `engine`'s slots and drafts per step;
    a ValueError naming what does not match the engine's model: the tokenizer (a token's id,
    the special tokens) or the vocabulary size."""
    draft = load_draft_model(draft_dir, engine.generator)
    return Drafter(
        draft.model,
        rows=engine.max_batch,
        max_context=engine.max_context,
        k=engine.speculative_tokens,
    )
