"""Documents to train on: the builtin corpus, local files, or a Hugging Face dataset.

Everything ends up as a list of `Document`s (text, domain, source). The domain labels let the
trainer report validation loss per domain and let analysis ask which experts each domain uses;
the source is a stable identifier that decides the train/validation split.

The builtin corpus needs nothing but a Python installation, so the demo runs offline:
  prose       English technical prose: the documentation topics in `pydoc_data` and a few
              English text files shipped with the standard library (IDLE's news, help, notes)
  code        the standard library's own .py files
  arithmetic  generated lines such as "417 + 38 = 455", all correct
  records     generated structured text: JSON lines, key: value blocks, CSV tables
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import random
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.data.config import DataConfig
from moekit.data.token_rows import TokenRow, token_row
from moekit.files import read_jsonl


@dataclass(frozen=True)
class Document:
    """One unit of text: never split across train and validation, packed with an EOS after it.

    `source` is a stable identifier ("pydoc:assignment", "stdlib:json/decoder.py",
    "generated:arithmetic:17", a file path, or "file.jsonl:123"); the split hashes it.
    `tokens`: a document that is already token ids (a .jsonl line with "token_ids", see
    moekit.data.token_rows); its `text` is empty.
    """

    text: str
    domain: str
    source: str
    tokens: TokenRow | None = None


DOMAINS = ("prose", "code", "arithmetic", "records")

# English text files of the standard library, read in this order after the pydoc topics.
# Missing ones are skipped: distributions trim the standard library differently.
_PROSE_FILES = (
    "LICENSE.txt",
    "email/architecture.rst",
    "idlelib/CREDITS.txt",
    "idlelib/ChangeLog",
    "idlelib/HISTORY.txt",
    "idlelib/NEWS.txt",
    "idlelib/NEWS2x.txt",
    "idlelib/README.txt",
    "idlelib/TODO.txt",
    "idlelib/extend.txt",
    "idlelib/help.html",
)

# Folders of the standard library that are not ordinary hand-written code: tests, third-party
# packages, build artefacts, generated codec tables, and pydoc_data (prose in a Python string).
_CODE_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "encodings",
        "idle_test",
        "lib-dynload",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "test",
        "tests",
    }
)
# A few huge files would otherwise fill the code domain on their own; longer files are cut at
# a line boundary so the capped domain covers more of the library.
_MAX_CODE_FILE_CHARS = 40_000


def builtin_corpus(max_chars_per_domain: int = 2_000_000, seed: int = 0) -> list[Document]:
    """Return the builtin corpus: documents of the four `DOMAINS`, in that order.

    Each domain holds at most `max_chars_per_domain` characters (the last document that does
    not fit is cut at a line boundary). The result is the same on every call with the same
    arguments and Python installation: files are read in sorted order and the generated
    domains draw from `random.Random` seeded with `seed` (one stream per domain, so the cap of
    one domain does not change another).
    """
    if (
        isinstance(max_chars_per_domain, bool)
        or not isinstance(max_chars_per_domain, int | float)
        or max_chars_per_domain < 1
    ):
        raise ValueError(
            f"max_chars_per_domain={max_chars_per_domain!r} is invalid: must be a number >= 1"
        )
    cap = int(max_chars_per_domain)  # a JSON config may spell 2e6 as a float
    docs: list[Document] = []
    docs += _take_chars(_prose_documents(), cap)
    docs += _take_chars(_code_documents(), cap)
    docs += _take_chars(_generated("arithmetic", _arithmetic_text, seed), cap)
    docs += _take_chars(_generated("records", _records_text, seed), cap)
    return docs


def _take_chars(docs: Iterable[Document], cap: int) -> list[Document]:
    """Take documents until `cap` characters; cut the first one that does not fit."""
    out: list[Document] = []
    left = cap
    for doc in docs:
        if len(doc.text) <= left:
            out.append(doc)
            left -= len(doc.text)
            continue
        text = _cut_at_line(doc.text, left)
        if text.strip():
            out.append(Document(text=text, domain=doc.domain, source=doc.source))
        break
    return out


def _cut_at_line(text: str, limit: int) -> str:
    head = text[:limit]
    newline = head.rfind("\n")
    return head[: newline + 1] if newline > 0 else head


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _prose_documents() -> Iterator[Document]:
    topics: dict[str, str] = {}
    try:
        from pydoc_data.topics import topics as pydoc_topics

        topics = dict(pydoc_topics)
    except ImportError:  # some distributions ship the standard library without pydoc_data
        pass
    for name in sorted(topics):
        yield Document(text=topics[name], domain="prose", source=f"pydoc:{name}")
    root = _stdlib_dir()
    for rel in _PROSE_FILES:
        text = _read_text(root / rel)
        if text is None:
            continue
        if rel.endswith(".html"):
            text = _html_to_text(text)
        if text.strip():
            yield Document(text=text, domain="prose", source=f"stdlib:{rel}")


def _code_documents() -> Iterator[Document]:
    root = _stdlib_dir()
    for rel in _stdlib_python_files(root):
        text = _read_text(root / rel)
        if text is None or not text.strip():
            continue
        if len(text) > _MAX_CODE_FILE_CHARS:
            text = _cut_at_line(text, _MAX_CODE_FILE_CHARS)
        yield Document(text=text, domain="code", source=f"stdlib:{rel}")


def _stdlib_python_files(root: Path) -> list[str]:
    """Relative POSIX paths of the standard library's own .py files, sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into tests and installed packages.
        dirnames[:] = [
            d for d in dirnames if d not in _CODE_SKIP_DIRS and not d.startswith("config-")
        ]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            # _sysconfigdata holds this machine's build paths, not code worth learning.
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def _read_text(path: Path) -> str | None:
    """The file's UTF-8 text, or None when it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


class _TextExtractor(html.parser.HTMLParser):
    """Collect the text inside a Sphinx page's main block (its menus and footer are noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._depth = 0  # open <div>s since the main block began; 0 outside it
        self._skip = 0  # open <script>/<style> elements

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "div" and (self._depth or ("role", "main") in attrs):
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        elif tag == "div" and self._depth:
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._depth and not self._skip:
            self.parts.append(data.replace("\N{PILCROW SIGN}", ""))


def _html_to_text(source: str) -> str:
    parser = _TextExtractor()
    parser.feed(source)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).splitlines()]
    # Collapse the runs of blank lines that markup leaves behind.
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip() + "\n"


def _generated(domain: str, make: Callable[[random.Random], str], seed: int) -> Iterator[Document]:
    # A string seed gives each domain its own stream; str seeding is stable across Pythons.
    rng = random.Random(f"{seed}:{domain}")
    index = 0
    while True:
        yield Document(text=make(rng), domain=domain, source=f"generated:{domain}:{index}")
        index += 1


# ----------------------------------------------------------------------------- arithmetic
# Every line ends with an equation "<expression> = <value>" whose value is correct under
# Python's integer arithmetic (//, %, * before + and -), so a test can check each one.

_NAMES = (
    "Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena",
    "Mia", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vik", "Wen", "Yara",
)  # fmt: skip
_THINGS = (
    "apples", "marbles", "books", "stamps", "coins", "pencils", "cards", "shells", "bolts",
    "tickets", "eggs", "stickers",
)  # fmt: skip


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _arith_add(rng: random.Random) -> str:
    a, b = _number(rng, 4), _number(rng, 4)
    return f"{a} + {b} = {a + b}"


def _arith_sub(rng: random.Random) -> str:
    a, b = _number(rng, 4), _number(rng, 4)
    return f"{a} - {b} = {a - b}"


def _arith_mul(rng: random.Random) -> str:
    a, b = _number(rng, 3), _number(rng, 2)
    return f"{a} * {b} = {a * b}"


def _arith_div(rng: random.Random) -> str:
    a, b = _number(rng, 4), rng.randint(1, 99)
    return f"{a} // {b} = {a // b}" if rng.random() < 0.5 else f"{a} % {b} = {a % b}"


def _arith_chain(rng: random.Random) -> str:
    a, b, c = _number(rng, 2), _number(rng, 2), _number(rng, 2)
    form = rng.randrange(3)
    if form == 0:
        return f"{a} + {b} * {c} = {a + b * c}"
    if form == 1:
        return f"({a} + {b}) * {c} = {(a + b) * c}"
    return f"{a} * {b} - {c} = {a * b - c}"


def _arith_word(rng: random.Random) -> str:
    name, things = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 99), rng.randint(1, 60)
    form = rng.randrange(4)
    if form == 0:
        return (
            f"{name} has {a} {things} and gets {b} more. "
            f"How many {things} does {name} have now? {a} + {b} = {a + b}"
        )
    if form == 1:
        a, b = max(a, b), min(a, b)
        return f"{name} had {a} {things} and gave away {b}. How many are left? {a} - {b} = {a - b}"
    if form == 2:
        a, b = rng.randint(2, 24), rng.randint(2, 12)
        return f"A box holds {a} {things}. How many {things} are in {b} boxes? {a} * {b} = {a * b}"
    b = rng.randint(2, 9)
    return (
        f"{name} shares {a} {things} equally among {b} friends. "
        f"How many does each friend get? {a} // {b} = {a // b}"
    )


_ARITH_LINES = (_arith_add, _arith_sub, _arith_mul, _arith_div, _arith_chain, _arith_word)


def _arithmetic_text(rng: random.Random) -> str:
    return "".join(rng.choice(_ARITH_LINES)(rng) + "\n" for _ in range(rng.randint(20, 60)))


# ----------------------------------------------------------------------------- records

_SURNAMES = (
    "Abe", "Banda", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Haddad", "Ito", "Jensen",
    "Kim", "Lopez", "Mensah", "Novak", "Okafor", "Petrov", "Quist", "Rossi", "Singh", "Tanaka",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Pune", "Quito", "Tunis", "Perth", "Riga",
    "Accra", "Hanoi", "Bogota", "Dublin", "Krakow", "Denver",
)  # fmt: skip
_JOBS = (
    "engineer", "teacher", "nurse", "baker", "pilot", "designer", "farmer", "librarian",
    "chemist", "carpenter", "analyst", "chef",
)  # fmt: skip
_ADJECTIVES = ("steel", "wooden", "compact", "deluxe", "solar", "folding", "ceramic", "smart")
_PRODUCTS = ("kettle", "lamp", "chair", "drill", "backpack", "clock", "speaker", "bottle")
_CATEGORIES = ("kitchen", "home", "tools", "outdoor", "electronics")
_STATUSES = ("pending", "shipped", "delivered", "returned")


def _person(rng: random.Random, index: int) -> dict[str, Any]:
    first, last = rng.choice(_NAMES), rng.choice(_SURNAMES)
    return {
        "id": 1000 + index,
        "name": f"{first} {last}",
        "age": rng.randint(18, 90),
        "city": rng.choice(_CITIES),
        "occupation": rng.choice(_JOBS),
        "email": f"{first.lower()}.{last.lower()}@example.com",
    }


def _product(rng: random.Random, index: int) -> dict[str, Any]:
    return {
        "sku": f"SKU-{rng.randint(10000, 99999)}",
        "name": f"{rng.choice(_ADJECTIVES)} {rng.choice(_PRODUCTS)}",
        "category": rng.choice(_CATEGORIES),
        "price": f"{rng.randint(1, 500)}.{rng.randint(0, 99):02d}",
        "stock": rng.randint(0, 250),
    }


def _order(rng: random.Random, index: int) -> dict[str, Any]:
    cents = rng.randint(100, 50_000)
    quantity = rng.randint(1, 12)
    total = cents * quantity
    return {
        "order_id": f"ORD-{rng.randint(100000, 999999)}",
        "customer": f"{rng.choice(_NAMES)} {rng.choice(_SURNAMES)}",
        "item": f"{rng.choice(_ADJECTIVES)} {rng.choice(_PRODUCTS)}",
        "quantity": quantity,
        "unit_price": f"{cents // 100}.{cents % 100:02d}",
        "total": f"{total // 100}.{total % 100:02d}",
        "date": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "status": rng.choice(_STATUSES),
    }


_RECORD_KINDS = (_person, _product, _order)


def _records_text(rng: random.Random) -> str:
    make = rng.choice(_RECORD_KINDS)
    records = [make(rng, i) for i in range(rng.randint(5, 20))]
    layout = rng.randrange(3)
    if layout == 0:  # JSON lines
        return "".join(json.dumps(r) + "\n" for r in records)
    if layout == 1:  # key: value blocks separated by blank lines
        return "\n".join("".join(f"{k}: {v}\n" for k, v in r.items()) for r in records)
    header = ",".join(records[0])  # CSV table
    return header + "\n" + "".join(",".join(str(v) for v in r.values()) + "\n" for r in records)


# ----------------------------------------------------------------------------- user data


def load_documents(cfg: DataConfig) -> list[Document]:
    """Return the non-empty documents named by `cfg.source` (see `DataConfig`).

    `cfg.source` is "builtin", "hf:NAME" / "hf:NAME:CONFIG", or comma-separated paths of .txt
    files, folders (every *.txt below them), .jsonl and .parquet files; items of these kinds
    may be mixed in one comma-separated list. Raises FileNotFoundError for a missing path,
    ValueError for an unsupported file type, a malformed JSON line or a missing field (naming
    the file and line), and ValueError when no non-empty document remains.
    """
    docs: list[Document] = []
    for item in (part.strip() for part in cfg.source.split(",")):
        if not item:
            continue
        if item == "builtin":
            docs += builtin_corpus(cfg.max_chars_per_domain, cfg.seed)
        elif item.startswith("hf:"):
            docs += _load_hf(item, cfg)
        else:
            docs += _load_path(Path(item).expanduser(), cfg)
    docs = [d for d in docs if d.text.strip() or d.tokens is not None]
    if not docs:
        raise ValueError(f"DataConfig.source={cfg.source!r} yielded no non-empty documents")
    return docs


def _load_path(path: Path, cfg: DataConfig) -> list[Document]:
    if not path.exists():
        raise FileNotFoundError(f"data source {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"data folder {str(path)!r} contains no .txt files")
        # Sources name files relative to the folder given, so the split and the caches do not
        # depend on how its path was spelled (relative, absolute, through a link).
        return [
            _load_txt(p, f"{path.resolve().name}/{p.relative_to(path).as_posix()}") for p in files
        ]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [_load_txt(path, path.name)]
    if suffix == ".jsonl":
        return _load_jsonl(path, cfg)
    if suffix == ".parquet":
        from datasets import load_dataset  # optional dependency, heavy to import

        dataset = load_dataset("parquet", data_files=str(path), split="train")
        return _from_dataset(
            dataset, cfg, source=path.name, domain=_folder_domain(path), where=str(path)
        )
    raise ValueError(
        f"data source {str(path)!r} has unsupported type {suffix or '(no extension)'!r}: "
        "use .txt, .jsonl, .parquet, a folder of .txt files, 'builtin' or 'hf:NAME'"
    )


def _folder_domain(path: Path) -> str:
    return path.resolve().parent.name or "default"


def _load_txt(path: Path, source: str) -> Document:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {err}") from err
    return Document(text=text, domain=_folder_domain(path), source=source)


def _load_jsonl(path: Path, cfg: DataConfig) -> list[Document]:
    docs: list[Document] = []
    fallback_domain = _folder_domain(path)
    for lineno, where, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        source = f"{path.name}:{lineno}"
        if "token_ids" in row:  # already tokens: the domain, and no text
            tokens = token_row(row, where, also=[cfg.domain_field])
            _, domain = _fields({**row, cfg.text_field: ""}, cfg, where, fallback_domain)
            docs.append(Document(text="", domain=domain, source=source, tokens=tokens))
            continue
        if "routed_experts" in row:
            raise ValueError(
                f"{where}: 'routed_experts' needs 'token_ids' (a routing is one row per token, "
                "and text may tokenize otherwise than the tokens it was recorded on)"
            )
        text, domain = _fields(row, cfg, where, fallback_domain)
        docs.append(Document(text=text, domain=domain, source=source))
    return docs


def _fields(row: dict[str, Any], cfg: DataConfig, where: str, fallback: str) -> tuple[str, str]:
    """The (text, domain) of one row, with errors that name the row and the field."""
    if cfg.text_field not in row:
        raise ValueError(
            f"{where}: missing text field {cfg.text_field!r} (DataConfig.text_field); "
            f"fields present: {', '.join(sorted(row)) or 'none'}"
        )
    text = row[cfg.text_field]
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {cfg.text_field!r} is {type(text).__name__}, not text")
    if cfg.domain_field is None:
        return text, fallback
    if cfg.domain_field not in row or row[cfg.domain_field] is None:
        raise ValueError(
            f"{where}: missing domain field {cfg.domain_field!r} (DataConfig.domain_field); "
            f"fields present: {', '.join(sorted(row)) or 'none'}"
        )
    return text, str(row[cfg.domain_field])


def _from_dataset(
    dataset: Any, cfg: DataConfig, *, source: str, domain: str, where: str | None = None
) -> list[Document]:
    """Documents from a `datasets.Dataset`, one per row; row i's source is f"{source}:{i}"
    (errors name `where`, the file, when given)."""
    where = where or source
    columns = list(dataset.column_names)
    for field, name in ((cfg.text_field, "text_field"), (cfg.domain_field, "domain_field")):
        if field is not None and field not in columns:
            kind = name.removesuffix("_field")
            raise ValueError(
                f"{where}: missing {kind} field {field!r} (DataConfig.{name}); "
                f"columns present: {', '.join(columns) or 'none'}"
            )
    # Whole columns at once: converting row by row is slow for large datasets.
    texts = list(dataset[cfg.text_field])
    domains = list(dataset[cfg.domain_field]) if cfg.domain_field else [domain] * len(texts)
    docs: list[Document] = []
    for i, (text, dom) in enumerate(zip(texts, domains, strict=True)):
        row = {cfg.text_field: text} | ({cfg.domain_field: dom} if cfg.domain_field else {})
        text, dom = _fields(row, cfg, f"{where}:{i}", domain)
        docs.append(Document(text=text, domain=dom, source=f"{source}:{i}"))
    return docs


def _load_hf(item: str, cfg: DataConfig) -> list[Document]:
    name, _, config = item.removeprefix("hf:").partition(":")
    if not name:
        raise ValueError(f"DataConfig.source item {item!r} is invalid: expected 'hf:NAME[:CONFIG]'")
    from datasets import load_dataset  # optional dependency, heavy to import

    # NAME may also be a local folder of data files, which `datasets` reads without a network.
    dataset = load_dataset(name, config or None, split=cfg.hf_split)
    domain = Path(name).name or name
    return _from_dataset(dataset, cfg, source=item, domain=domain)


# ----------------------------------------------------------------------------- split, hash


def split_documents(
    docs: Sequence[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split whole documents into (train, validation), each in the order of `docs`.

    A document goes to validation when a hash of (seed, source) falls below `val_fraction`, so
    its side does not depend on the order or the number of other documents. When
    `val_fraction > 0`, every domain with at least two documents keeps at least one on each
    side: if the hash left a side empty, the document of that domain whose hash is closest to
    the threshold moves over.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
    score = {d.source: _unit_hash(seed, d.source) for d in docs}
    is_val = {d.source: score[d.source] < val_fraction for d in docs}
    if val_fraction > 0:
        by_domain: dict[str, dict[str, None]] = {}  # domain -> its sources, in order
        for d in docs:
            by_domain.setdefault(d.domain, {})[d.source] = None
        for sources in by_domain.values():
            if len(sources) < 2:
                continue
            if not any(is_val[s] for s in sources):
                is_val[min(sources, key=lambda s: (score[s], s))] = True
            if all(is_val[s] for s in sources):
                is_val[max(sources, key=lambda s: (score[s], s))] = False
    train = [d for d in docs if not is_val[d.source]]
    val = [d for d in docs if is_val[d.source]]
    return train, val


def _unit_hash(seed: int, source: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fingerprint(docs: Iterable[Document]) -> str:
    """A sha256 hex digest of the documents' sources and texts (or token ids), in order (a
    cache key)."""
    h = hashlib.sha256()
    for doc in docs:
        for part in (doc.source, doc.text if doc.tokens is None else doc.tokens.key()):
            data = part.encode("utf-8", "surrogatepass")
            # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()
