"""Check moekit's GGUF files in llama.cpp itself: greedy text equal to `moekit generate`.

    python examples/llama_cpp_check.py LLAMA_CPP_BIN_DIR [MODEL_DIR ...] [--types f32 q8_0]

For each family llama.cpp runs (Mixtral as llama, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3,
dots.llm1, gpt-oss, Llama 4) a tiny random model is built with transformers and imported (plus
every MODEL_DIR given, e.g. the trained demo model); each is written as GGUF in every type asked
for, run by `llama-simple` (greedy), and its continuation compared with moekit's greedy
continuation of the same prompt from the same weights (for quantised types: from the GGUF file
read back, i.e. the same quantised weights). With `llama-tokenize` in the same directory,
tokenizers with each pre-tokenizer moekit names in GGUF files (gpt-2, olmo, qwen2, llama-bpe,
gpt-4o, deepseek-v3) are also checked to encode texts to the same ids in llama.cpp as in moekit.
Not part of the test suite: it needs a llama.cpp build.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from moekit.data.tokenizer import Tokenizer
from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.interop.gguf import export_gguf, import_gguf
from moekit.interop.hf import import_hf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))
from test_gguf import FAMILIES, TEXT, random_model, split_tokenizer  # the GGUF tests' models

PROMPT = "The quick brown"
TINY = {name: (cls, fields) for name, (cls, fields, _) in FAMILIES.items()}
# RoPE scaling: YaRN (with DeepSeek's magnitude correction) and linear.
_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
TINY["qwen3_moe-yarn"] = (
    TINY["qwen3_moe"][0],
    {**TINY["qwen3_moe"][1], "rope_parameters": {**_YARN, "rope_theta": 1e6}},
)
TINY["deepseek_v3-yarn"] = (
    TINY["deepseek_v3"][0],
    {
        **TINY["deepseek_v3"][1],
        "rope_parameters": {**_YARN, "rope_theta": 1e4, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
)
# gpt-oss with sliding-window attention on the second layer, not llama.cpp's default first.
TINY["gpt_oss-layers"] = (
    TINY["gpt_oss"][0],
    {**TINY["gpt_oss"][1], "layer_types": ["full_attention", "sliding_attention"]},
)
# Llama 3 RoPE scaling (a rope_freqs tensor in the file), 60 tokens past the pretrained 32.
_LLAMA3 = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=32)  # fmt: skip
TINY["mixtral-llama3"] = (TINY["mixtral"][0], {**TINY["mixtral"][1], "rope_parameters": _LLAMA3})
TINY["llama4_text-llama3"] = (
    TINY["llama4_text"][0],
    {**TINY["llama4_text"][1], "rope_parameters": _LLAMA3},
)
TINY["mixtral-linear"] = (TINY["mixtral"][0], {**TINY["mixtral"][1], "rope_parameters": {
    "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})  # fmt: skip


TOKENIZER_TEXTS = ["I'll pay 12345 dollars.\n\n  We'VE 3.14 cafés", "a\r\nb\tc   d   e",
                   "def add(a, b):\n    return a + b\n", "Ünïcödé 🦙 x1234y",
                   "CamelCaseWord O'Neil's HTTPServer we'LL",
                   "数字12345和日本語テキスト, Ωmega!! (x)"]  # fmt: skip


def check_tokenizers(bin_dir: Path, root: Path) -> int:
    """Encode texts with llama-tokenize from GGUF files of each pre-tokenizer; the failures."""
    failures = 0
    for pre in ("gpt-2", "olmo", "qwen2", "llama-bpe", "gpt-4o", "deepseek-v3"):
        tok = Tokenizer.train([TEXT], 300) if pre == "gpt-2" else split_tokenizer(pre)
        model_dir = tiny_model("qwen3_moe", root / f"tok-{pre}", tok)
        gguf_file = root / f"tok-{pre}.gguf"
        export_gguf(model_dir, gguf_file, type="f32")
        ours = Tokenizer.load(model_dir)
        same = 0
        for text in TOKENIZER_TEXTS:
            (root / "prompt.txt").write_text(text)
            run = subprocess.run(
                [str(bin_dir / "llama-tokenize"), "-m", str(gguf_file), "-f",
                 str(root / "prompt.txt"), "--ids", "--log-disable", "--no-bos"],
                capture_output=True, text=True, timeout=120, check=True,
            )  # fmt: skip
            same += eval(run.stdout.strip().splitlines()[-1]) == ours.encode(text)
        failures += same != len(TOKENIZER_TEXTS)
        print(f"tokenizer {pre:>9}: {same} of {len(TOKENIZER_TEXTS)} texts encode the same")
    return failures


def tiny_model(name: str, root: Path, tok: Tokenizer | None = None) -> Path:
    import transformers

    tok = tok or Tokenizer.train([TEXT], 300)
    cls, fields = TINY[name]
    common = dict(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, initializer_range=0.2,
                  tie_word_embeddings=False)  # fmt: skip
    config = getattr(transformers, cls)(**{**common, **fields})
    random_model(config).save_pretrained(root / "hf")
    tok.save(root / "hf")
    import_hf(root / "hf", root / "moekit")
    # transformers' default special ids (e.g. DeepSeek's eos 1) mean nothing to this tokenizer.
    (root / "moekit" / "generation_config.json").unlink(missing_ok=True)
    return root / "moekit"


def _byte_of() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the printable bytes stand for
    themselves, the others are shifted past 255)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in keep]
    table = {chr(b): b for b in keep}
    table |= {chr(256 + n): b for n, b in enumerate(shifted)}
    return table


def ours(model_dir: Path, tokens: int) -> bytes:
    """The bytes of moekit's greedy continuation (random models emit partial characters)."""
    generator = Generator.from_dir(model_dir, device="cpu")
    params = SamplingParams(temperature=0, max_new_tokens=tokens)  # llama-simple stops at EOS
    ids = generator.generate([PROMPT], params)[0].token_ids
    byte_of, backend = _byte_of(), generator.tokenizer.backend
    eos = generator.tokenizer.eos_id
    pieces = [bytes(byte_of[c] for c in backend.id_to_token(i)) for i in ids if i != eos]
    # llama-simple prints each piece as a C string: a NUL byte prints nothing.
    return b"".join(pieces).replace(b"\x00", b"")


def theirs(bin_dir: Path, gguf_file: Path, tokens: int) -> bytes:
    run = subprocess.run(
        [str(bin_dir / "llama-simple"), "-m", str(gguf_file), "-n", str(tokens), PROMPT],
        capture_output=True, timeout=300, check=True,
    )  # fmt: skip
    return run.stdout.removeprefix(PROMPT.encode()).removesuffix(b"\n")  # it ends the line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bin_dir", type=Path)
    parser.add_argument("model_dirs", nargs="*", type=Path)
    parser.add_argument("--types", nargs="+", default=["f32", "q8_0"])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--families", nargs="*", help="only these tiny families (default: all)")
    args = parser.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        only = [n for n in TINY if not args.families or n in args.families]
        models = {name: tiny_model(name, root / name) for name in only}
        models |= {str(d): d for d in args.model_dirs}
        for label, model_dir in models.items():
            for kind in args.types:
                gguf_file = root / f"{Path(label).name}-{kind}.gguf"
                result = export_gguf(model_dir, gguf_file, type=kind)
                same_weights = model_dir
                if kind != "f32":  # the quantised weights themselves, read back
                    same_weights = import_gguf(gguf_file, root / f"{gguf_file.stem}-back").path
                a, b = ours(same_weights, args.tokens), theirs(args.bin_dir, gguf_file, args.tokens)
                pairs = enumerate(zip(a, b, strict=False))
                agree = next((n for n, (x, y) in pairs if x != y), min(len(a), len(b)))
                same = a == b
                failures += kind == "f32" and not same
                verdict = "same" if same else f"first {agree} of {len(a)} bytes agree"
                print(f"{Path(label).name:>10} {result.architecture:>9} {kind:>5}: {verdict}")
        if (args.bin_dir / "llama-tokenize").is_file():
            failures += check_tokenizers(args.bin_dir, root)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
