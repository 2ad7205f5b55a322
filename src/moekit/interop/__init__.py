"""Interoperability with Hugging Face transformers checkpoints."""
