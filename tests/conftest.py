import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("moekit", max_examples=40, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "moekit"))

# Each pytest-xdist worker gets one thread so two workers share the 2 cores without
# oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tokenizer caches go to a temporary folder, shared by the tests of one worker."""
    os.environ["MOEKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("moekit-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, _private_cache):
    """A model directory with a random debug-size MoE and a tokenizer trained on a small slice
    of the builtin corpus (vocabulary 512)."""
    from moekit import build_model
    from moekit.config import ModelConfig
    from moekit.data.corpus import builtin_corpus
    from moekit.data.tokenizer import Tokenizer
    from moekit.model_dir import save_model

    out = tmp_path_factory.mktemp("tiny-model")
    docs = builtin_corpus(max_chars_per_domain=20_000)
    tokenizer = Tokenizer.train([d.text for d in docs], 512)
    tokenizer.save(out)
    cfg = ModelConfig.from_dict(
        dict(vocab_size=512, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=128,
             max_seq_len=128, moe=dict(num_experts=8, top_k=2, expert_hidden=64))
    )  # fmt: skip
    save_model(build_model(cfg, seed=0), cfg, out)
    return out
