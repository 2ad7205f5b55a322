import json

import pytest
import torch
from torch import nn

from moekit import build_model
from moekit.config import ModelConfig
from moekit.finetune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ExpertLowRank,
    LoRAConfig,
    LowRank,
    adapter_modules,
    apply_lora,
    base_state,
    load_adapted,
    load_adapter,
    merge_lora,
    merged_state,
    save_adapter,
    unmerge_lora,
)

BACKENDS = ["eager", "sliced", "grouped", "gather"]
ALL = ["*.attn.w*", "*.ffn.experts.*", "*.ffn.shared.*", "*.ffn.w_*", "*.ffn.router"]


def make(backend="grouped", **moe):
    # Layer 0 dense (a dense MLP to adapt), layer 1 MoE with a shared expert.
    cfg = ModelConfig.from_dict(
        dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
             max_seq_len=64, moe=dict(num_experts=4, top_k=2, expert_hidden=16,
                                      num_shared_experts=1, first_dense_layers=1,
                                      backend=backend, **moe))
    )  # fmt: skip
    return build_model(cfg, seed=0)


def randomise(model, std=0.1):
    """Adapters start as zero updates (B = 0); give them a non-zero update to test with."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, adapter in adapter_modules(model):
            adapter.A.copy_(torch.randn(adapter.A.shape, generator=gen) * std)
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=gen) * std)


def test_shapes_and_trainable_count():
    model = make()
    total_before = sum(p.numel() for p in model.parameters())
    cfg = LoRAConfig(rank=4, alpha=8, targets=ALL)
    summary = apply_lora(model, cfg)
    expected = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, "lora"):
            assert module.lora.A.shape == (4, module.in_features)
            assert module.lora.B.shape == (module.out_features, 4)
            expected += 4 * (module.in_features + module.out_features)
    experts = model.moe_layers()[1].experts
    for proj in ("w_gate", "w_up", "w_down"):
        E, out, inp = getattr(experts, proj).shape
        adapter = experts.adapters[proj]
        assert isinstance(adapter, ExpertLowRank)
        assert adapter.A.shape == (E, 4, inp) and adapter.B.shape == (E, out, 4)
        expected += E * 4 * (inp + out)
    router = model.moe_layers()[1].router
    assert isinstance(router.adapter, LowRank) and router.adapter.B.shape == (4, 4)
    expected += 4 * (32 + 4)
    assert summary.trainable == expected
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.total == total_before + expected
    # attention q/k/v/o on 2 layers, the dense MLP's 3, the shared expert's 3, 3 stacked expert
    # weights and the router
    assert len(summary.targets) == 8 + 3 + 3 + 3 + 1
    assert all(
        not p.requires_grad for n, p in model.named_parameters() if ".A" not in n and ".B" not in n
    )


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="match no weight"):
        apply_lora(make(), LoRAConfig(targets=["*.nonexistent"]))


@pytest.mark.parametrize("field,value", [("rank", 0), ("alpha", -1.0), ("dropout", 1.0),
                                         ("targets", []), ("experts", [-1])])  # fmt: skip
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LoRAConfig(**{field: value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_routed_experts_adapter_gets_a_gradient(backend):
    model = make(backend)
    apply_lora(model, LoRAConfig(rank=4, targets=["*.ffn.experts.*"]))
    randomise(model)
    tokens = torch.randint(0, 64, (4, 16))
    out = model(tokens, return_routing=True)
    out.logits.float().pow(2).mean().backward()
    routed = set(out.moe_stats[1].routing.experts.flatten().tolist()) - {-1}
    assert routed == {0, 1, 2, 3}  # the batch reaches every expert
    for proj, adapter in model.moe_layers()[1].experts.adapters.items():
        for factor in (adapter.A, adapter.B):
            per_expert = factor.grad.flatten(1).abs().sum(1)
            assert (per_expert > 0).all(), f"{backend}: {proj} has experts without gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_unrouted_and_unselected_experts_get_no_gradient(backend):
    model = make(backend)
    apply_lora(model, LoRAConfig(rank=4, targets=["*.ffn.experts.*"], experts=[1, 3]))
    randomise(model)
    layer = model.moe_layers()[1]
    out = model(torch.randint(0, 64, (4, 16)), return_routing=True)
    out.logits.float().pow(2).mean().backward()
    for adapter in layer.experts.adapters.values():
        grad_B = adapter.B.grad.flatten(1).abs().sum(1)
        assert grad_B[[0, 2]].eq(0).all() and grad_B[[1, 3]].gt(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_gives_the_adapted_models_logits_and_unmerge_restores(backend):
    model = make(backend).eval()
    tokens = torch.randint(0, 64, (2, 12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, targets=ALL))
    randomise(model)
    with torch.no_grad():
        adapted = model(tokens).logits
        merged_weights = merged_state(model)
        merge_lora(model)
        merged = model(tokens).logits
        state = base_state(model)
        for k, v in merged_weights.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)
        unmerge_lora(model)
        back = model(tokens).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, make(backend).eval()(tokens).logits, atol=1e-3)
    for k, v in base_state(model).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)
    # A plain model built from the merged weights is the adapted model.
    plain = make(backend).eval()
    plain.load_state_dict(merged_weights)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, adapted, rtol=1e-5, atol=1e-5)


def test_save_and_load_adapter(tmp_path):
    model = make().eval()
    cfg = LoRAConfig(rank=2, alpha=4, targets=ALL, experts=[0, 2])
    apply_lora(model, cfg)
    randomise(model)
    save_adapter(model, cfg, tmp_path / "adapter", base="somewhere")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    )
    meta = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert meta["base_model"] == "somewhere" and meta["base_config"]["dim"] == 32
    fresh = make().eval()
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded == cfg
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_loading_onto_the_wrong_base_or_a_corrupt_file_is_named(tmp_path):
    model = make()
    cfg = LoRAConfig(rank=2, targets=["*.attn.w*"])
    apply_lora(model, cfg)
    save_adapter(model, cfg, tmp_path / "a")
    other = build_model(ModelConfig.from_dict(
        dict(vocab_size=64, dim=48, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
             max_seq_len=64)))  # fmt: skip
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(other, tmp_path / "a")
    (tmp_path / "a" / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_adapter(make(), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        load_adapter(make(), tmp_path / "missing")


def test_adapting_twice_is_refused():
    model = make()
    apply_lora(model, LoRAConfig(targets=["*.attn.wq"]))
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, LoRAConfig(targets=["*.attn.wq"]))


def test_dropout_acts_in_training_only():
    model = make()
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5, targets=ALL))
    randomise(model)
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        a, b = model.train()(tokens).logits, model(tokens).logits
        c, d = model.eval()(tokens).logits, model(tokens).logits
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_load_adapted_from_directories(tmp_path):
    from moekit.model_dir import save_model

    model = make().eval()
    save_model(model, model.cfg, tmp_path / "base")
    cfg = LoRAConfig(rank=2, targets=ALL)
    apply_lora(model, cfg)
    randomise(model)
    save_adapter(model, cfg, tmp_path / "adapter")
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        expected = model(tokens).logits
        for merge in (False, True):
            loaded = load_adapted(tmp_path / "base", tmp_path / "adapter", merge=merge).eval()
            torch.testing.assert_close(loaded(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    other = build_model(ModelConfig.from_dict({**model.cfg.to_dict(), "norm_eps": 1e-5}))
    save_model(other, other.cfg, tmp_path / "other")
    with pytest.raises(ValueError, match=r"another model than .*norm_eps differ"):
        load_adapted(tmp_path / "other", tmp_path / "adapter")


def test_expert_subsets_are_checked_and_counted():
    model = make()
    summary = apply_lora(model, LoRAConfig(rank=2, targets=["*.ffn.experts.w_up"], experts=[1]))
    # one of the 4 experts' slices of A (2 x 32) and B (16 x 2)
    assert summary.trainable == 2 * 32 + 16 * 2
    with pytest.raises(ValueError, match=r"experts=\[9\].*4 routed experts"):
        apply_lora(make(), LoRAConfig(targets=["*.ffn.experts.*"], experts=[9]))
    with pytest.raises(ValueError, match="non-empty"):
        LoRAConfig(experts=[])


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_narrow_ranks_train_on_the_grouped_backend(rank):
    model = make("grouped")
    apply_lora(model, LoRAConfig(rank=rank, targets=["*.ffn.experts.*"]))
    randomise(model)
    model(torch.randint(0, 64, (2, 8))).logits.square().mean().backward()
    grads = [a.A.grad for _, a in adapter_modules(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
