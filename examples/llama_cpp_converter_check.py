"""Compare `moekit convert --to-gguf` with llama.cpp's own converter on the same checkpoint.

    python examples/llama_cpp_converter_check.py LLAMA_CPP_SOURCE_DIR [FAMILY ...]

For each family (qwen3_moe, qwen2_moe, olmoe, deepseek_v3, deepseek_v2, dots1, gpt_oss,
llama4_text; mixtral too when the `sentencepiece` package is installed, which llama.cpp's
converter tries first for it) a tiny random transformers checkpoint with a moekit-trained
tokenizer is imported into moekit and written as GGUF, and the same transformers checkpoint is
converted by llama.cpp's `convert_hf_to_gguf.py` (run from the llama.cpp source tree, in a
subprocess). That converter identifies a BPE pre-tokenizer by hashing the ids a fixed text
encodes to, which no newly trained vocabulary matches, so for this comparison its lookup is
answered "gpt-2" (what moekit states). The script prints whether tensor names, shapes, types and
bytes are identical and every metadata key whose value differs. Not part of the test suite: it
needs llama.cpp's source.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RUN_CONVERTER = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def compare(family: str, root: Path, llama_cpp: Path) -> bool:
    import gguf

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))
    import test_gguf as families  # the tiny checkpoints the GGUF tests use

    from moekit.data.tokenizer import Tokenizer
    from moekit.interop.gguf import export_gguf

    model_dir = families.make_model(family, root, Tokenizer.train([families.TEXT], 300))
    export_gguf(model_dir, root / "moekit.gguf", type="f32")
    run = subprocess.run(
        [sys.executable, "-c", RUN_CONVERTER, str(llama_cpp), str(root / "hf"),
         "--outfile", str(root / "llama.cpp.gguf"), "--outtype", "f32"],
        capture_output=True, text=True,
    )  # fmt: skip
    if run.returncode:
        print(f"== {family}: llama.cpp's converter failed: {run.stderr.strip().splitlines()[-1]}")
        return False
    ours, theirs = gguf.GGUFReader(root / "moekit.gguf"), gguf.GGUFReader(root / "llama.cpp.gguf")
    a = {t.name: t for t in ours.tensors}
    b = {t.name: t for t in theirs.tensors}
    same_names = set(a) == set(b)
    same = same_names and all(
        tuple(a[k].shape) == tuple(b[k].shape)
        and a[k].tensor_type == b[k].tensor_type
        and np.array_equal(np.asarray(a[k].data), np.asarray(b[k].data))
        for k in a
    )
    print(f"== {family}: {len(a)} tensors; names, shapes, types and bytes identical: {same}")
    fa, fb = fields(ours), fields(theirs)
    for key in sorted(set(fa) | set(fb)):
        if key.startswith("general.") and key not in ("general.architecture", "general.file_type"):
            continue
        va, vb = fa.get(key, "<absent>"), fb.get(key, "<absent>")
        if va != vb:
            show = [v if not isinstance(v, list) else f"list of {len(v)}" for v in (va, vb)]
            print(f"   {key}: moekit={show[0]!r} llama.cpp={show[1]!r}")
    return same


def main() -> int:
    llama_cpp = Path(sys.argv[1])
    names = sys.argv[2:] or [
        "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "deepseek_v2", "dots1", "gpt_oss",
        "llama4_text",
    ]  # fmt: skip
    failures = 0
    for family in names:
        root = Path(tempfile.mkdtemp())
        try:
            failures += not compare(family, root, llama_cpp)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
