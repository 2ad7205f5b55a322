"""What to train on: the builtin corpus, local files, or a Hugging Face dataset."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.validate import ConfigBase, check_field_types, check_positive, fail


@dataclass(kw_only=True)
class DataConfig(ConfigBase):
    """Where the training text comes from and how it is tokenized.

    `source`:
      - "builtin": the corpus that ships with every Python (see `moekit.data.corpus`): English
        technical prose, Python source code, generated arithmetic and generated records, each
        document labelled with its domain.
      - a path or comma-separated paths: .txt files, folders of .txt files (searched
        recursively), .jsonl files (one JSON object per line, text in `text_field`, or token
        ids with a recorded routing: moekit.data.token_rows) and
        .parquet files (read through the `datasets` library).
      - "hf:NAME" or "hf:NAME:CONFIG": a Hugging Face dataset (needs `datasets` and a network
        connection), split `hf_split`, text in `text_field`.
    A document's domain comes from `domain_field` when set (jsonl, parquet, hf), else from
    the source (the builtin corpus labels its own; a file's domain is its parent folder name;
    an "hf:NAME" dataset's is the last path component of NAME).
    """

    source: str = "builtin"
    text_field: str = "text"
    domain_field: str | None = None
    hf_split: str = "train"
    val_fraction: float = 0.05  # documents held out for validation, chosen by a stable hash
    max_chars_per_domain: int = 2_000_000  # size cap of each builtin domain
    seed: int = 0  # corpus generation and split

    def __post_init__(self) -> None:
        check_field_types(self)
        owner = "DataConfig"
        if not self.source:
            raise fail(owner, "source", self.source, "must be 'builtin', paths, or 'hf:NAME'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise fail(owner, "val_fraction", self.val_fraction, "must be in [0, 1)")
        check_positive(owner, max_chars_per_domain=self.max_chars_per_domain)
        if not self.text_field:
            raise fail(owner, "text_field", self.text_field, "must be a non-empty field name")
