import json
import random

import pytest

# Small, fast fine-tuning runs on the tiny model directory (vocabulary 512, 8 experts).
FAST = [
    "train.max_steps=6",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.warmup_steps=1",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.log_every=1",
    "train.save_every=3",
    "train.sample_tokens=4",
    "train.lr=1e-2",
]


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    """Addition problems as prompt/completion pairs and as chat messages."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sft") / "data.jsonl"
    rows = []
    for i in range(48):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        if i % 2:
            rows.append({"prompt": f"{a} + {b} = ", "completion": str(a + b)})
        else:
            rows.append({"messages": [{"role": "user", "content": f"add {a} and {b}"},
                                      {"role": "assistant", "content": str(a + b)}]})  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def digest(directory):
    """Each file's sha256 in `directory`: equal before and after means nothing was touched."""
    import hashlib

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.iterdir()
        if p.is_file()
    }
