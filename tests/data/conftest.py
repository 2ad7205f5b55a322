from pathlib import Path

import pytest

from moekit.data.corpus import Document, builtin_corpus
from moekit.data.tokenizer import Tokenizer

SMALL_CAP = 20_000  # characters per builtin domain in most tests: a few documents each


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    # Code that falls back to the default cache must not write into the user's home.
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path_factory.mktemp("moekit-cache")))


@pytest.fixture(scope="session")
def small_corpus() -> list[Document]:
    return builtin_corpus(max_chars_per_domain=SMALL_CAP)


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus: list[Document]) -> Tokenizer:
    return Tokenizer.train((d.text for d in small_corpus), vocab_size=512)


@pytest.fixture
def hf_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The `datasets` module with its cache redirected into the test's temporary folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets
