import pytest
import torch
import torch.nn.functional as F

from moekit import build_model
from moekit.config import ModelConfig
from moekit.nn.attention import Attention
from moekit.nn.rope import apply_rope, rope_tables
from moekit.presets import get_preset

BASE = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
            max_seq_len=64)  # fmt: skip
MOE = dict(num_experts=4, top_k=2, expert_hidden=16)

ROUTERS = {
    "softmax-topk": dict(MOE),
    "sigmoid-groups-bias": dict(MOE, score_func="sigmoid", num_groups=2, topk_groups=1,
                                bias_update_rate=0.01, routed_scaling_factor=2.5),
    "switch": dict(MOE, router="switch", top_k=1),
    "switch-capacity-by-position": dict(MOE, router="switch", top_k=1, capacity_factor=1.0,
                                        capacity_priority="position"),
    "shared": dict(MOE, num_shared_experts=1, shared_expert_gate=True),
    "expert-choice-causal": dict(MOE, router="expert_choice", capacity_factor=1.5,
                                 expert_choice_causal=True),
    "hierarchical-biases": dict(MOE, router="hierarchical", router_groups=2, group_top_k=1,
                                bias_update_rate=0.01, group_bias_update_rate=0.01),
}  # fmt: skip


def make(moe=None, **kw):
    return build_model(ModelConfig.from_dict({**BASE, "moe": moe, **kw}))


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_future_tokens_never_change_earlier_logits(name, attention):
    extra = {}
    if attention == "mla":
        extra = dict(num_kv_heads=4, attention=dict(kind="mla", q_lora_rank=16, kv_lora_rank=8,
                     qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))  # fmt: skip
    model = make(ROUTERS[name], **extra).eval()
    for layer in model.moe_layers().values():
        if layer.router.selection_bias is not None:  # a bias that actually changes choices
            layer.router.selection_bias.copy_(torch.randn(4))
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        base = model(tokens).logits
        for j in (1, 6, 11):
            changed = tokens.clone()
            changed[:, j:] = (changed[:, j:] + 1 + torch.randint(0, 60, changed[:, j:].shape)) % 64
            other = model(changed).logits
            torch.testing.assert_close(other[:, :j], base[:, :j], rtol=0, atol=1e-5)
            assert not torch.allclose(other[:, j], base[:, j])


def test_expert_choice_generation_mode_is_causal():
    model = make(dict(MOE, router="expert_choice", capacity_factor=1.0)).eval()
    tokens = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        base = model(tokens, causal_routing=True).logits
        changed = tokens.clone()
        changed[:, 8:] = (changed[:, 8:] + 7) % 64
        other = model(changed, causal_routing=True).logits
    torch.testing.assert_close(other[:, :8], base[:, :8], rtol=0, atol=1e-5)


def test_forward_outputs():
    model = make(MOE)
    out = model(torch.randint(0, 64, (3, 10)))
    assert out.logits.shape == (3, 10, 64)
    assert sorted(out.moe_stats) == [0, 1]
    assert out.aux_loss.requires_grad and float(out.aux_loss.detach()) > 0
    for stats in out.moe_stats.values():
        assert int(stats.tokens_per_expert.sum()) == 3 * 10 * 2


def test_dense_model_is_the_same_code_without_experts():
    model = make(None)
    out = model(torch.randint(0, 64, (1, 5)))
    assert out.moe_stats == {} and float(out.aux_loss) == 0.0
    assert model.moe_layers() == {}


def test_first_dense_layers_and_interleaving():
    model = make(dict(MOE, first_dense_layers=1), num_layers=3)
    assert sorted(model.moe_layers()) == [1, 2]
    model = make(dict(MOE, layer_step=2), num_layers=4)
    assert sorted(model.moe_layers()) == [1, 3]
    model = make(dict(MOE, dense_layers=[1]), num_layers=3)
    assert sorted(model.moe_layers()) == [0, 2]
    out = model(torch.randint(0, 64, (1, 5)))
    assert sorted(out.moe_stats) == [0, 2]


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = make(MOE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(30):
        out = model(tokens[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
        (loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    # Every parameter, routers and experts included, gets a real gradient.
    out = model(tokens[:, :-1])
    loss = F.cross_entropy(out.logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
    (loss + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_init_is_seeded_and_documented_scales():
    cfg = ModelConfig.from_dict({**BASE, "moe": MOE})
    a, b, c = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), n
        if "norm" not in n:
            assert not torch.equal(pa, pc), n
    layer = a.layers[0]
    assert torch.equal(layer.attn_norm.weight, torch.ones(32))
    out_std = 0.02 / (2 * 2) ** 0.5
    assert layer.ffn.experts.w_down.std().item() == pytest.approx(out_std, rel=0.15)
    assert layer.attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_bf16_build_keeps_routers_float32():
    cfg = ModelConfig.from_dict({**BASE, "moe": MOE})
    exact = build_model(cfg, seed=3)
    model = build_model(cfg, dtype=torch.bfloat16, seed=3)
    for i, layer in model.moe_layers().items():
        assert layer.router.weight.dtype == torch.float32
        assert torch.equal(layer.router.weight, exact.moe_layers()[i].router.weight)
        assert layer.experts.w_up.dtype == torch.bfloat16
    out = model(torch.randint(0, 64, (1, 6)))
    assert out.logits.dtype == torch.bfloat16


def test_too_long_sequence_is_a_clear_error():
    model = make(MOE)
    with pytest.raises(ValueError, match="longer than the model's max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_tied_embeddings_share_the_matrix():
    model = make(MOE, tie_embeddings=True)
    assert model.lm_head is None
    out = model(torch.randint(0, 64, (1, 4)))
    out.logits.sum().backward()
    assert model.embed.weight.grad is not None


def test_gqa_equals_repeated_kv_attention():
    cfg = ModelConfig.from_dict({**BASE, "attention": {"qk_norm": "head"}})
    attn = Attention(cfg)
    attn.init_weights(0.1, 0.1)
    x = torch.randn(2, 7, 32)
    cos, sin = rope_tables(torch.arange(7), cfg.head_dim, cfg.rope_theta, x.dtype)
    got = attn(x, cos, sin)
    # Reference: explicit scores with each K/V head repeated for its query heads.
    q = attn.q_norm(attn.wq(x).view(2, 7, 4, 8))
    k = attn.k_norm(attn.wk(x).view(2, 7, 2, 8))
    v = attn.wv(x).view(2, 7, 2, 8)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / 8**0.5
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).reshape(2, 7, 32)
    torch.testing.assert_close(got, attn.wo(ref), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_and_relative_position():
    cos, sin = rope_tables(torch.arange(10), 8, 10000.0, torch.float32)
    x = torch.randn(1, 10, 1, 8)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    q, k = torch.randn(8), torch.randn(8)

    def dot(i, j):
        qi = apply_rope(q.view(1, 1, 1, 8).expand(1, 10, 1, 8), cos, sin)[0, i, 0]
        kj = apply_rope(k.view(1, 1, 1, 8).expand(1, 10, 1, 8), cos, sin)[0, j, 0]
        return float(qi @ kj)

    assert dot(5, 3) == pytest.approx(dot(7, 5), abs=1e-5)


@pytest.mark.parametrize("name", ["debug", "tiny", "small"])
def test_small_presets_run(name):
    cfg = get_preset(name)
    model = build_model(cfg)
    out = model(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert out.logits.shape == (1, 8, cfg.vocab_size)


CAPACITY = {
    "switch-capacity-by-weight": dict(MOE, router="switch", top_k=1, capacity_factor=1.0),
    "topk-capacity-by-position": dict(MOE, capacity_factor=1.0, capacity_priority="position"),
}


@pytest.mark.parametrize("name", list(CAPACITY))
def test_causal_routing_is_dropless_so_batch_and_cache_change_nothing(name):
    """Capacity counts the tokens of one forward call. In causal routing (generation, serving,
    evaluation) it is off, or a row's logits would change with the other rows of its batch and
    cached decoding (a prefill, then one token per call) would differ from a full forward."""
    from moekit.nn.kv_cache import KVCache

    torch.manual_seed(0)
    model = make(CAPACITY[name]).eval()
    tokens = torch.randint(0, 64, (3, 20))
    with torch.no_grad():
        trained = model(tokens)  # training-mode routing still applies the capacity
        assert sum(int(s.dropped) for s in trained.moe_stats.values()) > 0
        full = model(tokens, causal_routing=True)
        assert all(int(s.dropped) == 0 for s in full.moe_stats.values())
        alone = model(tokens[:1], causal_routing=True).logits
        cache = KVCache(model.cfg, 3, 24)
        parts = [model(tokens[:, :7], cache=cache, causal_routing=True).logits]
        parts += [
            model(tokens[:, t : t + 1], cache=cache, causal_routing=True).logits
            for t in range(7, 20)
        ]
    torch.testing.assert_close(full.logits[:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(parts, 1), full.logits, rtol=1e-5, atol=1e-5)
