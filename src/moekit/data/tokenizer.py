"""A byte-level BPE tokenizer (the `tokenizers` library), saved as tokenizer.json, cached.

Byte-level means every string, whatever its characters or whitespace, encodes to ids that
decode back to exactly the same string. Two special tokens come first in the vocabulary:
`EOS` separates documents when they are packed, `PAD` fills unused positions.

Next to tokenizer.json, tokenizer_config.json (the Hugging Face format, so `AutoTokenizer`
loads the directory too) names the end-of-text and padding tokens, and says whether special
tokens written in ordinary text stay plain text (`split_special_tokens`, true for tokenizers
trained here). A tokenizer imported from a Hugging Face checkpoint keeps its own tokens.

Training cuts runs of more than `MAX_RUN` characters of one kind (letters, digits, other
symbols, whitespace: the pieces the byte-level pre-tokenizer never splits) into pieces of
`MAX_RUN`: one unbroken multi-megabyte "word" would take the BPE trainer many minutes. Texts
without such runs train exactly as they always did.

Beginning-of-sequence tokens: tokenizers trained here have none. An imported one (Mixtral's
`<s>`, DeepSeek's begin-of-sentence) may have a post-processor in tokenizer.json that puts one
in front of every text; transformers applies it by default, and its models were trained with
it, so `encode_prompt` does too. Training data never gets one (`encode`): the packer places
the document separators itself.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moekit.data.corpus import Document, fingerprint
from moekit.files import atomic_write, atomic_write_text
from moekit.model_dir import ModelDir

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
TOKENIZER_FILE = ModelDir.TOKENIZER
CONFIG_FILE = ModelDir.TOKENIZER_CONFIG
# Bump when the way a tokenizer is built changes, so cached tokenizers are not reused.
CACHE_FORMAT_VERSION = 1
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
# The longest run of one kind of character trained on as one piece. Words, numbers and
# punctuation in real text are far shorter; the trainer slows down with the square of a
# piece's length.
MAX_RUN = 1000
# A corpus this large trains long enough that a run says so before it starts.
LONG_TRAINING_CHARS = 50_000_000
# Runs of one character class as the byte-level pre-tokenizer sees them (letters, digits,
# other symbols, whitespace); the look-behind makes each run match once, from its start.
_CLASSES = (r"[^\W\d_]", r"\d", r"(?:[^\s\w]|_)", r"\s")
_LONG_RUN = re.compile("|".join(f"(?<!{c}){c}{{{MAX_RUN + 1},}}" for c in _CLASSES))
_LONG_SPACE = re.compile(rf"\s{{{MAX_RUN + 1}}}")


class Tokenizer:
    """Encode text to token ids and back; wraps a `tokenizers.Tokenizer`.

    Build one with `Tokenizer.train` or `Tokenizer.load`. The special tokens' text inside
    ordinary input is encoded as plain text, so only the packer ever emits `eos_id`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos: str | None = EOS,
        pad: str | None = PAD,
        split_special_tokens: bool = True,
        bos: str | None = None,
    ) -> None:
        """Wrap `backend`, which must have the `eos` and `pad` special tokens it is given
        (`pad=None`: pad with `eos`). `eos=None` is a tokenizer without an end-of-text token
        (legal in Hugging Face checkpoints): generation then stops on length or stop strings,
        and packing documents for training is refused. With neither, padding uses id 0, which
        only ever fills masked positions. With `split_special_tokens`, text like
        "<|endoftext|>" in a document is plain text and never turns into a real document
        boundary. `bos` names the beginning-of-sequence token, if the tokenizer has one (what
        `bos_id` reports; which tokens a prompt starts with is the backend's post-processor's
        business)."""
        pad = pad or eos
        named = [(t, backend.token_to_id(t)) for t in (eos, pad) if t is not None]
        missing = [t for t, i in named if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special token(s) {', '.join(missing)}")
        backend.encode_special_tokens = split_special_tokens
        self.backend = backend
        self.eos_token, self.pad_token = eos, pad
        self.bos_token = bos if bos is not None and backend.token_to_id(bos) is not None else None
        self._eos_id: int | None = None if eos is None else backend.token_to_id(eos)
        self._pad_id: int = 0 if pad is None else backend.token_to_id(pad) or 0
        self._prompt_prefix = _prefix_of(backend)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        say: Callable[[str], None] | None = None,
        progress: bool = False,
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer on `texts`.

        `vocab_size` counts everything: the special tokens, the 256 byte symbols and the merges;
        it must be at least 258. The result may hold fewer tokens when the texts offer fewer
        distinct merges. Runs of more than `MAX_RUN` characters of one kind are cut into
        pieces first, and `say` is told how many texts had one (a warning without `say`).
        With `progress`, the `tokenizers` library shows its progress bars on a terminal.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if vocab_size < _MIN_VOCAB:
            raise ValueError(
                f"vocab_size={vocab_size} is invalid: must be >= {_MIN_VOCAB} "
                f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens)"
            )
        backend = tokenizers.Tokenizer(models.BPE())
        # No prefix space: a leading space would be invented on encode and kept on decode.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            # All 256 bytes, even ones absent from the texts, so any later text encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        cut = [0]
        backend.train_from_iterator(_cut_long_runs(texts, cut), trainer=trainer)
        if cut[0]:
            _tell(say, _cut_message(cut[0]))
        return cls(backend)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer from a tokenizer.json file or a directory that holds one."""
        file = _file_path(Path(path))
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {str(file)!r}")
        try:
            backend = tokenizers.Tokenizer.from_str(file.read_text(encoding="utf-8"))
        except Exception as err:  # the Rust side raises plain Exceptions for parse errors
            raise ValueError(f"{str(file)!r} is not a valid tokenizer file: {err}") from err
        specials = read_special_tokens(file.parent / CONFIG_FILE)
        try:
            return cls(backend, **specials)
        except ValueError as err:
            raise ValueError(f"{str(file)!r}: {err}") from err

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json atomically and return its path.

        `path` is a directory (created if needed) or a file name ending in .json.
        """
        file = _file_path(Path(path))
        text = self.backend.to_str()

        def write(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")

        atomic_write(file, write)
        if file.name == TOKENIZER_FILE:
            config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
            for key, value in (
                ("eos_token", self.eos_token),
                ("pad_token", self.pad_token),
                ("bos_token", self.bos_token),
            ):
                if value is not None:
                    config[key] = value
            config["split_special_tokens"] = bool(self.backend.encode_special_tokens)
            config["clean_up_tokenization_spaces"] = False
            atomic_write_text(file.parent / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return file

    def encode(self, text: str) -> list[int]:
        """The token ids of `text` (no special tokens added): for training data and for
        counting tokens. A prompt to generate from wants `encode_prompt`."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """The token ids of a prompt to generate from: `encode(text)` after the special tokens
        the tokenizer's post-processor puts in front of a text (an imported Mixtral or
        DeepSeek tokenizer's beginning-of-sequence token; nothing for a tokenizer trained
        here). These are the ids `transformers.AutoTokenizer` gives for `tokenizer(text)`,
        except that an end-of-sequence a post-processor would append is left off: it would
        end the text before the continuation starts."""
        return self._prompt_prefix + self.encode(text)

    @property
    def prompt_prefix(self) -> list[int]:
        """The special token ids `encode_prompt` puts in front of every prompt (e.g. an imported
        tokenizer's beginning-of-sequence token); empty for a tokenizer trained here."""
        return list(self._prompt_prefix)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids of each text, encoded in parallel."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids`; `decode(encode(text)) == text` for every string."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are 0 .. vocab_size - 1)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        """The end-of-text token's id; None for a tokenizer without one."""
        return self._eos_id

    def require_eos(self, purpose: str) -> int:
        """`eos_id`, or a ValueError saying that `purpose` needs an end-of-text token."""
        if self._eos_id is None:
            raise ValueError(
                f"this tokenizer has no end-of-text token (tokenizer_config.json names no "
                f"eos_token), and {purpose} needs one: name one there, e.g. "
                '"eos_token": "</s>"'
            )
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence token tokenizer_config.json names (None: it names none,
        as for every tokenizer trained here, or one the vocabulary lacks). Naming it does not
        add it to prompts; the post-processor does (see `encode_prompt`)."""
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _prefix_of(backend: tokenizers.Tokenizer) -> list[int]:
    """The special token ids `backend`'s post-processor puts in front of a single text (its
    template is the same for every text, so one probe finds it)."""
    probe = backend.encode("a", add_special_tokens=True)
    for i, sequence in enumerate(probe.sequence_ids):
        if sequence is not None:  # the text itself starts here
            return list(probe.ids[:i])
    return []  # the probe gave no text token, so prefix and suffix cannot be told apart


def read_special_tokens(config_file: Path) -> dict[str, Any]:
    """The `eos`, `pad`, `bos` and `split_special_tokens` a tokenizer_config.json names (our
    defaults when there is no such file: a tokenizer trained here)."""
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON: {err}") from err

    def token(value: Any) -> str | None:
        if isinstance(value, dict):  # {"content": "</s>", ...}
            value = value.get("content")
        return value if isinstance(value, str) else None

    return {
        "eos": token(config.get("eos_token")),
        "pad": token(config.get("pad_token")),
        "bos": token(config.get("bos_token")),
        "split_special_tokens": bool(config.get("split_special_tokens", False)),
    }


def _file_path(path: Path) -> Path:
    return path if path.suffix == ".json" and not path.is_dir() else path / TOKENIZER_FILE


def default_cache_dir() -> Path:
    """$MOEKIT_CACHE_DIR, else ~/.cache/moekit."""
    env = os.environ.get("MOEKIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moekit"


def long_runs(text: str) -> list[tuple[int, int]]:
    """Where `text` holds runs of more than `MAX_RUN` characters of one kind (letters, digits,
    other symbols, whitespace), as (start, end) spans."""
    if len(text) <= MAX_RUN:
        return []
    # A cheap look first: only a text with a long stretch between spaces, or a long stretch
    # of whitespace, can hold such a run.
    if max(map(len, text.split()), default=0) <= MAX_RUN and not _LONG_SPACE.search(text):
        return []
    return [m.span() for m in _LONG_RUN.finditer(text)]


def cut_long_runs(text: str) -> list[str]:
    """`text` in pieces that together are `text`, cut inside every run of more than `MAX_RUN`
    characters of one kind so that no piece holds such a run; `[text]` when it has none."""
    cuts = [c for start, end in long_runs(text) for c in range(start + MAX_RUN, end, MAX_RUN)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _cut_long_runs(texts: Iterable[str], cut: list[int]) -> Iterator[str]:
    """The pieces of each text (`cut_long_runs`), counting in `cut[0]` the texts cut."""
    for text in texts:
        pieces = cut_long_runs(text)
        cut[0] += len(pieces) > 1
        yield from pieces


def _cut_message(count: int) -> str:
    return (
        f"tokenizer training: {count} text(s) hold a run of more than {MAX_RUN:,} characters "
        f"of one kind (no space or change between letters, digits and symbols); such runs "
        f"are trained on in pieces of {MAX_RUN:,} characters (one piece would take the BPE "
        "trainer minutes)"
    )


def _tell(say: Callable[[str], None] | None, message: str) -> None:
    if say is not None:
        say(message)
    else:
        warnings.warn(message, stacklevel=3)


def get_tokenizer(
    docs: Sequence[Document],
    vocab_size: int,
    cache_dir: Path | None = None,
    *,
    say: Callable[[str], None] | None = None,
    progress: bool = False,
) -> Tokenizer:
    """A tokenizer trained on the texts of `docs`, loaded from the cache when it is there.

    The cache file is `cache_dir / "tokenizers" / KEY.json` (`cache_dir` defaults to
    `default_cache_dir()`), where KEY hashes the documents' fingerprint, `vocab_size` and the
    cache format version (and `MAX_RUN` when some document has a run that long, see
    `Tokenizer.train`). A cache file that cannot be read is replaced by a fresh one. `say`
    hears of long runs cut and of a long training about to start (warnings without it);
    `progress` shows the `tokenizers` library's progress bars.
    """
    texts: list[str] = []
    cut = 0
    for doc in docs:
        pieces = cut_long_runs(doc.text)
        cut += len(pieces) > 1
        texts.extend(pieces)
    key_text = f"v{CACHE_FORMAT_VERSION}:{vocab_size}:{fingerprint(docs)}"
    if cut:  # trained differently from before runs were cut: never the same cache entry
        key_text += f":cut{MAX_RUN}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    file = (cache_dir or default_cache_dir()) / "tokenizers" / f"{key}.json"
    if file.is_file():
        try:
            return Tokenizer.load(file)
        except ValueError:
            pass  # a damaged cache entry is retrained and overwritten below
    if cut:
        _tell(say, _cut_message(cut))
    chars = sum(map(len, texts))
    if chars >= LONG_TRAINING_CHARS and say is not None:
        say(f"training a tokenizer of {vocab_size:,} tokens on {chars:,} characters ...")
    tokenizer = Tokenizer.train(texts, vocab_size, say=say, progress=progress)
    # Several processes may train at once (one per rank); each rename is atomic, so readers see
    # one complete file whichever wins.
    tokenizer.save(file)
    return tokenizer
