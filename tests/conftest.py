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
