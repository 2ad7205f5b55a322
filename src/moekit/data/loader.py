"""Packed training rows and the loaders that walk them.

Documents are joined into one token stream, each followed by EOS, and cut into rows of
seq_len + 1 tokens that overlap by one token: a row's inputs are its first seq_len tokens and
its targets the last seq_len, so every token of the stream but the first is predicted exactly
once. `PackedLoader` serves shuffled batches of rows forever, epoch after epoch, and can save
and restore its exact position.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from moekit.data.config import DataConfig
from moekit.data.corpus import Document, fingerprint, load_documents, split_documents
from moekit.data.token_rows import TokenRow, check_token_ids
from moekit.data.tokenizer import Tokenizer, get_tokenizer


def pack(token_docs: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> Tensor:
    """Pack token lists into an int64 tensor of shape (N, seq_len + 1).

    The stream is doc0 EOS doc1 EOS ...; row i is stream[i * seq_len : i * seq_len + seq_len + 1],
    so consecutive rows share one token. The tail too short for a full row is dropped. Raises
    ValueError when the stream does not fill even one row.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid: must be a positive int")
    if eos_id < 0:
        raise ValueError(f"eos_id={eos_id!r} is invalid: must be >= 0")
    docs = list(token_docs)
    total = sum(len(d) + 1 for d in docs)
    if total < seq_len + 1:
        raise ValueError(
            f"{len(docs)} document(s) hold {total} tokens with separators, fewer than one row "
            f"of seq_len + 1 = {seq_len + 1}: use more data or a shorter seq_len"
        )
    stream = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(d, (eos_id,)) for d in docs),
        dtype=np.int64,
        count=total,
    )
    # unfold views windows of seq_len + 1 at stride seq_len: exactly (total - 1) // seq_len rows.
    return torch.from_numpy(stream).unfold(0, seq_len + 1, seq_len).contiguous()


class RoutedRows(NamedTuple):
    """A recorded routing to replay over rows of tokens (moekit.infer.routing_replay):
    `experts` (N, W, M, K) int16 expert ids per token and MoE layer (-1: an empty slot),
    `mask` (N, W) bool, the tokens that replay it (the others route themselves)."""

    experts: Tensor
    mask: Tensor

    def model_args(self) -> dict[str, Tensor]:
        """What the model takes to replay it over the rows' inputs (all but the last token)."""
        return {
            "routed_experts": self.experts[:, :-1].long(),
            "routed_mask": self.mask[:, :-1].contiguous(),
        }


@dataclass
class TokenizedData:
    """Packed rows ready for training and evaluation.

    `train` and `val` are int64 (N, seq_len + 1) rows; `val_by_domain` holds each domain's
    validation documents packed on their own (domains too small for one row are left out and
    listed in `stats["val_domains_skipped"]`). `stats` is JSON-serialisable: documents,
    characters, tokens and rows per split and per domain.
    """

    train: Tensor
    val: Tensor
    val_by_domain: dict[str, Tensor]
    stats: dict[str, Any]
    # Which tokens are prediction targets (supervised fine-tuning: the completions only);
    # None: every token, as in language-model pre-training.
    train_mask: Tensor | None = None
    val_mask: Tensor | None = None
    # A recorded routing the training rows replay (fine-tuning data with routed_experts).
    train_routing: RoutedRows | None = None


# A recorded routing's decoder: (source, row of token ids) -> (T, M, K) int16 expert ids, -1
# in empty slots, T at most the row's length; a ValueError naming the source when it does not
# fit the model (moekit.finetune.replay_data.routing_decoder makes one).
RoutingOf = Callable[[str, TokenRow], Tensor]


def prepare_data(
    cfg: DataConfig,
    vocab_size: int,
    seq_len: int,
    *,
    tokenizer: Tokenizer | None = None,
    cache_dir: Path | None = None,
    say: Callable[[str], None] | None = None,
    routing_of: RoutingOf | None = None,
) -> tuple[Tokenizer, TokenizedData]:
    """Load, split, tokenize and pack the data that `cfg` names.

    The tokenizer is `tokenizer` when given (it must have at most `vocab_size` tokens), else one
    trained with `vocab_size` tokens on the training split only (cached under `cache_dir`, see
    `get_tokenizer`; `say` hears what its training has to say). With `cfg.val_fraction == 0`,
    `val` is an empty (0, seq_len + 1) tensor; otherwise a validation split too small for one
    row is a ValueError.

    Documents of token ids (moekit.data.token_rows) need the given tokenizer, the one they
    were made with; they are packed as they are, their prompt tokens and the separator after
    them are no targets (`train_mask`, `val_mask`), and a recorded routing on a training one
    is decoded by `routing_of` and replayed (`train_routing`). Per-domain validation covers
    text documents.
    """
    docs = load_documents(cfg)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    if not train_docs:
        raise ValueError(
            f"DataConfig.val_fraction={cfg.val_fraction} left no training documents "
            f"out of {len(docs)}"
        )
    token_docs = [d for d in docs if d.tokens is not None]
    tokenizer = _tokenizer(tokenizer, train_docs, token_docs, vocab_size, cache_dir, say)
    eos = tokenizer.require_eos("packing documents into training rows")
    train_ids, val_ids = _encode(tokenizer, train_docs), _encode(tokenizer, val_docs)

    train = _pack_split("training", train_ids, seq_len, eos)
    if val_docs:
        val = _pack_split("validation", val_ids, seq_len, eos)
    elif cfg.val_fraction > 0:
        raise ValueError(
            f"DataConfig.val_fraction={cfg.val_fraction} chose no validation documents out of "
            f"{len(docs)}: raise val_fraction or add documents"
        )
    else:
        val = torch.empty(0, seq_len + 1, dtype=torch.int64)

    val_by_domain: dict[str, Tensor] = {}
    skipped: list[str] = []
    text_val = [i for i, d in enumerate(val_docs) if d.tokens is None]
    by_domain = _group_by_domain([val_docs[i] for i in text_val], [val_ids[i] for i in text_val])
    for domain, ids in by_domain.items():
        if sum(len(i) + 1 for i in ids) >= seq_len + 1:
            val_by_domain[domain] = pack(ids, seq_len, eos)
        else:
            skipped.append(domain)

    stats: dict[str, Any] = {
        "source": cfg.source,
        "fingerprint": fingerprint(docs),
        "vocab_size": tokenizer.vocab_size,
        "seq_len": seq_len,
        "train": _split_stats(train_docs, train_ids, train, {}),
        "val": _split_stats(val_docs, val_ids, val, val_by_domain),
        "val_domains_skipped": sorted(skipped),
    }
    data = TokenizedData(train=train, val=val, val_by_domain=val_by_domain, stats=stats)
    if token_docs:
        data.train_mask = pack_like(_targets(train_docs, train_ids), seq_len)
        if len(val):
            data.val_mask = pack_like(_targets(val_docs, val_ids), seq_len)
        data.train_routing = _routing(train_docs, train_ids, seq_len, routing_of)
    return tokenizer, data


def _tokenizer(
    given: Tokenizer | None,
    train_docs: list[Document],
    token_docs: list[Document],
    vocab_size: int,
    cache_dir: Path | None,
    say: Callable[[str], None] | None,
) -> Tokenizer:
    """`prepare_data`'s tokenizer: the given one, else one trained on the training split;
    documents of token ids need the given one, and their ids must fit `vocab_size`."""
    if given is None and token_docs:
        raise ValueError(
            f"{token_docs[0].source}: a line of token ids needs the tokenizer it was made with; "
            "start from the model that made it (train.init_from)"
        )
    if given is None:
        return get_tokenizer(train_docs, vocab_size, cache_dir, say=say)
    if given.vocab_size > vocab_size:
        raise ValueError(
            f"the given tokenizer has {given.vocab_size} tokens, more than "
            f"vocab_size={vocab_size}: the model could not embed all of its ids"
        )
    check_token_ids(((d.source, d.tokens) for d in token_docs), vocab_size)
    return given


def pack_like(values: Sequence[Tensor], seq_len: int, separator: Tensor | None = None) -> Tensor:
    """Per-token values of documents, packed as `pack` packs their tokens: `values[i]` has
    one entry (first dimension) per token of document i and then, unless `separator` gives
    the same one for all, one for the EOS after it; (N, seq_len + 1, *entry shape), row for
    row as `pack`'s."""
    parts = values if separator is None else [t for v in values for t in (v, separator[None])]
    return torch.cat(list(parts)).unfold(0, seq_len + 1, seq_len).movedim(-1, 1).contiguous()


def _encode(tokenizer: Tokenizer, docs: Sequence[Document]) -> list[list[int]]:
    """Each document's token ids: its text encoded, or its own ids."""
    encoded = iter(tokenizer.encode_batch([d.text for d in docs if d.tokens is None]))
    return [list(d.tokens.ids) if d.tokens is not None else next(encoded) for d in docs]


def _targets(docs: Sequence[Document], ids: Sequence[list[int]]) -> list[Tensor]:
    """Which tokens of each document, and the separator after it, are targets: all of a text
    document's; of a document of token ids, those after its prompt (its separator not: the
    ids end as they were sampled)."""
    out = []
    for doc, doc_ids in zip(docs, ids, strict=True):
        targets = torch.ones(len(doc_ids) + 1, dtype=torch.bool)
        if doc.tokens is not None:
            targets[: doc.tokens.prompt_tokens] = False
            targets[-1] = False
        out.append(targets)
    return out


def _routing(
    docs: Sequence[Document], ids: Sequence[list[int]], seq_len: int, routing_of: RoutingOf | None
) -> RoutedRows | None:
    """The recorded routings of the documents of token ids, laid over the packed rows (the
    other tokens and the separators route themselves); None when no document has one."""
    routed = [d for d in docs if d.tokens is not None and d.tokens.routed_experts is not None]
    if not routed:
        return None
    if routing_of is None:
        raise ValueError(f"{routed[0].source}: 'routed_experts' is not replayed here")
    decoded = [
        routing_of(d.source, d.tokens) if d.tokens and d.tokens.routed_experts is not None else None
        for d in docs
    ]
    layers = next(r for r in decoded if r is not None).shape[1]
    slots = max(r.shape[2] for r in decoded if r is not None)
    experts, mask = [], []
    for r, doc_ids in zip(decoded, ids, strict=True):
        e = torch.full((len(doc_ids), layers, slots), -1, dtype=torch.int16)
        m = torch.zeros(len(doc_ids), dtype=torch.bool)
        if r is not None:
            e[: r.shape[0], :, : r.shape[2]], m[: r.shape[0]] = r, True
        experts.append(e)
        mask.append(m)
    no_experts = torch.full((layers, slots), -1, dtype=torch.int16)
    return RoutedRows(
        pack_like(experts, seq_len, no_experts), pack_like(mask, seq_len, torch.tensor(False))
    )


def _pack_split(name: str, ids: Sequence[list[int]], seq_len: int, eos_id: int) -> Tensor:
    try:
        return pack(ids, seq_len, eos_id)
    except ValueError as err:
        raise ValueError(f"the {name} split is too small: {err}") from err


def _group_by_domain(
    docs: Sequence[Document], ids: Sequence[list[int]]
) -> dict[str, list[list[int]]]:
    groups: dict[str, list[list[int]]] = {}
    for doc, doc_ids in zip(docs, ids, strict=True):
        groups.setdefault(doc.domain, []).append(doc_ids)
    return groups


def _split_stats(
    docs: Sequence[Document],
    ids: Sequence[list[int]],
    rows: Tensor,
    rows_by_domain: Mapping[str, Tensor],
) -> dict[str, Any]:
    """Counts of one split; "tokens" counts text tokens, without the EOS separators."""
    by_domain: dict[str, dict[str, int]] = {}
    for doc, doc_ids in zip(docs, ids, strict=True):
        entry = by_domain.setdefault(doc.domain, {"documents": 0, "characters": 0, "tokens": 0})
        entry["documents"] += 1
        entry["characters"] += len(doc.text)
        entry["tokens"] += len(doc_ids)
    for domain, domain_rows in rows_by_domain.items():
        by_domain[domain]["rows"] = int(domain_rows.shape[0])
    return {
        "documents": len(docs),
        "characters": sum(e["characters"] for e in by_domain.values()),
        "tokens": sum(e["tokens"] for e in by_domain.values()),
        "rows": int(rows.shape[0]),
        "by_domain": by_domain,
    }


class PackedLoader:
    """Batches of packed rows: an endless stream of epochs, resumable at any batch.

    Each epoch visits the rows in the order of `torch.randperm` seeded with `seed + epoch` (row
    order when `shuffle=False`) and drops the last partial batch. `next_batch()` returns
    (inputs, targets), both (batch_size, seq_len): rows[:, :-1] and rows[:, 1:]; with a
    `loss_mask`, targets whose mask is False are -100 (ignored by the loss).
    """

    def __init__(
        self,
        rows: Tensor,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        loss_mask: Tensor | None = None,
        routing: RoutedRows | None = None,
    ) -> None:
        """`rows` is an integer (N, seq_len + 1) tensor with N >= batch_size; `loss_mask`, if
        given, a bool tensor of the same shape marking the tokens to predict; `routing`, if
        given, a routing of the same rows to replay (each batch then comes with its own)."""
        if rows.dim() != 2 or rows.shape[1] < 2:
            raise ValueError(
                f"rows must be (N, seq_len + 1) with seq_len >= 1, got {tuple(rows.shape)}"
            )
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise ValueError(f"rows must hold integer token ids, got dtype {rows.dtype}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: must be a positive int")
        if batch_size > rows.shape[0]:
            raise ValueError(
                f"batch_size={batch_size} is invalid: larger than the {rows.shape[0]} rows of "
                "data; use a smaller batch_size or seq_len, or more data"
            )
        if loss_mask is not None and loss_mask.shape != rows.shape:
            raise ValueError(
                f"loss_mask {tuple(loss_mask.shape)} must match rows {tuple(rows.shape)}"
            )
        if routing is not None and tuple(routing.mask.shape) != tuple(rows.shape):
            raise ValueError(
                f"routing {tuple(routing.mask.shape)} must match rows {tuple(rows.shape)}"
            )
        self.rows = rows
        self.loss_mask = loss_mask
        self.routing = routing
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self._epoch = 0
        self._index = 0  # batches already served in the current epoch
        self._order: Tensor | None = None  # row order of the current epoch, made on first use

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (0-based)."""
        return self._epoch

    def _epoch_order(self) -> Tensor:
        if self._order is None:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + self._epoch)
                self._order = torch.randperm(self.num_rows, generator=generator)
            else:
                self._order = torch.arange(self.num_rows)
        return self._order

    def next_batch(self) -> Batch:
        """The next (inputs, targets) pair, each (batch_size, seq_len) and contiguous; with a
        `routing`, a triple whose third element is the batch's `RoutedRows`."""
        start = self._index * self.batch_size
        picked = self._epoch_order()[start : start + self.batch_size]
        self._index += 1
        if self._index == self.batches_per_epoch:
            self._epoch, self._index, self._order = self._epoch + 1, 0, None
        mask = self.loss_mask[picked] if self.loss_mask is not None else None
        inputs, targets = _inputs_targets(self.rows[picked], mask)
        if self.routing is None:
            return inputs, targets
        return inputs, targets, RoutedRows(*(t[picked] for t in self.routing))

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch and what it depends on (JSON-serialisable)."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()` of a loader over the same rows, batch size and seed."""
        for key in ("epoch", "index", "seed", "num_rows", "batch_size"):
            if key not in state:
                raise ValueError(f"loader state lacks {key!r}; it has {', '.join(sorted(state))}")
        mine = self.state_dict()
        for key in ("num_rows", "batch_size", "seed", "shuffle"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has "
                    f"{key}={mine[key]!r}: the data or settings changed since it was saved"
                )
        epoch, index = state["epoch"], state["index"]
        if not (isinstance(epoch, int) and epoch >= 0):
            raise ValueError(f"loader state epoch={epoch!r} is invalid: must be an int >= 0")
        if not (isinstance(index, int) and 0 <= index < self.batches_per_epoch):
            raise ValueError(
                f"loader state index={index!r} is invalid: must be an int in "
                f"[0, {self.batches_per_epoch})"
            )
        self._epoch, self._index, self._order = epoch, index, None


IGNORE_INDEX = -100  # what torch's cross-entropy skips

# (inputs, targets), or (inputs, targets, the batch's routing to replay)
Batch = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, RoutedRows]


def _inputs_targets(batch: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    if mask is not None:
        targets = targets.masked_fill(~mask[:, 1:], IGNORE_INDEX)
    return inputs, targets


def iter_eval_batches(
    rows: Tensor, batch_size: int, loss_mask: Tensor | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (inputs, targets) over `rows` in order, the last batch possibly smaller (targets
    outside `loss_mask` are -100)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be a positive int")
    for start in range(0, rows.shape[0], batch_size):
        mask = loss_mask[start : start + batch_size] if loss_mask is not None else None
        yield _inputs_targets(rows[start : start + batch_size], mask)
