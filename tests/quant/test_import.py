"""`convert --from-hf --quantize`: quantising while importing gives the same directory as
importing and then quantising."""

import pytest
from safetensors.torch import load_file

from moekit import export_hf, import_hf, quantize
from moekit.cli.commands import main
from moekit.model_dir import ModelDir


@pytest.mark.parametrize("bits", [8, 4])
def test_import_with_quantisation_equals_import_then_quantize(tiny_model_dir, tmp_path, bits):
    export_hf(tiny_model_dir, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "direct", quantize=bits)
    import_hf(tmp_path / "hf", tmp_path / "float")
    quantize(tmp_path / "float", tmp_path / "after", bits=bits)
    assert ModelDir(tmp_path / "direct").config() == ModelDir(tmp_path / "after").config()
    direct = load_file(tmp_path / "direct" / "model.safetensors")
    after = load_file(tmp_path / "after" / "model.safetensors")
    assert direct.keys() == after.keys()
    assert "layers.0.ffn.experts.w_up.qweight" in direct
    for name, t in after.items():
        assert direct[name].equal(t), name


def test_convert_quantize_flag(tiny_model_dir, tmp_path, capsys):
    export_hf(tiny_model_dir, tmp_path / "hf")
    args = ["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "q")]
    assert main([*args, "--quantize", "4", "--group-size", "64"]) == 0
    q = ModelDir(tmp_path / "q").config().quantization
    assert q is not None and (q.bits, q.group_size) == (4, 64)
    assert main([*args[:3], "--out", str(tmp_path / "x"), "--group-size", "64"]) == 2
    assert "--group-size needs --quantize 4" in capsys.readouterr().err
