"""A key/value cache for incremental decoding, with per-row lengths and padding.

Each row of the cache is one sequence. A row has its own write position (`end`), so rows of
different lengths share one batched forward pass (left-padded prompts when generating, or the
slots of a serving batch), and a `valid` mask that hides padding from attention. Keys and
values are stored per layer as (B, H_kv, L, d), the layout attention consumes.

Multi-head latent attention stores the per-head keys and values it expands from its latent
(simple and exact; the compressed latent alone would need less memory).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import ModelConfig


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_len > cfg.max_seq_len:
            raise ValueError(
                f"a cache of {max_len} positions exceeds the model's max_seq_len {cfg.max_seq_len}"
            )
        if cfg.attention.kind == "mla":
            heads, k_dim, v_dim = cfg.num_heads, cfg.head_dim, cfg.attention.v_head_dim
        else:
            heads, k_dim, v_dim = cfg.kv_heads, cfg.head_dim, cfg.head_dim
        self.batch, self.max_len = batch, max_len
        self.k = [
            torch.zeros(batch, heads, max_len, k_dim, device=device, dtype=dtype)
            for _ in range(cfg.num_layers)
        ]
        self.v = [
            torch.zeros(batch, heads, max_len, v_dim, device=device, dtype=dtype)
            for _ in range(cfg.num_layers)
        ]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.end = torch.zeros(batch, dtype=torch.long, device=device)
        self._write_idx: Tensor | None = None
        self._write_at: int | None = None
        self._span = 0
        self._advancing = torch.ones(batch, dtype=torch.bool, device=device)
        self.causal_prefill = False

    # ---- one forward pass: begin -> write (per layer) -> commit ----------------------------
    def begin(self, n: int, valid_new: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Prepare to append `n` tokens to every row; `valid_new` (B, n) marks padding False.

        Returns the RoPE positions of the new tokens (B, n) (the count of real tokens before
        each) and the attention mask (B, 1, n, L) over the first L cached positions, or None
        when no mask is needed: then `causal_prefill` says whether attention is plain causal
        (the first tokens of rows without padding) or open to every cached position (one new
        token per row, all rows equally long, no padding).
        """
        batch = self.batch
        longest = int(self.end.max())
        if longest + n > self.max_len:
            raise ValueError(
                f"the cache holds {self.max_len} positions; appending {n} tokens to a row of "
                f"{longest} would overflow it"
            )
        device = self.end.device
        if valid_new is None:
            valid_new = torch.ones(batch, n, dtype=torch.bool, device=device)
        idx = self.end[:, None] + torch.arange(n, device=device)  # (B, n)
        rows = torch.arange(batch, device=device)[:, None]
        self.valid[rows, idx] = valid_new
        seen = self.valid.sum(1) - valid_new.sum(1)  # real tokens before the new ones
        positions = (seen[:, None] + valid_new.long().cumsum(1) - 1).clamp_min(0)
        span = longest + n
        self._write_idx, self._span = idx, span
        self._advancing = valid_new.any(1)  # rows with no real token this pass do not grow
        # Common cases without a mask (SDPA runs faster, and there is less to build): one new
        # token on equally long rows, or the first tokens of rows; never with padding.
        uniform = bool((self.end == longest).all()) and bool(self.valid[:, :span].all())
        # Every row writes the same positions: a slice, not an indexed scatter.
        self._write_at = longest if uniform else None
        if uniform and (n == 1 or longest == 0):
            self.causal_prefill = n > 1
            return positions, None
        keys = torch.arange(span, device=device)
        causal = keys[None, None, :] <= idx[:, :, None]  # (B, n, L)
        allowed = (causal & self.valid[:, None, :span]) | (keys[None, None, :] == idx[:, :, None])
        return positions, allowed.unsqueeze(1)

    def window_mask(self, window: int) -> Tensor | None:
        """For sliding-window layers, after `begin`: the (B, 1, n, L) mask that also hides every
        key `window` or more positions before the query, or None when the window hides nothing
        (then `begin`'s mask holds). A row's real tokens sit at consecutive cache positions
        (padding only before them), so cache distance is token distance."""
        assert self._write_idx is not None, "call begin() first"
        idx, span = self._write_idx, self._span
        if span <= window:
            return None
        keys = torch.arange(span, device=idx.device)[None, None, :]
        query = idx[:, :, None]  # (B, n, 1)
        allowed = ((keys <= query) & self.valid[:, None, :span]) | (keys == query)
        return (allowed & (keys > query - window)).unsqueeze(1)

    def write(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store one layer's new keys/values; returns that layer's (B, H, L, d) keys/values."""
        assert self._write_idx is not None, "call begin() first"
        at = self._write_at
        if at is not None:
            n = k_new.shape[2]
            self.k[layer][:, :, at : at + n] = k_new
            self.v[layer][:, :, at : at + n] = v_new
            return self.k[layer][:, :, : self._span], self.v[layer][:, :, : self._span]
        idx = self._write_idx
        rows = torch.arange(self.batch, device=idx.device)[:, None]
        # (B, H, L, d) seen as (B, L, H, d): advanced indices (rows, idx) pick (B, n) slots.
        self.k[layer].permute(0, 2, 1, 3)[rows, idx] = k_new.permute(0, 2, 1, 3).to(
            self.k[layer].dtype
        )
        self.v[layer].permute(0, 2, 1, 3)[rows, idx] = v_new.permute(0, 2, 1, 3).to(
            self.v[layer].dtype
        )
        return self.k[layer][:, :, : self._span], self.v[layer][:, :, : self._span]

    def commit(self, n: int) -> None:
        """Advance by `n` the write position of every row that had a real token in this pass
        (idle rows of a serving batch take part in a batched step without growing)."""
        self.end += n * self._advancing.long()
        self._write_idx = None

    # ---- slots --------------------------------------------------------------------------
    def first_rows(self, n: int) -> KVCache:
        """A cache over rows 0..n-1 that shares this one's storage (views, no copy): a serving
        batch decodes only up to its last occupied slot."""
        view = object.__new__(KVCache)
        view.batch, view.max_len = n, self.max_len
        view.k = [k[:n] for k in self.k]
        view.v = [v[:n] for v in self.v]
        view.valid, view.end = self.valid[:n], self.end[:n]
        view._write_idx, view._span, view.causal_prefill = None, 0, False
        view._write_at = None
        view._advancing = torch.ones(n, dtype=torch.bool, device=self.end.device)
        return view

    def load_row(self, row: int, other: KVCache, other_row: int = 0) -> None:
        """Copy one row of another cache (e.g. a freshly prefilled request) into `row`."""
        n = int(other.end[other_row])
        for layer in range(len(self.k)):
            self.k[layer][row, :, :n] = other.k[layer][other_row, :, :n]
            self.v[layer][row, :, :n] = other.v[layer][other_row, :, :n]
        self.valid[row] = False
        self.valid[row, :n] = other.valid[other_row, :n]
        self.end[row] = n

    def truncate_row(self, row: int, length: int) -> None:
        """Forget every position of `row` from `length` on, as if they had never been written
        (speculative decoding drops the drafted tokens the target rejected). `length` counts
        cache positions, padding included, and may not exceed the row's current length."""
        end = int(self.end[row])
        if not 0 <= length <= end:
            raise ValueError(f"cannot truncate row {row} of {end} positions to {length}")
        self.valid[row, length:] = False
        self.end[row] = length

    def clear_row(self, row: int) -> None:
        self.valid[row] = False
        self.end[row] = 0

    def length(self, row: int) -> int:
        return int(self.end[row])
