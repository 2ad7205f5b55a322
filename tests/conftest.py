import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    """Tokenizer caches go to a temporary folder, shared by the tests of one worker. Compiled
    decode steps keep inductor's Python wrapper (each C++ wrapper costs ~20 s more to compile,
    and the suite compiles dozens of steps, in-process and in the commands it runs); the tests
    of the default, C++-wrapped step turn it back on (tests/infer/test_compiled.py)."""
    os.environ["MOEKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("moekit-cache"))
    os.environ.setdefault("MOEKIT_CPP_WRAPPER", "0")  # export 1 to run them all C++-driven


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


# ---- tiny training runs -------------------------------------------------------------------------

# A run small enough to train a few steps in a second or two on one CPU thread (dotted
# overrides on the debug preset).
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

    from moekit.training.config import resolve_run_config

    def make(*extra):
        return resolve_run_config(preset="debug", overrides=[*TINY_RUN, *extra])

    return make


# ---- headless Chromium, for the tests that look at a page -----------------------------------

ARTIFACTS = Path(
    os.environ.get("MOEKIT_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts")
)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium (playwright driving the installed browser), ARTIFACTS created; the
    test is skipped, with the reason, when playwright or Chromium is missing. Screenshots go
    to ARTIFACTS."""
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed"
    )
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        chrome = p.chromium.launch(
            executable_path=browser_path,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            yield chrome
        finally:
            chrome.close()


def disk_full_after(monkeypatch: Any, files_written: int) -> list[str]:
    """Make safetensors write `files_written` files, then find the disk full half way into the
    next one (an ENOSPC, a partial file left behind); returns the file names it was given."""
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) <= files_written:
            return real(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return calls
