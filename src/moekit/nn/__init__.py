"""Transformer building blocks: attention (with its KV cache), RoPE, RMSNorm and the MLP."""
