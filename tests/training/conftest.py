import pytest

from moekit.training.config import resolve_run_config

TINY_RUN = [
    "model.vocab_size=512",
    "model.dim=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.ffn_hidden=64",
    "model.max_seq_len=64",
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_hidden=32",
    "data.max_chars_per_domain=40000",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.warmup_steps=2",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.log_every=1",
    "train.save_every=4",
    "train.sample_tokens=4",
    "train.lr=3e-3",
]


@pytest.fixture
def tiny_run_config():
    """A run small enough to train a few steps in a second or two on one CPU thread."""

    def make(*extra):
        return resolve_run_config(preset="debug", overrides=[*TINY_RUN, *extra])

    return make
