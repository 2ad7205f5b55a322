import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.nn.kv_cache import KVCache

CFG = dict(vocab_size=97, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
           max_seq_len=64, moe=dict(num_experts=4, top_k=2, expert_hidden=16))  # fmt: skip


def test_last_logits_are_the_last_position_of_the_full_logits():
    model = build_model(ModelConfig.from_dict(CFG)).eval()
    tokens = torch.randint(0, 97, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    with torch.no_grad():
        full = model(tokens, cache=KVCache(model.cfg, 2, 12), valid=valid).logits
        last = model(tokens, cache=KVCache(model.cfg, 2, 12), valid=valid, last_logits=True)
    assert last.logits.shape == (2, 1, 97)
    torch.testing.assert_close(last.logits, full[:, -1:], rtol=1e-5, atol=1e-6)
