"""Speculative decoding in the serving engine: prompt-lookup drafts (or a draft model's, see
draft.py), checked in the batch's own decode pass.

With `speculative_tokens` k > 0 (`moekit serve --speculative ngram --num-draft-tokens K`), at
each decode step a slot that may speculate proposes up to k tokens: those that followed the
latest earlier occurrence of its last tokens (moekit.infer.speculative.ngram_draft). The pass
feeds each row its chosen token and then its drafts (rows padded on the right, the padding
masked out), so every draft of every slot is checked in the one forward pass.

Checking samples the token after each fed position exactly as plain decoding samples it
(`Engine._choose`, with the slot's own random generator, stop strings, logprobs and limits), and
keeps a draft while the sampled token equals it. For a draft that is a single token for sure
(prompt lookup's), this is the speculative-sampling rule (keep draft d with probability p(d),
else draw from p without d): the output distribution is plain decoding's, and since each
emitted token takes one draw, a seeded request gives the tokens plain decoding gives (up to
float rounding of the logits); under greedy decoding they are identical. The first sampled
token that differs from its draft is emitted and fed at the next step; the slot's cache forgets
the positions after the last kept draft.

A slot that needs what the pass feeding a token computes for that token alone (an output
constraint's mask, the routing trace of `moekit.routing`, forced or recorded routing) decodes
one token at a time; a step in which a slot forces or records its routing drafts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.infer.speculative import MAX_DRAFT_TOKENS, ngram_draft

NGRAM = 3  # the longest suffix prompt lookup matches (then shorter ones, down to one token)


def check_speculative_tokens(value: object) -> None:
    """A ValueError unless `value` is a draft count the engine takes (0: no speculation)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"speculative_tokens must be an int, got {type(value).__name__}")
    if not 0 <= value <= MAX_DRAFT_TOKENS:
        raise ValueError(
            f"speculative_tokens={value} is invalid: must be in [0, {MAX_DRAFT_TOKENS}] (0: off)"
        )


@dataclass
class Drafts:
    """One step's drafts: slot -> its drafted tokens, and each fed row's cache length before
    the pass."""

    by_slot: dict[int, list[int]]
    start: dict[int, int]

    @property
    def width(self) -> int:
        """Positions per row in the pass: the chosen token and the longest draft."""
        return 1 + max((len(d) for d in self.by_slot.values()), default=0)


def _may_speculate(slot: Any) -> bool:
    req = slot.req
    return (
        slot.finish is None
        and slot.matcher is None
        and not req.params.return_routing
        and req.routed_experts is None
        and not req.return_routed_experts
    )


def propose(engine: Any, fed: Tensor) -> Drafts | None:
    """The drafts of this step's fed slots, or None when none drafts (speculation off, no
    slot may, or one forces or records its routing, which is read per token)."""
    k = engine.speculative_tokens
    if not k:
        return None
    rows = [i for i, on in enumerate(fed[:, 0].tolist()) if on]
    slots = {i: s for i in rows if (s := engine._slots[i]) is not None}
    if any(s.req.routed_experts is not None or s.req.return_routed_experts for s in slots.values()):
        return None
    drafts = Drafts({}, {i: engine._cache.length(i) for i in rows})
    # The pass writes its width after the longest row of the batch, drafting or not.
    longest = max(engine._cache.length(i) for i in range(fed.shape[0]))
    rooms = {}
    for i, s in slots.items():
        if not _may_speculate(s):
            continue
        room = min(
            k,
            s.req.params.max_new_tokens - s.produced,  # the chosen token counted
            engine.max_context - longest - 1,
        )
        if room > 0:
            rooms[i] = room
    if engine.drafter is not None:  # a draft model (draft.py)
        drafts.by_slot.update(engine.drafter.propose(slots, rooms))
    else:
        for i, room in rooms.items():
            if draft := ngram_draft(slots[i].seen.tolist(), room, NGRAM):
                drafts.by_slot[i] = draft
    return drafts if drafts.by_slot else None


def widen(step: Tensor, fed: Tensor, drafts: Drafts) -> tuple[Tensor, Tensor]:
    """The pass's tokens and mask with each slot's drafts after its chosen token."""
    B, width = step.shape[0], drafts.width
    tokens = torch.full((B, width), int(step[0, 0]), dtype=step.dtype, device=step.device)
    tokens[:, :1] = step
    valid = torch.zeros(B, width, dtype=torch.bool, device=fed.device)
    valid[:, :1] = fed
    for i, draft in drafts.by_slot.items():
        tokens[i, 1 : 1 + len(draft)] = torch.tensor(draft, dtype=step.dtype)
        valid[i, 1 : 1 + len(draft)] = True
    return tokens, valid


def verify(engine: Any, logits: Tensor, drafts: Drafts) -> None:
    """Check each slot's drafts against the pass's `logits` (B, S, V): emit the tokens sampled
    after its fed positions while they equal the drafts, keep the first that differs for the
    next step, and cut every fed row's cache back to the positions kept."""
    for i, start in drafts.start.items():
        s = engine._slots[i]
        if s is None:
            continue
        draft = drafts.by_slot.get(i, [])
        kept = _kept(engine, i, s, logits[i], draft)
        engine.stats.drafted_tokens += len(draft)
        engine.stats.accepted_tokens += kept
        if engine._slots[i] is s:  # still running
            engine._cache.truncate_row(i, start + 1 + kept)


def _kept(engine: Any, i: int, s: Any, logits_SV: Tensor, draft: list[int]) -> int:
    """How many of slot i's drafts the tokens sampled after its fed positions confirm; the
    first sampled token that differs waits in `s.feed`, and the slot's next logits are those
    after the last draft when all are kept."""
    for j, token in enumerate(draft):
        s.logits = logits_SV[j].float()
        seen = len(s.seen)
        chosen = engine._choose(i, s)
        if chosen is None:  # the slot ended (a stop, its length): kept if it ended on the draft
            return j + int(len(s.seen) > seen and int(s.seen[-1]) == token)
        if chosen != token:
            s.feed = chosen  # emitted now, fed at the next step
            return j
    if draft:
        s.logits = logits_SV[len(draft)].float()
    return len(draft)
