"""Reading weight files straight into a model: no second copy, byte ranges checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.model_dir import ModelDir, load_model, save_model
from moekit.weights import open_weights, read_safetensors_header, read_tensor

SRC = Path(__file__).resolve().parents[1] / "src"


def _cfg(dim: int = 64, layers: int = 2, experts: int = 4, hidden: int = 64) -> ModelConfig:
    return ModelConfig.from_dict(
        dict(vocab_size=256, dim=dim, num_layers=layers, num_heads=4, num_kv_heads=2,
             ffn_hidden=2 * dim, max_seq_len=64,
             moe=dict(num_experts=experts, top_k=2, expert_hidden=hidden))
    )  # fmt: skip


def test_loaded_model_equals_saved_one_in_every_dtype(tmp_path):
    cfg = _cfg()
    model = build_model(cfg, seed=3)
    save_model(model, cfg, tmp_path)
    loaded = load_model(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # bfloat16: every weight rounded as `.to()` rounds it, routers kept exact in float32.
    half = load_model(tmp_path, dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        want = v if "router" in k else v.to(torch.bfloat16)
        assert half.state_dict()[k].dtype == want.dtype, k
        assert torch.equal(half.state_dict()[k], want), k


def test_bfloat16_file_is_cast_to_float32_on_load(tmp_path):
    cfg = _cfg()
    model = build_model(cfg, seed=1, dtype=torch.bfloat16)
    save_model(model, cfg, tmp_path)
    loaded = load_model(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.float()), k


def test_one_slice_of_a_stacked_tensor_is_read_alone(tmp_path):
    cfg = _cfg()
    model = build_model(cfg, seed=2)
    save_model(model, cfg, tmp_path)
    stored = read_safetensors_header(tmp_path / ModelDir.WEIGHTS)
    name = "layers.1.ffn.experts.w_down"
    fd = open_weights(stored[name].path)  # type: ignore[arg-type]
    try:
        out = torch.empty(stored[name].shape[1:])
        read_tensor(name, stored[name], out, fd, index=2)
    finally:
        os.close(fd)
    assert torch.equal(out, model.state_dict()[name][2])


def test_a_file_truncated_after_its_header_was_read_names_file_and_tensor(tmp_path):
    cfg = _cfg()
    save_model(build_model(cfg), cfg, tmp_path)
    path = tmp_path / ModelDir.WEIGHTS
    stored = read_safetensors_header(path)
    last = max(stored, key=lambda n: stored[n].begin)
    os.truncate(path, stored[last].begin + 4)
    fd = open_weights(path)
    try:
        with pytest.raises(ValueError, match=rf"model\.safetensors .*tensor '{last}'.*truncated"):
            read_tensor(last, stored[last], torch.empty(stored[last].shape), fd)
    finally:
        os.close(fd)
    path.unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable .*No such file"):
        open_weights(path)


def test_a_byte_range_that_does_not_fit_the_shape_is_refused(tmp_path):
    path = tmp_path / ModelDir.WEIGHTS
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(4, 4), "b": torch.zeros(2)}, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["a"]["shape"] = [4, 2]  # the file still gives it 64 bytes
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    stored = read_safetensors_header(path)
    fd = open_weights(path)
    try:
        with pytest.raises(
            ValueError, match=r"tensor 'a' holds 64 bytes where F32 \[4, 2\] needs 32"
        ):
            read_tensor("a", stored["a"], torch.empty(4, 2), fd)
    finally:
        os.close(fd)


PEAK_SCRIPT = """
import json, sys
from moekit.config import ModelConfig
from moekit.model import meta_model
from moekit.model_dir import load_model

def status(field):  # resident bytes now (VmRSS) or at the peak so far (VmHWM)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

# The runtime: torch, moekit, and what building a model on the meta device imports.
meta_model(ModelConfig.from_dict(json.loads(sys.argv[2])))
base = status("VmRSS")
model = load_model(sys.argv[1])
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"base": base, "peak": status("VmHWM"), "model": size}))
"""

SLACK = 48 * 2**20  # allocator and interpreter noise; a second copy would be the model's size


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_loading_holds_one_copy_of_the_weights(tmp_path):
    cfg = _cfg(dim=512, layers=4, experts=16, hidden=640)  # about 260 MB of float32
    save_model(build_model(cfg, seed=None), cfg, tmp_path)
    file_size = (tmp_path / ModelDir.WEIGHTS).stat().st_size
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    tiny = json.dumps(_cfg().to_dict())
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), tiny],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["model"] > 0.99 * file_size > 200 * 2**20
    assert r["peak"] - r["base"] <= r["model"] + SLACK, r
