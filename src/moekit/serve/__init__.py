"""Serving: an OpenAI-compatible HTTP API with continuous batching, and a web page."""
