"""`moekit analyze` end to end on a tiny random model: the JSON, the plots, the self-contained
page, the command line, and the page in headless Chromium."""

import contextlib
import io
import json
import re

import pytest

from moekit.analysis.analyze import analyze
from moekit.analysis.paraphrases import builtin_pairs, load_pairs
from moekit.analysis.plots import PLOTS
from moekit.analysis.result import Analysis
from moekit.analysis.routing import stderr_progress
from moekit.analysis.specialization import TOKEN_CLASSES
from moekit.cli import main
from moekit.cli.analyze import print_summary

from ..conftest import ARTIFACTS

USER_PAIRS = [
    {"a": "print the list", "b": "show the list on screen", "category": "mine"},
    {"a": "x = 1 + 2", "b": "x = 3"},
    {"a": "What is a tuple?", "b": "Explain tuples."},
]


@pytest.fixture(scope="module")
def analysed(tiny_model_dir, tmp_path_factory):
    """The command line run once on the tiny model, with --json: (printed result, out dir)."""
    root = tmp_path_factory.mktemp("analyze")
    pairs = root / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in USER_PAIRS) + "\n")
    out = root / "out"
    argv = ["analyze", str(tiny_model_dir), "--out", str(out), "--max-tokens", "1536",
            "--seq-len", "64", "--batch-size", "4", "--paraphrases", str(pairs), "--quiet",
            "--json"]  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return json.loads(stdout.getvalue()), out


def test_json_has_every_section_with_sane_shapes(analysed):
    result, out = analysed
    assert json.loads((out / "analysis.json").read_text()) == result
    e, layers = 8, ["0", "1"]
    assert result["model"]["moe_layers"] == [0, 1] and result["model"]["num_experts"] == e
    data = result["data"]
    assert data["tokens"] == 1536
    assert set(data["tokens_per_domain"]) == {"prose", "code", "arithmetic", "records"}
    assert sum(data["tokens_per_domain"].values()) == 1536

    load = result["load"]
    assert load["capacity_factor"] == 1.25 and list(load["layers"]) == layers
    for v in load["layers"].values():
        assert sum(v["tokens_per_expert"]) == 1536 * 2
        assert sum(v["share"]) == pytest.approx(1.0)
        assert 1.0 <= v["imbalance"] <= e
        assert 0 < v["entropy"] <= v["entropy_max"] + 1e-6
        assert 0 <= v["dropped"] < 1536 * 2

    spec = result["specialisation"]
    assert spec["class"]["labels"] == list(TOKEN_CLASSES)
    assert spec["domain"]["labels"] == list(data["tokens_per_domain"])
    assert sum(spec["domain"]["tokens"]) < 1536  # end-of-text separators carry no label
    for kind, rows in (("class", len(TOKEN_CLASSES)), ("domain", 4)):
        for v in spec[kind]["layers"].values():
            assert 0.0 <= v["nmi"] <= 1.0 and v["baseline_std"] >= 0
            assert len(v["distribution"]) == rows and len(v["distribution"][0]) == e

    top = result["top_tokens"]
    assert top["layer"] == 1  # the middle of MoE layers [0, 1]
    assert [x["expert"] for x in top["experts"]] == list(range(e))
    assert sum(x["copies"] for x in top["experts"]) == 1536 * 2
    assert all(len(x["by_count"]) <= 10 for x in top["experts"])
    first = next(x for x in top["experts"] if x["by_count"])["by_count"][0]
    assert first["count"] >= 1 and isinstance(first["token"], str)

    groups = result["consistency"]["groups"]
    assert groups["builtin"]["pairs"] == len(builtin_pairs())
    assert groups["user"]["pairs"] == 3
    assert set(groups["user"]["categories"]) == {"mine", "user"}
    for g in groups.values():
        for v in g["layers"].values():
            assert 0 <= v["paraphrase_weighted"] <= 1 and 0 <= v["unrelated_weighted"] <= 1

    coact = result["coactivation"]
    assert coact["uniform_conditional"] == pytest.approx(1 / 7)
    for v in coact["layers"].values():
        counts = v["counts"]
        assert len(counts) == e and all(len(r) == e for r in counts)
        assert sum(counts[i][i] for i in range(e)) == 1536 * 2
        assert all(counts[i][j] == counts[j][i] for i in range(e) for j in range(e))
        assert v["top_pairs"] and v["top_pairs"][0]["tokens"] == max(
            counts[i][j] for i in range(e) for j in range(i + 1, e)
        )
    for name in result["files"]:
        assert (out / name).stat().st_size > 0
    for name in PLOTS.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_is_self_contained(analysed):
    _, out = analysed
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    images = re.findall(r'<img src="([^"]*)"', page)
    assert len(images) == len(PLOTS)
    assert all(src.startswith("data:image/png;base64,") for src in images)
    for heading in ("Load", "Specialisation by token class", "Consistency across paraphrases",
                    "Co-activation", "Top tokens of layer 1"):  # fmt: skip
        assert f">{heading}</h2>" in page


def test_the_typed_result_reads_back_from_analysis_json(analysed):
    result, out = analysed
    typed = Analysis.read(out)
    assert typed.to_dict() == result
    assert (out / "analysis.json").read_text() == json.dumps(typed.to_dict(), indent=1) + "\n"
    assert typed.specialisation.by_class.labels == list(TOKEN_CLASSES)
    assert set(typed.load.layers) == {0, 1} and typed.top_tokens.layer == 1
    assert typed.consistency.groups["user"].layers[0].unrelated_weighted is not None


def test_summary_is_printed_without_json(analysed, capsys):
    result, out = analysed
    print_summary(Analysis.from_dict(result), out)
    printed = capsys.readouterr().out
    assert "class NMI" in printed and "report.html" in printed


def test_user_data_with_domains_and_a_chosen_layer(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"text": "def f(x):\n    return x + 1\n" * 8, "kind": "code"},
            {"text": "The cat sat on the mat. " * 12, "kind": "story"}]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = analyze(tiny_model_dir, tmp_path / "out", data=str(data), domain_field="kind",
                     max_tokens=300, seq_len=32, layer=0, capacity_factor=2.0,
                     progress=False)  # fmt: skip
    assert isinstance(result, Analysis)
    assert result.data.source == f"user data: {data}"
    assert set(result.data.tokens_per_domain) == {"code", "story"}
    assert result.top_tokens.layer == 0
    assert result.load.capacity_factor == 2.0
    classes = dict(zip(TOKEN_CLASSES, result.specialisation.by_class.tokens, strict=True))
    assert classes["code"] > 0 and classes["capitalised"] > 0  # "def" in code, "The" in prose
    assert (tmp_path / "out" / "report.html").exists()


def test_refuses_a_dense_model_and_a_layer_that_is_not_moe(tiny_model_dir, tmp_path):
    from moekit.config import ModelConfig

    dense = tmp_path / "dense"
    dense.mkdir()
    ModelConfig.from_dict(
        dict(vocab_size=64, dim=32, num_layers=2, num_heads=2, max_seq_len=32)
    ).save(dense / "config.json")
    with pytest.raises(ValueError, match="dense model"):
        analyze(dense, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="layer=5 is not an MoE layer"):
        analyze(tiny_model_dir, tmp_path / "out", layer=5, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        analyze(tiny_model_dir, tmp_path / "out", max_tokens=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_paraphrase_files_are_checked(tmp_path):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"a": "one", "b": "1"}\n\n{"a": "two", "b": "2", "category": "n"}\n')
    assert [(p.a, p.category) for p in load_pairs(good)] == [("one", "user"), ("two", "n")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "one", "b": "1"}\n{"a": "two"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'b'"):
        load_pairs(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="malformed JSON"):
        load_pairs(bad)
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "missing.jsonl")
    pairs = builtin_pairs()
    assert 20 <= len(pairs) <= 40
    assert {p.category for p in pairs} == {"prose", "code", "arithmetic", "records"}


def test_progress_line_goes_to_stderr(capsys):
    report = stderr_progress("moekit analyze")
    report(512, 1024)
    report(1024, 1024)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err == "\rmoekit analyze: 512/1,024 tokens\rmoekit analyze: 1,024/1,024 tokens\n"
    )


def test_report_renders_in_chromium(analysed, browser):
    _, out = analysed
    shot = ARTIFACTS / "analysis-report.png"
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((out / "report.html").as_uri())
    page.wait_for_load_state("load")
    widths = page.locator("img").evaluate_all(
        "els => els.map(e => e.complete ? e.naturalWidth : 0)"
    )
    assert len(widths) == len(PLOTS) and all(w > 0 for w in widths), widths
    assert page.locator("h2#load").is_visible()
    assert page.locator("h2#consistency").inner_text() == "Consistency across paraphrases"
    page.screenshot(path=str(shot), full_page=True)
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert shot.stat().st_size > 10_000


def test_analysis_of_a_trained_model_end_to_end(tmp_path, _private_cache):
    """A small MoE trained on the builtin corpus (the demo's recipe, scaled down), analysed
    from its model directory: every section is there, and specialisation stands clear of
    the shuffled-label chance."""
    from moekit.training.config import resolve_run_config
    from moekit.training.trainer import train

    from ..conftest import TINY_RUN

    cfg = resolve_run_config(preset="debug", overrides=[*TINY_RUN, "train.max_steps=30"])
    train(cfg, tmp_path / "model", verbose=False, report=False)
    result = analyze(tmp_path / "model", tmp_path / "analysis", max_tokens=2048, seq_len=32,
                     progress=False)  # fmt: skip
    assert (tmp_path / "analysis" / "report.html").is_file()
    layers = result.to_dict()["specialisation"]["class"]["layers"]
    assert set(layers) == {"0", "1"}
    for layer, spec in layers.items():
        chance = spec["baseline_mean"] + 3 * spec["baseline_std"]
        assert spec["nmi"] > chance, (layer, spec["nmi"], chance)


def test_a_dense_layer_in_the_middle_is_skipped_by_name(tiny_model_dir, tmp_path):
    """Layers 0 and 2 are MoE, layer 1 dense (`moe.dense_layers`): the analysis reports the
    MoE layers by their own indices and refuses the dense one."""
    import shutil

    from moekit import build_model
    from moekit.config import ModelConfig
    from moekit.model_dir import save_model

    model_dir = tmp_path / "middle"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    cfg = ModelConfig.from_dict(
        dict(vocab_size=512, dim=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden=128,
             max_seq_len=128, moe=dict(num_experts=8, top_k=2, expert_hidden=64,
                                       dense_layers=[1]))
    )  # fmt: skip
    save_model(build_model(cfg, seed=0), cfg, model_dir)
    result = analyze(model_dir, tmp_path / "out", max_tokens=200, seq_len=32, progress=False)
    assert result.model.moe_layers == [0, 2]
    assert sorted(result.load.layers) == [0, 2]
    with pytest.raises(ValueError, match="layer=1 is not an MoE layer"):
        analyze(model_dir, tmp_path / "out2", layer=1, progress=False)
