"""Inference: generation with a KV cache, sampling, streaming and routing traces."""

from moekit.infer.generate import Chunk, Completion, ContextLengthError, Generator
from moekit.infer.sampling import SamplingParams

__all__ = ["Chunk", "Completion", "ContextLengthError", "Generator", "SamplingParams"]
