"""Lines of token ids: data that is already tokenized, such as a sampler's outputs, with the
routing each token was sampled with (moekit.infer.routing_replay's JSON form) to replay when
training on it. Pre-training (`moekit train`) and fine-tuning (`moekit finetune`) read them.

A .jsonl line of this kind:

    {"token_ids": [...prompt and completion ids...], "prompt_tokens": 11,
     "routed_experts": {"shape": [T, L, K], "dtype": "uint8", "data": "..."}}

`prompt_tokens` (default 0) tokens come before the targets; `routed_experts` (optional) covers
the first T tokens (T at most the row's length; a routing recorded by `moekit serve` has one
row fewer than prompt + completion, the last token being read by nothing), and tokens past it
route themselves. The routing stays in its JSON form here: decoding it needs the model
(moekit.finetune.replay_data).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FIELDS = ("token_ids", "prompt_tokens", "routed_experts")


@dataclass(frozen=True)
class TokenRow:
    """A line of token ids: the ids, the count of prompt tokens before the targets, the
    recorded routing (JSON form; None: the row routes itself)."""

    ids: list[int]
    prompt_tokens: int = 0
    routed_experts: Any = None

    def key(self) -> str:
        """The row as one string (what a data fingerprint hashes)."""
        return json.dumps([self.ids, self.prompt_tokens, self.routed_experts], sort_keys=True)


def token_row(row: dict[str, Any], where: str, *, also: Iterable[str | None] = ()) -> TokenRow:
    """A line of token ids (see the module docstring); ValueError naming `where` for a
    malformed one. Fields in `also` may stand beside the three (e.g. a domain field)."""
    ids, prompt = row["token_ids"], row.get("prompt_tokens", 0)
    if (
        not isinstance(ids, list)
        or len(ids) < 2
        or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids)
    ):
        raise ValueError(f"{where}: 'token_ids' must be a list of at least 2 token ids")
    if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt < len(ids):
        raise ValueError(
            f"{where}: 'prompt_tokens' must be an int in [0, {len(ids) - 1}] (the tokens "
            "before the first target)"
        )
    allowed = set(FIELDS) | {a for a in also if a is not None}
    unknown = sorted(set(row) - allowed)
    if unknown:
        raise ValueError(
            f"{where}: unknown fields {unknown} next to 'token_ids' (allowed: "
            f"{', '.join(sorted(allowed - {'token_ids'}))})"
        )
    return TokenRow(ids, prompt, row.get("routed_experts"))


def check_token_ids(rows: Iterable[tuple[str, TokenRow | None]], vocab_size: int) -> None:
    """ValueError naming the example (source, row) whose token ids are outside the
    vocabulary."""
    for source, row in rows:
        if row is not None and max(row.ids) >= vocab_size:
            raise ValueError(
                f"{source}: token id {max(row.ids)} is outside the vocabulary (0..{vocab_size - 1})"
            )
