"""Which experts serve which kinds of token: token classes, mutual information, top tokens.

Every metric here is a pure function of routing decisions and labels, so a test can hand it a
routing with a known answer. Shapes: N tokens, K expert slots per token, E experts, C classes.
`experts` is an (N, K) integer tensor of expert ids, -1 in an empty slot (expert choice); a
token's label is an integer in [0, C), or -1 when the token has no label (it is then left out).

Counting convention: each chosen expert is one observation of the pair (class, expert); a token
routed to K experts gives K observations and its routing weights are ignored. This counts what
the router *chose*, the thing "expert e handles commas" claims, not how much each choice
contributed to the output.

Token classes (`TOKEN_CLASSES`), decided on a token's decoded text with surrounding whitespace
stripped (call it s), the first rule that matches wins:
  whitespace   s is empty: the token is only spaces, tabs or newlines (indentation, blank lines)
  digits       s is only the digits 0-9
  punctuation  no character of s is a letter, a digit or "_" (operators and symbols included)
  code         the token comes from a code-domain document and s looks like a Python identifier
               or keyword (ASCII letters, digits and "_", not starting with a digit): names,
               keywords, and the pieces of them that a subword tokenizer makes
  capitalised  s is only letters and starts with an upper-case letter ("The", "Python")
  word         s is only letters and starts with a lower-case one
  other        anything else: mixed letters and digits ("x1"), apostrophes, partial UTF-8 bytes
Special tokens (end of text, padding) get no class.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TOKEN_CLASSES = ("whitespace", "digits", "punctuation", "code", "capitalised", "word", "other")
_DIGITS = frozenset(string.digits)
_IDENT_CHARS = frozenset(string.ascii_letters + string.digits + "_")


def classify_token(text: str, *, code: bool) -> str:
    """The class of one token (see the module docstring for the rules).

    `text` is the token's decoded text; `code` says whether it comes from a code-domain
    document (only then can it be "code")."""
    s = text.strip()
    if not s:
        return "whitespace"
    if all(c in _DIGITS for c in s):
        return "digits"
    if not any(c.isalnum() or c == "_" for c in s):
        return "punctuation"
    if code and s[0] not in _DIGITS and all(c in _IDENT_CHARS for c in s):
        return "code"
    if s.isalpha():
        return "capitalised" if s[0].isupper() else "word"
    return "other"


def class_table(token_texts: Sequence[str], special_ids: Sequence[int] = ()) -> Tensor:
    """Class ids (indices into `TOKEN_CLASSES`) for a whole vocabulary, as a (2, V) tensor:
    row 0 for tokens outside code documents, row 1 for tokens inside them; -1 for the
    `special_ids`. Index it as `table[is_code, token_ids]`."""
    index = {name: i for i, name in enumerate(TOKEN_CLASSES)}
    table = torch.tensor(
        [[index[classify_token(t, code=code)] for t in token_texts] for code in (False, True)],
        dtype=torch.long,
    ).reshape(2, len(token_texts))
    for i in special_ids:
        if 0 <= i < len(token_texts):
            table[:, i] = -1
    return table


def contingency(experts: Tensor, labels: Tensor, num_labels: int, num_experts: int) -> Tensor:
    """Counts of (label, expert) observations: a (C, E) int64 tensor.

    `experts` (N, K): each valid slot of a labelled token is one observation. `labels` (N,):
    the token's label in [0, C), or -1 to leave the token out."""
    if experts.dim() != 2 or labels.shape != experts.shape[:1]:
        raise ValueError(
            f"experts must be (N, K) and labels (N,); got {tuple(experts.shape)} and "
            f"{tuple(labels.shape)}"
        )
    lab = labels.long().unsqueeze(1).expand_as(experts)
    exp = experts.long()
    keep = (exp >= 0) & (lab >= 0)
    flat = lab[keep] * num_experts + exp[keep]
    return torch.bincount(flat, minlength=num_labels * num_experts).view(num_labels, num_experts)


def _entropy_bits(p: Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def mutual_information(counts: Tensor) -> tuple[float, float, float]:
    """(I(E;C), H(C), H(E)) in bits from a (C, E) table of observation counts."""
    total = counts.sum()
    if int(total) == 0:
        return 0.0, 0.0, 0.0
    joint = counts.double() / total
    h_c = _entropy_bits(joint.sum(dim=1))
    h_e = _entropy_bits(joint.sum(dim=0))
    h_ce = _entropy_bits(joint.flatten())
    return max(0.0, h_c + h_e - h_ce), h_c, h_e


def normalized_mi(counts: Tensor) -> float:
    """I(E;C) / H(C) from a (C, E) table of observation counts, in [0, 1].

    The share of the uncertainty about a token's class that knowing one expert it was sent to
    removes: 1 when every expert serves a single class (perfect specialisation), 0 when every
    class is spread over the experts alike. 0 when there is a single class (H(C) = 0)."""
    mi, h_c, _ = mutual_information(counts)
    return 0.0 if h_c <= 0 else min(1.0, mi / h_c)


@dataclass(frozen=True)
class Specialisation:
    """How much expert choice tells about a label, against chance.

    nmi: I(E;C)/H(C) on the real labels. mi_bits: I(E;C) in bits.
    baseline_mean, baseline_std: the same score with the labels shuffled across tokens
        (`shuffles` permutations): what finite samples give when routing ignores the label.
    counts: (C, E) observation counts; distribution: each row of `counts` over its sum.
    """

    nmi: float
    mi_bits: float
    baseline_mean: float
    baseline_std: float
    shuffles: int
    counts: Tensor
    distribution: Tensor

    @property
    def excess(self) -> float:
        """nmi above the shuffled baseline: the part that is not chance."""
        return self.nmi - self.baseline_mean


def specialisation(
    experts: Tensor,
    labels: Tensor,
    num_labels: int,
    num_experts: int,
    *,
    shuffles: int = 5,
    generator: torch.Generator | None = None,
) -> Specialisation:
    """Normalised mutual information between expert choice and label, with a shuffled baseline.

    `experts` (N, K) expert ids (-1 empty), `labels` (N,) in [0, C) or -1 (left out). The
    baseline permutes the labels of the labelled tokens (a token keeps one label for all its K
    observations), `shuffles` times, and reports the mean and standard deviation."""
    if shuffles < 1:
        raise ValueError(f"shuffles={shuffles} is invalid: must be >= 1")
    counts = contingency(experts, labels, num_labels, num_experts)
    mi, _, _ = mutual_information(counts)
    labelled = (labels >= 0).nonzero().squeeze(1)
    scores = []
    for _ in range(shuffles):
        shuffled = labels.clone()
        perm = torch.randperm(labelled.numel(), generator=generator)
        shuffled[labelled] = labels[labelled[perm]]
        scores.append(normalized_mi(contingency(experts, shuffled, num_labels, num_experts)))
    base = torch.tensor(scores, dtype=torch.float64)
    rows = counts.sum(dim=1, keepdim=True).clamp_min(1)
    return Specialisation(
        nmi=normalized_mi(counts),
        mi_bits=mi,
        baseline_mean=float(base.mean()),
        baseline_std=float(base.std(unbiased=False)),
        shuffles=shuffles,
        counts=counts,
        distribution=counts.double() / rows,
    )


@dataclass(frozen=True)
class TopToken:
    """A token routed to an expert: `count` copies went there, `share` of its occurrences."""

    token_id: int
    count: int
    occurrences: int

    @property
    def share(self) -> float:
        return self.count / self.occurrences if self.occurrences else 0.0


def top_tokens(
    experts: Tensor,
    token_ids: Tensor,
    num_experts: int,
    *,
    n: int = 10,
    min_occurrences: int = 5,
) -> tuple[list[list[TopToken]], list[list[TopToken]]]:
    """Per expert, the tokens routed to it most: (by_count, distinctive).

    by_count[e]: the `n` token ids with the most copies sent to expert e (frequent tokens
    such as spaces lead here for every expert). distinctive[e]: among tokens seen at least
    `min_occurrences` times, the `n` with the largest share of their occurrences sent to e
    (ties broken by count): what the expert takes that others do not. A token id's
    occurrences count the tokens in `token_ids`; `experts` (N, K), -1 in empty slots."""
    exp = experts.long()
    ids = token_ids.long().unsqueeze(1).expand_as(exp)
    keep = exp >= 0
    vocab = int(token_ids.max()) + 1 if token_ids.numel() else 1
    pair = torch.bincount(exp[keep] * vocab + ids[keep], minlength=num_experts * vocab)
    pair = pair.view(num_experts, vocab)
    occurrences = torch.bincount(token_ids.long(), minlength=vocab)
    by_count: list[list[TopToken]] = []
    distinctive: list[list[TopToken]] = []
    frequent = occurrences >= min_occurrences
    for e in range(num_experts):
        row = pair[e]
        k = min(n, int((row > 0).sum()))
        order = row.topk(k).indices.tolist() if k else []
        by_count.append([TopToken(i, int(row[i]), int(occurrences[i])) for i in order])
        share = row.double() / occurrences.clamp_min(1)
        # Sort by share, then count: add a tie-breaker far below the smallest share gap.
        key = torch.where(frequent & (row > 0), share + row.double() * 1e-9, -1.0)
        k = min(n, int((key >= 0).sum()))
        order = key.topk(k).indices.tolist() if k else []
        distinctive.append([TopToken(i, int(row[i]), int(occurrences[i])) for i in order])
    return by_count, distinctive


def display_token(text: str) -> str:
    """A token's text made visible for tables: spaces as "␣", newlines as "↵", tabs as "⇥"."""
    shown = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return shown if shown else "∅"
