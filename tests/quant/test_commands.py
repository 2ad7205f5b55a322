"""Every command that reads a model directory reads a quantised one: quantize, info, generate,
chat, serve, analyze, doctor, convert."""

import json

import httpx
import pytest
import torch

from moekit.cli.commands import main
from moekit.infer.chat import ChatSession, ChatTemplate
from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.quant.experts import QuantExperts


@pytest.fixture(scope="module")
def int4_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "q"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--out", str(out)]) == 0
    return out


def test_quantize_command_reports_bytes_and_progress(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["quantize", str(tiny_model_dir), "--bits", "8", "--only", "all",
                 "--out", str(out), "--json"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["bits"] == 8 and result["parts"] == "all"
    assert result["bytes_after"] < 0.4 * result["bytes_before"]  # int8 + scales vs float32
    assert "layers.0.ffn.experts.w_up" in captured.err  # progress on stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bits", "3"], "--bits 3 is not a supported bit width"),
        (["--bits", "4", "--group-size", "48"], "--group-size 48 is invalid"),
        (["--bits", "8", "--group-size", "32"], "group_size applies to 4 bits only"),
    ],
)
def test_quantize_command_refuses_bad_flags(tiny_model_dir, tmp_path, capsys, flags, message):
    assert main(["quantize", str(tiny_model_dir), *flags, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_quantize_command_refuses_a_quantised_model(int4_dir, tmp_path, capsys):
    assert main(["quantize", str(int4_dir), "--bits", "8", "--out", str(tmp_path / "x")]) == 2
    assert "already quantised (4-bit, group size 32" in capsys.readouterr().err


def test_info_shows_bytes_per_dtype_and_part(int4_dir, capsys):
    assert main(["info", str(int4_dir), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["stored_bytes"]
    assert set(stored["by_dtype"]) == {"F32", "U8"}
    assert stored["quantization"] == {"bits": 4, "group_size": 32, "parts": "experts"}
    assert sum(stored["by_part"].values()) == stored["total"]
    # The experts: 4-bit values plus two float32 numbers per 32 of them.
    e, f, d, layers = 8, 64, 64, 2
    per_expert = 3 * f * d // 2 + 3 * (f * d // 32) * 2 * 4
    assert stored["by_part"]["experts"] == layers * e * per_expert
    assert main(["info", str(int4_dir)]) == 0
    out = capsys.readouterr().out
    assert "quantised" in out and "dtype U8" in out and "part experts" in out


def test_generate_and_chat_run_on_a_quantised_model(int4_dir, capsys):
    gen = Generator.from_dir(int4_dir, device="cpu")
    assert isinstance(gen.model.moe_layers()[0].experts, QuantExperts)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    text = gen.generate("The ", params)[0].text
    assert len(gen.tokenizer.encode(text)) >= 1
    chat = ChatSession(gen, params, template=ChatTemplate())
    assert "".join(chat.send("hello")) is not None
    assert main(["generate", str(int4_dir), "The ", "--max-new-tokens", "4"]) == 0


def test_greedy_decoding_with_a_cache_matches_the_full_forward(int4_dir):
    from moekit.infer.generate import greedy_generate
    from moekit.model_dir import load_model

    model = load_model(int4_dir).eval()
    prompt = [5, 17, 42, 99]
    new = greedy_generate(model, prompt, 8)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new]), causal_routing=True).logits[0]
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == new


def test_serve_answers_from_a_quantised_model(int4_dir):
    pytest.importorskip("fastapi")
    from tests.serve.conftest import running_server

    with running_server(int4_dir, max_batch=2) as (url, _engine):
        body = {"model": "tiny", "prompt": "The ", "max_tokens": 4, "temperature": 0}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1


def test_analyze_and_doctor_read_a_quantised_model(int4_dir, tmp_path, capsys):
    assert main(["analyze", str(int4_dir), "--out", str(tmp_path / "an")]) == 0
    assert (tmp_path / "an" / "analysis.json").is_file()
    capsys.readouterr()
    code = main(["doctor", str(int4_dir), "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["expert_copies"]["status"] == "ok", checks["expert_copies"]
    assert code == 0


def test_convert_to_hf_writes_a_quantised_model_dequantised(int4_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from moekit.model_dir import load_model

    assert main(["convert", "--to-hf", str(int4_dir), "--out", str(tmp_path / "hf")]) == 0
    assert "exporting its weights dequantised to float32" in capsys.readouterr().err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(int4_dir).eval()
    tokens = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        expected = ours(tokens, causal_routing=True).logits
        torch.testing.assert_close(hf(tokens).logits, expected, rtol=1e-4, atol=1e-4)


def test_finetuning_a_quantised_model_is_refused_by_name(int4_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "completion": " there"}\n' * 20)
    args = ["finetune", str(int4_dir), "--data", str(data), "--out", str(tmp_path / "ft")]
    assert main([*args, "--quiet", "train.max_steps=1"]) == 2
    assert "is quantised (4 bits): fine-tuning needs float weights" in capsys.readouterr().err
