"""Experts added, split, merged and pruned in a trained model: every tensor indexed by expert
moves together, the checks come before anything is written, and the source is only read."""

import json
import math

import pytest
import torch

from moekit import build_model
from moekit.analysis.expert_edits import ExpertEdit, edit_experts
from moekit.analysis.expert_importance import expert_importance
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.finetune.config import LoRAConfig
from moekit.finetune.expert_edit import (
    Source,
    busiest,
    edit_state,
    merge_plan,
    prune_plan,
    split_plan,
    write_edited,
)
from moekit.finetune.lora import adapter_state, apply_lora, load_adapter, merge_lora, save_adapter
from moekit.model_dir import ModelDir, load_model, load_weights, save_model

from .conftest import digest

BASE = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
            max_seq_len=64)  # fmt: skip


def make(tmp_path, name="src", **moe):
    moe = {"num_experts": 6, "top_k": 2, "expert_hidden": 16, **moe}
    cfg = ModelConfig.from_dict({**BASE, "moe": moe})
    model = build_model(cfg, seed=1)
    with torch.no_grad():  # biases and selection biases with values to follow
        for module in model.modules():
            for buf in ("bias", "selection_bias"):
                t = getattr(module, buf, None)
                if module.__class__.__name__.endswith("Router") and t is not None:
                    t.copy_(torch.randn(t.shape))
    save_model(model, cfg, tmp_path / name)
    return tmp_path / name


def test_pruning_keeps_the_chosen_experts_rows_in_every_tensor(tmp_path):
    src = make(tmp_path, router_bias=True, expert_bias=True, bias_update_rate=1e-3)
    cfg, state = ModelDir(src).config(), load_weights(src)
    scores = {layer: torch.tensor([5.0, 1, 4, 0, 3, 2]) + layer for layer in cfg.moe_layers}
    plan = prune_plan(scores, 4, top_k=2)
    assert [s.ids[0] for s in plan[0]] == [0, 2, 4, 5]
    new = edit_state(state, cfg, plan)
    kept = [0, 2, 4, 5]
    for key, t in state.items():
        if ".ffn.experts." in key or ".ffn.router." in key:
            assert torch.equal(new[key], t[kept]), key
        else:
            assert new[key] is t, key


def test_a_pruned_expert_that_no_token_chose_changes_no_output(tmp_path):
    src = make(tmp_path, router_bias=True)
    model = load_model(src)
    with torch.no_grad():  # expert 5 is never among any token's top 2
        for layer in model.moe_layers().values():
            layer.router.bias[5] = -1e4
    save_model(model, model.cfg, tmp_path / "muted")
    ids = torch.randint(0, 64, (256,), generator=torch.Generator().manual_seed(0))
    importance = expert_importance(load_model(tmp_path / "muted"), ids, seq_len=32)
    for layer in model.cfg.moe_layers:
        assert importance.frequency[layer][5] == 0 and importance.reap[layer][5] == 0
        assert importance.frequency[layer].sum() == 2 * 256  # top-2 copies of every token
    plan = prune_plan(importance.scores("frequency"), 5, top_k=2)
    write_edited(tmp_path / "muted", tmp_path / "pruned", plan)
    tokens = ids[:32].view(1, -1)
    with torch.no_grad():
        before = load_model(tmp_path / "muted")(tokens).logits
        after = load_model(tmp_path / "pruned")(tokens).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_a_split_shares_its_experts_probability_under_a_logit_bias(tmp_path):
    src = make(tmp_path, router_bias=True)
    cfg, state = ModelDir(src).config(), load_weights(src)
    plan = split_plan(cfg.moe_layers, 6, {layer: [1, 4] for layer in cfg.moe_layers})
    new = edit_state(state, cfg, plan, noise=0.0)
    x = torch.randn(50, 32)
    for layer in cfg.moe_layers:
        r = f"layers.{layer}.ffn.router"
        p = (x @ state[f"{r}.weight"].T + state[f"{r}.bias"]).softmax(-1)
        q = (x @ new[f"{r}.weight"].T + new[f"{r}.bias"]).softmax(-1)
        assert q.shape == (50, 8)
        for e in (0, 2, 3, 5):  # every other expert's probability is unchanged
            torch.testing.assert_close(q[:, e], p[:, e])
        torch.testing.assert_close(q[:, 1] + q[:, 6], p[:, 1])  # the halves sum to the whole
        torch.testing.assert_close(q[:, 4], q[:, 7])
        w = f"layers.{layer}.ffn.experts.w_up"
        assert torch.equal(new[w][6], state[w][1]) and torch.equal(new[w][7], state[w][4])


def test_noise_perturbs_copies_only_and_follows_the_seed(tmp_path):
    src = make(tmp_path)
    cfg, state = ModelDir(src).config(), load_weights(src)
    plan = split_plan(cfg.moe_layers, 6, {layer: [2] for layer in cfg.moe_layers})
    a, b = (edit_state(state, cfg, plan, noise=0.05, seed=s) for s in (0, 0))
    c = edit_state(state, cfg, plan, noise=0.05, seed=1)
    w = "layers.0.ffn.experts.w_gate"
    assert torch.equal(a[w][:6], state[w]) and torch.equal(a[w], b[w])
    assert not torch.equal(a[w][6], state[w][2]) and not torch.equal(a[w][6], c[w][6])
    ratio = a[w][6] / state[w][2]
    assert 0.02 < float((ratio - 1).std()) < 0.08


def test_merging_averages_weights_and_rows_and_biases(tmp_path):
    src = make(tmp_path, router_bias=True, bias_update_rate=1e-3)
    cfg, state = ModelDir(src).config(), load_weights(src)
    plan = merge_plan(cfg.moe_layers, 6, [4, 1])
    assert plan[0][1] == Source((1, 4)) and len(plan[0]) == 5
    new = edit_state(state, cfg, plan)
    for name in ("experts.w_down", "router.weight", "router.selection_bias"):
        key = f"layers.1.ffn.{name}"
        torch.testing.assert_close(new[key][1], (state[key][1] + state[key][4]) / 2)
        assert torch.equal(new[key][[0, 2, 3, 4]], state[key][[0, 2, 3, 5]])
    bias = "layers.1.ffn.router.bias"
    expected = (state[bias][1] + state[bias][4]) / 2 + math.log(2)
    torch.testing.assert_close(new[bias][1], expected)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda cfg: prune_plan({0: torch.ones(6), 1: torch.ones(6)}, 1, top_k=2), "below top_k=2"),
        (lambda cfg: merge_plan(cfg.moe_layers, 6, [3, 3]), "merging an expert with itself"),
        (lambda cfg: merge_plan(cfg.moe_layers, 6, [3]), "two experts or more"),
        (
            lambda cfg: split_plan(cfg.moe_layers, 6, {0: [9], 1: [9]}),
            r"experts \[9\] do not exist",
        ),
        (lambda cfg: busiest({0: torch.ones(6)}, 7), "add 1 .. 6 at a time"),
    ],
)
def test_edits_that_cannot_work_are_refused_by_name(tmp_path, edit, message):
    cfg = ModelDir(make(tmp_path)).config()
    with pytest.raises(ValueError, match=message):
        edit(cfg)


def test_refusals_come_before_anything_is_written_and_the_source_is_only_read(tmp_path):
    src = make(tmp_path, num_groups=2, topk_groups=1)
    cfg = ModelDir(src).config()
    before = digest(src)
    plan = split_plan(cfg.moe_layers, 6, {layer: [0] for layer in cfg.moe_layers})  # 7 experts
    with pytest.raises(ValueError, match="num_groups=2 does not divide"):
        write_edited(src, tmp_path / "out", plan)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="its own directory"):
        write_edited(src, src, split_plan(cfg.moe_layers, 6, {0: [0, 1], 1: [0, 1]}))
    # a quantised model and a dense model are refused by name
    quantised = json.loads((src / "config.json").read_text())
    quantised["quantization"] = {"bits": 8}
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "config.json").write_text(json.dumps(quantised))
    with pytest.raises(ValueError, match=r"quantised .*without dequantising"):
        write_edited(tmp_path / "q", tmp_path / "out", plan)
    hier = make(tmp_path, "hier", router="hierarchical", router_groups=2, group_top_k=1)
    with pytest.raises(ValueError, match="2 expert groups cannot share equally"):
        write_edited(hier, tmp_path / "out", plan)
    dense = ModelConfig.from_dict(BASE)
    save_model(build_model(dense), dense, tmp_path / "dense")
    with pytest.raises(ValueError, match="dense model"):
        write_edited(tmp_path / "dense", tmp_path / "out", plan)
    write_edited(src, tmp_path / "ok", split_plan(cfg.moe_layers, 6, {0: [0, 1], 1: [2, 3]}))
    assert ModelDir(tmp_path / "ok").config().moe.num_experts == 8
    assert digest(src) == before


@pytest.mark.parametrize("kind", ["prune", "add"])
def test_a_lora_adapter_moves_with_its_experts(tmp_path, kind):
    cfg = ModelConfig.from_dict(
        {**BASE, "moe": {"num_experts": 6, "top_k": 2, "expert_hidden": 16}}
    )
    base = build_model(cfg, seed=2).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoRAConfig(rank=2, targets=["*.ffn.experts.*", "*.ffn.router"], experts=[1, 4])
    apply_lora(base, lora)
    with torch.no_grad():
        for k, t in adapter_state(base).items():
            if k.endswith(".B"):
                base.get_submodule(k.rsplit(".", 1)[0]).B.copy_(torch.randn(t.shape))
    save_adapter(base, lora, tmp_path / "tuned" / "adapter")
    merge_lora(base)
    merged = {k: v for k, v in base.state_dict().items() if k in base_state}
    ModelDir(tmp_path / "tuned").save_weights(merged)
    ModelDir(tmp_path / "tuned").save_config(cfg)
    if kind == "prune":
        plan = prune_plan({0: torch.arange(6.0), 1: torch.arange(6.0).flip(0)}, 4, top_k=2)
    else:
        plan = split_plan(cfg.moe_layers, 6, {0: [1, 2], 1: [4, 0]})
    write_edited(tmp_path / "tuned", tmp_path / "edited", plan)
    # The edited base plus the edited adapter, merged, is the edited model.
    new_cfg = ModelDir(tmp_path / "edited").config()
    edited_base = build_model(new_cfg).eval()
    edited_base.load_state_dict(edit_state(base_state, cfg, plan))
    load_adapter(edited_base, tmp_path / "edited" / "adapter")
    merge_lora(edited_base)
    ours = load_weights(tmp_path / "edited")
    theirs = edited_base.state_dict()
    for key, t in ours.items():
        torch.testing.assert_close(theirs[key], t, rtol=1e-5, atol=1e-6, msg=key)
    meta = json.loads((tmp_path / "edited" / "adapter" / "adapter_config.json").read_text())
    assert meta["base_config"]["moe"]["num_experts"] == new_cfg.moe.num_experts


def test_moekit_experts_command_prunes_and_the_result_generates(tmp_path, tiny_model_dir, capsys):
    before = digest(tiny_model_dir)
    code = main(["experts", str(tiny_model_dir), "--out", str(tmp_path / "p"), "--prune-to", "4",
                 "--calibration-tokens", "512", "--quiet", "--json"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["experts_before"] == 8 and result["experts_after"] == 4
    assert result["criterion"] == "reap" and result["calibration_tokens"] == 512
    assert result["loss_after"] > 0 and math.isfinite(result["loss_before"])
    for layer, kept in result["kept"].items():  # the four best by REAP
        reap = torch.tensor(result["importance"]["reap"][layer])
        assert sorted(kept) == sorted(reap.argsort(descending=True)[:4].tolist())
    assert ModelDir(tmp_path / "p").config().moe.num_experts == 4
    assert json.loads((tmp_path / "p" / "experts_edit.json").read_text())["edit"] == "prune_to"
    assert (tmp_path / "p" / "tokenizer.json").is_file()
    assert main(["generate", str(tmp_path / "p"), "The", "--max-new-tokens", "4"]) == 0
    assert digest(tiny_model_dir) == before
    # a refused edit: named, nothing written
    code = main(["experts", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--merge", "2,2",
                 "--calibration-tokens", "256", "--quiet"])  # fmt: skip
    assert code != 0 and "merging an expert with itself" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_edited_models_export_to_transformers(tmp_path, tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    from moekit.interop.hf import export_hf

    result = edit_experts(tiny_model_dir, tmp_path / "e", ExpertEdit("add", count=2),
                          calibration_tokens=256, noise=0.01)  # fmt: skip
    assert result.experts_after == 10
    export_hf(tmp_path / "e", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_local_experts == 10
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(tmp_path / "e").eval()(tokens).logits
        assert (hf(tokens).logits - ours).abs().max().item() <= 1e-4
    # and as GGUF (llama.cpp's names and expert count), read back
    from moekit.interop.gguf import export_gguf, import_gguf

    (tmp_path / "gguf").mkdir()
    written = export_gguf(tmp_path / "e", tmp_path / "gguf", type="f32")
    import_gguf(written.path, tmp_path / "back")
    assert ModelDir(tmp_path / "back").config().moe.num_experts == 10
    with torch.no_grad():
        back = load_model(tmp_path / "back").eval()(tokens).logits
    torch.testing.assert_close(back, ours, rtol=0, atol=1e-5)


def test_an_edited_gguf_loads_in_transformers(tmp_path):
    # transformers reads a qwen3moe GGUF's expert width from its own default (768; it does not
    # read expert_feed_forward_length), so the model here has that width.
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    from moekit.data.tokenizer import Tokenizer
    from moekit.interop.gguf import export_gguf

    from ..interop.test_gguf import TEXT, make_model

    src = make_model("qwen3_moe", tmp_path, Tokenizer.train([TEXT], 300), moe_intermediate_size=768)
    cfg = ModelDir(src).config()
    write_edited(
        src, tmp_path / "ed", prune_plan({i: torch.arange(8.0) for i in cfg.moe_layers}, 6, top_k=2)
    )
    export_gguf(tmp_path / "ed", tmp_path / "ed.gguf", type="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="ed.gguf").eval()
    assert hf.config.num_experts == 6
    tokens = torch.randint(2, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(tmp_path / "ed").eval()(tokens).logits
        assert (hf(tokens).logits - ours).abs().max().item() <= 1e-4
