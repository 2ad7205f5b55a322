"""Inference: generation from a model directory."""
