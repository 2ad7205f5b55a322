"""The exported PEFT adapter, loaded by the PEFT library onto the transformers model of the
exported base, gives the logits of moekit's base + adapter."""

import json
import warnings

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.finetune.lora import LoRAConfig, adapter_modules, apply_lora, save_adapter
from moekit.finetune.peft import PEFT_CONFIG, PEFT_WEIGHTS, export_peft
from moekit.interop.hf import export_hf
from moekit.model_dir import save_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
            max_seq_len=64)  # fmt: skip
MOE = dict(num_experts=4, top_k=2, expert_hidden=16)
CASES = {
    "mixtral": (dict(BASE), dict(MOE), ["*.attn.w*", "*.ffn.experts.*", "*.ffn.router"], [0, 2, 3]),
    "qwen2-moe-shared": (
        dict(BASE, attention=dict(qkv_bias=True)),
        dict(MOE, num_shared_experts=1, shared_expert_hidden=24, shared_expert_gate=True),
        ["*.attn.w*", "*.ffn.experts.*", "*.ffn.shared.*"],
        None,
    ),
    "experts-down-only": (dict(BASE), dict(MOE), ["*.ffn.experts.w_down"], None),
    "experts-up-only": (dict(BASE), dict(MOE), ["*.ffn.experts.w_up"], None),
}


def _peft_can_target_stacked_experts() -> bool:
    from peft import LoraConfig

    return "target_parameters" in LoraConfig.__dataclass_fields__


@pytest.mark.skipif(
    not _peft_can_target_stacked_experts(),
    reason="the installed PEFT cannot target stacked expert weights (needs target_parameters)",
)
@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_adapter_with_matching_logits(tmp_path, case):
    base, moe, targets, experts = CASES[case]
    cfg = ModelConfig.from_dict({**base, "moe": moe})
    model = build_model(cfg, seed=0).eval()
    save_model(model, cfg, tmp_path / "base")
    arch = export_hf(tmp_path / "base", tmp_path / "base-hf")
    lora = LoRAConfig(rank=4, alpha=8, targets=targets, experts=experts)
    apply_lora(model, lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, adapter in adapter_modules(model):
            adapter.A.copy_(torch.randn(adapter.A.shape, generator=gen) * 0.2)
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=gen) * 0.2)
    save_adapter(model, lora, tmp_path / "adapter")
    done = export_peft(tmp_path / "adapter", tmp_path / "peft", base_model_name_or_path="base-hf")
    assert (tmp_path / "peft" / PEFT_WEIGHTS).is_file()
    meta = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4
    assert done.out == tmp_path / "peft" and done.architecture == arch
    assert (done.target_modules, done.target_parameters) == (
        meta["target_modules"],
        meta["target_parameters"],
    )

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf").eval()
    assert type(hf).__name__ == arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about rank_pattern keys it did apply
        tuned = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ours = model(tokens).logits
        theirs = tuned(tokens).logits
        with tuned.disable_adapter():
            plain = tuned(tokens).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the model ...
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)  # ... in the same way


def test_unsupported_exports_are_named(tmp_path):
    cfg = ModelConfig.from_dict(dict(BASE, num_kv_heads=4, moe=dict(MOE),
                                     attention=dict(kind="mla", kv_lora_rank=8, qk_nope_head_dim=8,
                                                    qk_rope_head_dim=4, v_head_dim=8)))  # fmt: skip
    model = build_model(cfg)
    lora = LoRAConfig(targets=["*.ffn.experts.*"])
    apply_lora(model, lora)
    save_adapter(model, lora, tmp_path / "adapter")
    with pytest.raises(ValueError, match="no Hugging Face architecture represents"):
        export_peft(tmp_path / "adapter", tmp_path / "peft")
    with pytest.raises(ValueError, match="architecture='DeepseekV3ForCausalLM'"):
        export_peft(tmp_path / "adapter", tmp_path / "peft", architecture="DeepseekV3ForCausalLM")
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        export_peft(tmp_path / "peft", tmp_path / "out")


def test_dense_mlp_adapters_are_refused_for_peft(tmp_path):
    cfg = ModelConfig.from_dict(
        {**BASE, "attention": dict(qk_norm="head"), "moe": dict(MOE, first_dense_layers=1)}
    )  # a Qwen3-MoE
    model = build_model(cfg)
    lora = LoRAConfig(targets=["*.ffn.w_up", "*.attn.wq"])
    apply_lora(model, lora)
    save_adapter(model, lora, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"layers\.0\.ffn\.w_up \(a dense MLP layer\)"):
        export_peft(tmp_path / "adapter", tmp_path / "peft")


def test_corrupt_adapter_files_are_named(tmp_path):
    model = build_model(ModelConfig.from_dict({**BASE, "moe": dict(MOE)}))
    lora = LoRAConfig(targets=["*.attn.wq"])
    apply_lora(model, lora)
    save_adapter(model, lora, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter.safetensors"
    weights.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"adapter\.safetensors is not a readable safetensors"):
        export_peft(tmp_path / "adapter", tmp_path / "peft")
    (tmp_path / "adapter" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        export_peft(tmp_path / "adapter", tmp_path / "peft")
