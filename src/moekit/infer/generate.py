"""Text generation."""

from __future__ import annotations

import torch

from moekit.nn.transformer import Transformer


@torch.no_grad()
def greedy_generate(
    model: Transformer, prompt_ids: list[int], max_new_tokens: int, *, eos_id: int | None = None
) -> list[int]:
    """Greedy continuation of `prompt_ids` (the new token ids only), recomputing the full
    forward pass each step (no KV cache), stopping at `eos_id` or the context length."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            window = ids[-model.cfg.max_seq_len :]
            logits = model(torch.tensor([window], device=device), causal_routing=True).logits
            token = int(logits[0, -1].argmax())
            if token == eos_id:
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return new
