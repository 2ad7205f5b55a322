"""Transformer building blocks: attention, RoPE, RMSNorm, MLP and the decoder model."""
