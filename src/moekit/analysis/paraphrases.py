"""Pairs of prompts that mean the same, for the consistency analysis.

The builtin pairs are short and varied on purpose: questions and statements about Python in
English, the same code written two ways, the same sum written in digits and in words, the same
record in two layouts. They resemble the builtin training corpus (technical prose, Python,
arithmetic, records) so a model trained on it has seen their kind of text. A user file adds
pairs of its own: one JSON object per line, {"a": "...", "b": "..."} and optionally
"category".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moekit.files import read_jsonl


@dataclass(frozen=True)
class ParaphrasePair:
    """Two prompts that mean the same; `category` groups pairs in the report."""

    a: str
    b: str
    category: str = "user"


_BUILTIN: tuple[tuple[str, str, str], ...] = (
    # Questions and statements about Python, in two phrasings.
    ("prose", "How do I open a file for reading in Python?",
     "What is the way to read a file in Python?"),
    ("prose", "The list is sorted in place by the sort method.",
     "Calling sort on a list reorders its elements without making a copy."),
    ("prose", "A dictionary maps keys to values.",
     "A dict stores values that are looked up by their keys."),
    ("prose", "The loop stops when the condition becomes false.",
     "Iteration ends as soon as the condition is no longer true."),
    ("prose", "Exceptions are raised when an error occurs.",
     "When something goes wrong, an exception is thrown."),
    ("prose", "What does the return statement do?",
     "Explain what happens when a function executes return."),
    ("prose", "Strings in Python cannot be changed after they are created.",
     "A Python string is immutable: it can not be modified once made."),
    ("prose", "The with statement closes the file automatically.",
     "Using with, the file gets closed for you at the end of the block."),
    ("prose", "Is it possible to import a module only once?",
     "Can a module be imported a single time?"),
    ("prose", "Tuples are like lists, but they are immutable.",
     "A tuple resembles a list except that it cannot be changed."),
    # The same code in two spellings.
    ("code", "def add(a, b):\n    return a + b\n", "add = lambda a, b: a + b\n"),
    ("code", "for i in range(10):\n    print(i)\n",
     "i = 0\nwhile i < 10:\n    print(i)\n    i += 1\n"),
    ("code", "squares = [x * x for x in items]\n",
     "squares = []\nfor x in items:\n    squares.append(x * x)\n"),
    ("code", "if not values:\n    return None\n", "if len(values) == 0:\n    return None\n"),
    ("code", "with open(path) as f:\n    data = f.read()\n",
     "f = open(path)\ndata = f.read()\nf.close()\n"),
    ("code", "total = sum(numbers)\n", "total = 0\nfor n in numbers:\n    total += n\n"),
    ("code", "name = user.get('name', 'anonymous')\n",
     "if 'name' in user:\n    name = user['name']\nelse:\n    name = 'anonymous'\n"),
    ("code", "raise ValueError('bad input')\n", "raise ValueError(\"bad input\")\n"),
    ("code", "import os.path\nos.path.join(a, b)\n", "from os import path\npath.join(a, b)\n"),
    ("code", "result = x if x > 0 else -x\n", "result = abs(x)\n"),
    # The same arithmetic in symbols and in words.
    ("arithmetic", "12 + 7 = 19", "twelve plus seven equals nineteen"),
    ("arithmetic", "45 - 18 = 27", "Forty-five minus eighteen is twenty-seven."),
    ("arithmetic", "6 * 8 = 48", "six times eight makes forty-eight"),
    ("arithmetic", "100 // 4 = 25", "One hundred divided by four gives 25."),
    ("arithmetic", "Ada has 3 apples and buys 5 more, so she has 8 apples.",
     "Ada had three apples, bought five, and now owns eight."),
    ("arithmetic", "(2 + 3) * 4 = 20", "2 plus 3, times 4, equals 20"),
    ("arithmetic", "417 + 38 = 455", "38 + 417 = 455"),
    # One record in two layouts.
    ("records", '{"name": "Hana", "age": 31, "city": "Oslo"}',
     "name: Hana\nage: 31\ncity: Oslo\n"),
    ("records", "id,product,price\n7,stamps,2.50\n",
     '{"id": 7, "product": "stamps", "price": 2.5}'),
    ("records", "order: 1042\nitems: 3\ntotal: 19.99\n",
     '{"order": 1042, "items": 3, "total": 19.99}'),
    ("records", '{"name": "Omar", "email": "omar@example.com"}',
     "name,email\nOmar,omar@example.com\n"),
    ("records", "city: Lima\ncountry: Peru\n", "country: Peru\ncity: Lima\n"),
)  # fmt: skip


def builtin_pairs() -> list[ParaphrasePair]:
    """The builtin paraphrase pairs (32 of them, in four categories)."""
    return [ParaphrasePair(a=a, b=b, category=c) for c, a, b in _BUILTIN]


def load_pairs(path: str | Path) -> list[ParaphrasePair]:
    """Read pairs from a .jsonl file: one {"a": ..., "b": ...} object per line ("category"
    optional, default "user"; blank lines skipped). Raises FileNotFoundError for a missing
    file and ValueError naming the line for malformed JSON, a missing or empty field, or a
    file without pairs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paraphrase file {str(path)!r} does not exist")
    pairs: list[ParaphrasePair] = []
    for _, where, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with 'a' and 'b', got {row!r:.60}")
        for key in ("a", "b"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: field {key!r} must be a non-empty string")
        category = str(row.get("category", "user"))
        pairs.append(ParaphrasePair(a=row["a"], b=row["b"], category=category))
    if not pairs:
        raise ValueError(f"paraphrase file {str(path)!r} holds no pairs")
    return pairs
