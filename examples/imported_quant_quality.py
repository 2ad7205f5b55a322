"""Quantisation quality on a checkpoint imported from Hugging Face, end to end.

    python examples/imported_quant_quality.py WORK_DIR [--hf-dir HF_CHECKPOINT]
        [--family qwen3_moe|olmoe|mixtral] [--steps N] [--tokenizer MOEKIT_DIR]

With `--hf-dir`, the checkpoint given (a published one, for example) is measured. Without it,
one is made first: a small MoE of `--family` is built and trained by transformers itself (its
own model code, initialisation, router and load-balancing loss, AdamW) on the builtin corpus
for `--steps` steps, and saved with `save_pretrained`, so that the weights come from another
codebase's training, not from moekit's.

Then, as a user would: `moekit convert --from-hf` imports it (float32), `moekit bench quant`
measures int8 and int4 experts against it (validation loss on the builtin corpus' held-out
split, next-token and greedy agreement), `moekit compare-routing` reports per-layer routing
parity of the int4 model against float32, and `moekit convert --from-hf --quantize 4` (the
import that never holds the float model) is checked to give the same int4 model as quantising
after the import. Results are printed and written to WORK_DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MOEKIT = [sys.executable, "-m", "moekit"]


def _run(*args: str) -> str:
    print("$ moekit", " ".join(args), flush=True)
    return subprocess.run([*MOEKIT, *args], check=True, capture_output=True, text=True).stdout


def _hf_config(family: str, vocab: int):  # a transformers config
    """A small MoE of `family` (4 layers, dim 192, 8 experts of hidden 384, top-2)."""
    import transformers

    common = dict(
        vocab_size=vocab, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False, output_router_logits=True,
        router_aux_loss_coef=0.01,
    )  # fmt: skip
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, intermediate_size=768, moe_intermediate_size=384, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, head_dim=32, decoder_sparse_step=1,
        )  # fmt: skip
    if family == "olmoe":
        return transformers.OlmoeConfig(
            **common, intermediate_size=384, num_experts=8, num_experts_per_tok=2
        )
    if family == "mixtral":
        return transformers.MixtralConfig(
            **common, intermediate_size=384, num_local_experts=8, num_experts_per_tok=2
        )
    raise SystemExit(f"unknown family {family!r}: qwen3_moe, olmoe or mixtral")


def train_with_transformers(out: Path, family: str, steps: int, tokenizer_dir: Path) -> dict:
    """Train a small `family` MoE with transformers on the builtin corpus; save it to `out`
    with the tokenizer of `tokenizer_dir` (a moekit model directory), exported through
    `moekit convert --to-hf`."""
    import transformers

    from moekit.data.config import DataConfig
    from moekit.data.loader import prepare_data
    from moekit.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    _, packed = prepare_data(DataConfig(), tok.vocab_size, 256, tokenizer=tok)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(family, tok.vocab_size))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        rows = packed.train[torch.randint(len(packed.train), (16,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"  transformers step {step}: loss {loss.item():.4f}", flush=True)
    model.save_pretrained(out)
    exported = out.parent / "tokenizer-export"
    shutil.rmtree(exported, ignore_errors=True)
    _run("convert", "--to-hf", str(tokenizer_dir), "--out", str(exported))
    for f in exported.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    shutil.rmtree(exported)
    return {
        "family": family,
        "steps": steps,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_train_loss": sum(losses[-20:]) / min(20, len(losses)),
    }


def same_int4(a: Path, b: Path) -> bool:
    """Whether two model directories hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    def state(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = state(a), state(b)
    if not x:
        raise SystemExit(f"{a}: no weights to compare")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work_dir", type=Path)
    ap.add_argument("--hf-dir", type=Path, help="a Hugging Face checkpoint to measure")
    ap.add_argument("--family", default="qwen3_moe", help="without --hf-dir: what to train")
    ap.add_argument("--steps", type=int, default=400, help="without --hf-dir: training steps")
    ap.add_argument(
        "--tokenizer",
        type=Path,
        default=Path("runs/demo"),
        help="without --hf-dir: a moekit model directory whose tokenizer to use",
    )
    args = ap.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    hf = args.hf_dir
    if hf is None:
        hf = work / f"hf-{args.family}"
        shutil.rmtree(hf, ignore_errors=True)
        results["trained"] = train_with_transformers(hf, args.family, args.steps, args.tokenizer)
    imported, direct = work / "imported", work / "imported-int4"
    for d in (imported, direct, work / "quantised-int4"):
        shutil.rmtree(d, ignore_errors=True)
    _run("convert", "--from-hf", str(hf), "--out", str(imported))
    results["bench_quant"] = json.loads(_run("bench", "quant", str(imported), "--json"))
    _run("quantize", str(imported), "--bits", "4", "--out", str(work / "quantised-int4"))
    _run("convert", "--from-hf", str(hf), "--out", str(direct), "--quantize", "4")
    results["import_quantised_equals_quantise_after"] = same_int4(direct, work / "quantised-int4")
    results["routing_int4_vs_float32"] = json.loads(
        _run("compare-routing", str(imported), str(direct), "--json")
    )
    (work / "results.json").write_text(json.dumps(results, indent=2))
    for row in results["bench_quant"]["rows"]:
        print(
            f"{row['name']:>9}: val loss {row['val_loss']:.4f}, next-token agreement "
            f"{row['top1_agreement']:.1%}, greedy agreement {row['greedy_agreement']:.1%}"
        )
    print("import with --quantize 4 == quantise after import:",
          results["import_quantised_equals_quantise_after"])  # fmt: skip
    print(f"written: {work / 'results.json'}")


if __name__ == "__main__":
    main()
