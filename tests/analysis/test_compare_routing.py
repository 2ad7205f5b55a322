"""Routing parity: the agreement measures on routings with known answers, and
`compare_routing` on real tiny models (identical, one router perturbed, an adapter,
mismatched tokenizers or experts)."""

import json
import math

import pytest
import torch

from moekit import build_model, compare_routing
from moekit.analysis.routing import LayerTrace, RoutingTrace, selection_margin
from moekit.analysis.routing_parity import compare_traces, same_sets, shared_experts, top_expert
from moekit.config import ModelConfig
from moekit.data.tokenizer import Tokenizer
from moekit.model_dir import ModelDir, load_model, save_model

# ----------------------------------------------------------------------------- the measures


def _trace(layers, margins=None, weights=None):
    first = next(iter(layers.values()))
    n = first.shape[0]
    return RoutingTrace(
        num_experts=8,
        layers={
            i: LayerTrace(
                experts=e,
                entropy=torch.zeros(n),
                row_counts=torch.zeros(1, 8),
                weights=None if weights is None else weights[i],
                margin=None if margins is None else margins[i],
            )
            for i, e in layers.items()
        },
        row_lengths=torch.tensor([n]),
        row_batch=torch.tensor([0]),
        batch_size=1,
        seq_len=n,
    )


def test_set_overlap_and_top1_on_known_routings():
    a = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    b = torch.tensor([[1, 0], [2, 4], [0, 1], [6, 7]])
    assert same_sets(a, b).tolist() == [True, False, False, True]
    assert shared_experts(a, b).tolist() == [2, 1, 0, 2]
    w_a = torch.tensor([[0.7, 0.3], [0.5, 0.6], [0.9, 0.1], [0.2, 0.8]])
    w_b = torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.9, 0.1], [0.8, 0.2]])
    assert top_expert(a, w_a).tolist() == [0, 3, 4, 7]
    assert top_expert(b, w_b).tolist() == [0, 2, 0, 6]
    ag = compare_traces(_trace({0: a}, weights={0: w_a}), _trace({0: b}, weights={0: w_b}))
    row = ag.layers[0]
    assert row.set_match == 0.5
    assert row.overlap == pytest.approx((2 + 1 + 0 + 2) / 8)
    assert row.top1 == 0.25
    assert row.diverging == 2 and row.first_divergence == 2
    assert ag.first_divergent_layer == 0 and ag.never_diverging == 2


def test_near_ties_are_set_apart_and_first_divergence_counts_each_token_once():
    same = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    flip1 = torch.tensor([[0, 2], [2, 3], [4, 5], [6, 7]])  # token 0 differs at layer 1
    flip2 = torch.tensor([[0, 2], [2, 3], [4, 6], [6, 7]])  # and token 2 at layer 2
    a = _trace({0: same, 1: same, 2: same})
    wide = torch.full((4,), 1.0)
    tied = torch.tensor([1.0, 1.0, 1e-6, 1.0])  # token 2 is a near tie at layer 2 on side B
    b = _trace({0: same, 1: flip1, 2: flip2}, margins={0: wide, 1: wide, 2: tied})
    ag = compare_traces(a, b, margin=1e-4, threshold=0.9)
    rows = {r.layer: r for r in ag.layers}
    assert rows[0].set_match == 1.0 and rows[0].first_divergence == 0
    assert rows[1].set_match == 0.75 and rows[1].first_divergence == 1
    assert rows[2].set_match == 0.5 and rows[2].near_ties == 1
    assert rows[2].set_match_decisive == pytest.approx(2 / 3)
    assert rows[2].diverging == 1 and rows[2].first_divergence == 0  # token 0: already counted
    assert ag.first_divergent_layer == 1
    # With margin 0, the tied token's difference counts too.
    ag0 = compare_traces(a, b, margin=0.0, threshold=0.9)
    assert ag0.layers[2].near_ties == 0 and ag0.layers[2].first_divergence == 1


def test_selection_margin_is_the_gap_at_the_edge_of_the_top_k():
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    assert selection_margin(scores, 1).tolist() == pytest.approx([0.2, 0.0])
    assert selection_margin(scores, 2).tolist() == pytest.approx([0.1, 0.2])
    assert selection_margin(scores, 3).tolist() == [math.inf, math.inf]


def test_traces_that_cannot_be_compared_are_refused():
    a = _trace({0: torch.zeros(4, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="MoE layers differ"):
        compare_traces(a, _trace({1: torch.zeros(4, 2, dtype=torch.long)}))
    with pytest.raises(ValueError, match="tokens, experts per token"):
        compare_traces(a, _trace({0: torch.zeros(4, 3, dtype=torch.long)}))


# ----------------------------------------------------------------------------- real models

CFG = dict(vocab_size=512, dim=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden=128,
           max_seq_len=128, moe=dict(num_experts=8, top_k=2, expert_hidden=64))  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from moekit.data.corpus import builtin_corpus

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(d.text for d in builtin_corpus(max_chars_per_domain=3_000)))
    return path


def _save(directory, model, cfg, tokenizer):
    tokenizer.save(directory)
    save_model(model, cfg, directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    """Three-layer models sharing a tokenizer: `a`, its copy `b`, `perturbed` (layer 1's
    router moved a little), and `more_experts` (12 experts)."""
    root = tmp_path_factory.mktemp("routing-parity")
    tokenizer = Tokenizer.load(tiny_model_dir)
    cfg = ModelConfig.from_dict(CFG)
    model = build_model(cfg, seed=0)
    out = {name: _save(root / name, model, cfg, tokenizer) for name in ("a", "b")}
    with torch.no_grad():
        w = model.layers[1].ffn.router.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 0.3 * w.std())
    out["perturbed"] = _save(root / "perturbed", model, cfg, tokenizer)
    more = ModelConfig.from_dict({**CFG, "moe": {**CFG["moe"], "num_experts": 12}})
    out["more_experts"] = _save(root / "more", build_model(more, seed=0), more, tokenizer)
    return out


def test_identical_models_agree_everywhere(models, text_file):
    r = compare_routing(models["a"], models["b"], text=text_file, tokens=600, progress=False)
    assert r.tokens == 600 and r.a.kind == r.b.kind == "moekit"
    assert [row.layer for row in r.agreement.layers] == [0, 1, 2]
    for row in r.agreement.layers:
        assert row.set_match == row.overlap == row.top1 == 1.0
        assert row.diverging == 0
    assert r.agreement.first_divergent_layer is None
    assert r.agreement.never_diverging == 600
    json.dumps(r.to_dict())  # the JSON form is plain data


def test_a_perturbed_router_diverges_at_its_layer_first(models, text_file):
    r = compare_routing(
        models["a"], models["perturbed"], text=text_file, tokens=600, progress=False
    )
    rows = {row.layer: row for row in r.agreement.layers}
    assert rows[0].set_match == 1.0 and rows[0].first_divergence == 0
    assert rows[1].set_match < 0.95
    assert rows[1].overlap < 1.0 and rows[1].first_divergence > 0
    assert rows[1].first_divergence == rows[1].diverging  # nothing diverged before layer 1
    assert r.agreement.first_divergent_layer == 1


def test_the_builtin_validation_text_is_the_default(models):
    r = compare_routing(models["a"], models["b"], tokens=200, progress=False)
    assert "builtin corpus" in r.text and r.tokens == 200


def test_a_zero_adapter_routes_as_its_base_and_a_router_adapter_changes_routing(
    models, text_file, tmp_path
):
    from moekit.finetune.lora import LoRAConfig, adapter_modules, apply_lora, save_adapter

    base = str(models["a"])
    model = load_model(base)
    lora_cfg = LoRAConfig(targets=["*.ffn.router"])
    apply_lora(model, lora_cfg)
    save_adapter(model, lora_cfg, tmp_path / "zero", base=base)  # B starts at zero
    with torch.no_grad():
        for name, adapter in adapter_modules(model):
            if "layers.2." in name:
                for p in adapter.parameters():
                    p.normal_(0, 0.5)
    save_adapter(model, lora_cfg, tmp_path / "moved", base=base)
    same = compare_routing(base, tmp_path / "zero", text=text_file, tokens=300, progress=False)
    assert same.b.kind == "adapter" and same.b.base == base
    assert all(row.set_match == 1.0 for row in same.agreement.layers)
    moved = compare_routing(base, tmp_path / "moved", text=text_file, tokens=300, progress=False)
    assert moved.agreement.first_divergent_layer == 2
    save_adapter(model, lora_cfg, tmp_path / "orphan", base=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=r"records the base model .*gone"):
        compare_routing(base, tmp_path / "orphan", text=text_file, progress=False)


def test_different_experts_or_tokenizers_are_refused_by_name(models, text_file, tmp_path):
    with pytest.raises(ValueError, match="number of experts 8 in A, 12 in B"):
        compare_routing(models["a"], models["more_experts"], text=text_file, progress=False)
    other = Tokenizer.train(["an entirely different little text " * 50], 300)
    cfg = ModelConfig.from_dict(CFG)
    odd = _save(tmp_path / "odd", build_model(cfg, seed=0), cfg, other)
    with pytest.raises(ValueError, match="tokenizers differ"):
        compare_routing(models["a"], odd, text=text_file, progress=False)
    with pytest.raises(FileNotFoundError, match=r"B: .* is not a model directory"):
        compare_routing(models["a"], tmp_path, text=text_file, progress=False)
    assert ModelDir(models["a"]).is_model()
