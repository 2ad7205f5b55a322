"""Read llama.cpp's own test vocabularies with moekit: the same ids as their tokenizers.

    python examples/gguf_vocab_check.py LLAMA_CPP_SOURCE_DIR

llama.cpp's source tree carries vocabulary-only GGUF files of published tokenizers
(`models/ggml-vocab-NAME.gguf`) with test texts (`.inp`) and the ids the original Hugging Face
tokenizer gives them (`.out`, written by llama.cpp's `convert_hf_to_gguf_update.py`). For every
file whose tokenizer moekit rebuilds (`moekit.interop.gguf_tokenizer.write_tokenizer`), this
rebuilds it and encodes each text without special tokens; it prints how many texts give the
expected ids, and the first difference. Files of a tokenizer moekit refuses are listed with
the refusal. Not part of the test suite: it needs llama.cpp's source.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

SEPARATOR = "\n__ggml_vocab_test__\n"


def plain(value: object) -> object:
    """A metadata value with numpy scalars as Python ones."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def check(vocab: Path) -> bool | None:
    """True when every text gives the expected ids, False when one does not, None when moekit
    does not read this tokenizer."""
    import gguf

    from moekit.data.tokenizer import Tokenizer
    from moekit.interop.fields import UnsupportedError
    from moekit.interop.gguf_tokenizer import write_tokenizer

    reader = gguf.GGUFReader(vocab)
    meta = {k: plain(f.contents()) for k, f in reader.fields.items() if k.startswith("tok")}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            write_tokenizer(meta, Path(tmp))
        except UnsupportedError as err:
            print(f"{vocab.name:>32}: not read ({str(err)[:90]})")
            return None
        backend = Tokenizer.load(Path(tmp)).backend
    texts = vocab.with_suffix(".gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    expected = vocab.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    same, first = 0, None
    for text, line in zip(texts, expected, strict=False):
        want = [int(i) for i in line.split()]
        got = backend.encode(text, add_special_tokens=False).ids
        same += got == want
        if got != want and first is None:
            first = f"{text[:30]!r}: {got[:8]} vs {want[:8]}"
    print(f"{vocab.name:>32}: {same} of {len(texts)} texts give the expected ids"
          + (f"; first difference {first}" if first else ""))  # fmt: skip
    return same == len(texts)


def main() -> int:
    models = Path(sys.argv[1]) / "models"
    results = [
        check(vocab)
        for vocab in sorted(models.glob("ggml-vocab-*.gguf"))
        if vocab.with_suffix(".gguf.out").is_file()
    ]
    return 1 if False in results else 0


if __name__ == "__main__":
    sys.exit(main())
