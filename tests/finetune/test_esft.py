import torch

from moekit.finetune.esft import select_experts
from moekit.model_dir import load_weights
from moekit.training.config import finetune_run_config
from moekit.training.trainer import train

from .conftest import FAST


def test_select_experts_takes_the_fewest_covering_the_share():
    mass = {0: torch.tensor([1.0, 5.0, 3.0, 1.0]), 2: torch.tensor([1.0, 1.0, 1.0, 1.0])}
    assert select_experts(mass, 0.5) == {0: [1], 2: [0, 1]}
    assert select_experts(mass, 0.8) == {0: [1, 2], 2: [0, 1, 2, 3]}
    assert select_experts(mass, 1.0) == {0: [0, 1, 2, 3], 2: [0, 1, 2, 3]}


def test_esft_trains_exactly_the_selected_experts(tmp_path, tiny_model_dir, sft_file):
    # Weight decay would move every weight it reaches: the frozen experts must still come out
    # bitwise unchanged.
    cfg = finetune_run_config(tiny_model_dir, sft_file, method="esft",
                              overrides=[*FAST, "finetune.esft_coverage=0.4",
                                         "train.weight_decay=0.1"])  # fmt: skip
    result = train(cfg, tmp_path / "run", verbose=False)
    assert result.step == 6
    import json

    summary = json.loads((tmp_path / "run" / "finetune.json").read_text())
    chosen = {int(k): v for k, v in summary["esft_experts"].items()}
    assert set(chosen) == {0, 1}
    base, tuned = load_weights(tiny_model_dir), load_weights(tmp_path / "run")
    for layer, experts in chosen.items():
        assert 1 <= len(experts) < 8
        share = summary["esft_routing_share"][str(layer)]
        covered = sum(share[e] for e in experts)
        assert covered >= 0.4 - 1e-6
        # the fewest: dropping the smallest chosen one falls below the coverage
        assert covered - min(share[e] for e in experts) < 0.4
        frozen = [e for e in range(8) if e not in experts]
        for proj in ("w_gate", "w_up", "w_down"):
            key = f"layers.{layer}.ffn.experts.{proj}"
            assert torch.equal(tuned[key][frozen], base[key][frozen]), key
            for e in experts:
                assert not torch.equal(tuned[key][e], base[key][e]), (key, e)
    for key in base:
        if ".experts." not in key:
            assert torch.equal(tuned[key], base[key]), key
    per_expert = sum(
        base[f"layers.0.ffn.experts.{p}"][0].numel() for p in ("w_gate", "w_up", "w_down")
    )
    assert summary["trainable_params"] == per_expert * sum(len(v) for v in chosen.values())


def test_esft_with_attention_trains_attention_too(tmp_path, tiny_model_dir, sft_file):
    cfg = finetune_run_config(tiny_model_dir, sft_file, method="esft",
                              overrides=[*FAST, "train.max_steps=2", "finetune.esft_attention=true"])  # fmt: skip
    train(cfg, tmp_path / "run", verbose=False)
    base, tuned = load_weights(tiny_model_dir), load_weights(tmp_path / "run")
    assert not torch.equal(tuned["layers.0.attn.wq.weight"], base["layers.0.attn.wq.weight"])
    assert torch.equal(tuned["embed.weight"], base["embed.weight"])
    assert torch.equal(tuned["layers.0.ffn.router.weight"], base["layers.0.ffn.router.weight"])


def test_esft_trains_the_biases_of_the_selected_experts_only():
    """Experts with biases (gpt-oss): a chosen expert's biases train with its weights; the
    others' stay exactly as they were."""
    import torch

    from moekit import build_model
    from moekit.config import ModelConfig
    from moekit.finetune.esft import ExpertFreeze, trainable_params

    cfg = ModelConfig.from_dict(
        dict(vocab_size=64, dim=32, num_layers=2, num_heads=4,
             moe=dict(num_experts=4, top_k=2, expert_hidden=16, expert_bias=True))
    )  # fmt: skip
    model = build_model(cfg)
    freeze = ExpertFreeze(model, {1: [2]}, attention=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    freeze.attach(optimizer)
    ex = model.moe_layers()[1].experts
    before = {n: p.detach().clone() for n, p in ex.named_parameters()}
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    model(tokens).logits.square().mean().backward()
    optimizer.step()
    for name in ("b_gate", "b_up", "b_down", "w_up"):
        after = getattr(ex, name).detach()
        assert not torch.equal(after[2], before[name][2]), name
        for e in (0, 1, 3):
            assert torch.equal(after[e], before[name][e]), (name, e)
    per_expert = 3 * 32 * 16 + 2 * 16 + 32
    assert trainable_params(model, {1: [2]}, attention=False) == per_expert
