"""The page layer: every template renders with autoescaping, pages are self-contained
(images embedded, nothing fetched), and the helpers format as the pages need."""

import base64
import re
from typing import Any

import pytest

from moekit.analysis.result import Analysis
from moekit.report import page, plots

from ..conftest import ARTIFACTS

EVIL = '<script>alert("x")</script>&'
ESCAPED = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;"


def training_context(text: str, png: str | None) -> dict[str, Any]:
    summary = {
        "steps": 4, "tokens": 2048, "train_seconds": 3.2, "val_loss": 4.5,
        "val_by_domain": {text: 4.4}, "total_params": 123456, "active_params": 65432,
        "skipped_steps": 0, "expert_load": {"0": [0.5, 0.5]},
        "expert_health": {"0": {"imbalance": 1.0, "dead": [], "nearly_dead": []}},
        "data": {}, "finetune": text,
    }  # fmt: skip
    return dict(run_dir=text, summary=summary, health=summary["expert_health"],
                nearly_dead_fraction=0.1, samples=[{"prompt": text, "completion": text}],
                loss_png=png, load_png=png)  # fmt: skip


def analysis_dict(text: str) -> dict[str, Any]:
    """A complete analysis.json of one MoE layer with two experts, `text` in every string a
    user controls (paths, data source, domains, tokens, paraphrase groups, categories)."""
    spec_layer = {"nmi": 0.1, "mi_bits": 0.1, "baseline_mean": 0.01, "baseline_std": 0.001,
                  "excess": 0.09, "distribution": [[0.5, 0.5]]}  # fmt: skip
    tokens = {"token": text, "id": 7, "count": 3, "occurrences": 4, "share": 0.75}
    cons = {"paraphrase_jaccard": 1.0, "unrelated_jaccard": None, "paraphrase_weighted": 0.9,
            "unrelated_weighted": None, "same_category_weighted": None}  # fmt: skip
    return {
        "model_dir": text, "moekit_version": "0",
        "model": {"num_layers": 1, "moe_layers": [0], "num_experts": 2, "top_k": 1,
                  "router": "topk", "score_func": "softmax"},
        "data": {"source": text, "tokens": 10, "tokens_per_domain": {text: 10},
                 "max_tokens": 10, "seq_len": 10, "batch_size": 1, "seed": 0},
        "load": {"capacity_factor": 1.25, "capacity_priority": "weight",
                 "nearly_dead_fraction": 0.1, "note": "copies over capacity per batch",
                 "layers": {"0": {"tokens_per_expert": [10, 0], "share": [1.0, 0.0],
                                  "imbalance": 2.0, "cv": 1.0, "dead": [1], "nearly_dead": [1],
                                  "entropy": 0.1, "entropy_max": 0.69,
                                  "entropy_normalized": 0.14, "dropped": 2,
                                  "dropped_fraction": 0.2}}},
        "specialisation": {"score": "s", "observations": "o", "shuffles": 5,
                           "class": {"labels": [text], "tokens": [10],
                                     "layers": {"0": spec_layer}},
                           "domain": {"labels": [text], "tokens": [10],
                                      "layers": {"0": spec_layer}}},
        "top_tokens": {"layer": 0, "min_occurrences": 5,
                       "experts": [{"expert": 0, "copies": 10, "by_count": [tokens],
                                    "distinctive": []},
                                   {"expert": 1, "copies": 0, "by_count": [],
                                    "distinctive": [tokens]}]},
        "consistency": {"set_measure": "s", "weighted_measure": "w", "unrelated": "u",
                        "same_category": "c",
                        "groups": {text: {"pairs": 1, "layers": {"0": cons},
                                          "categories": {text: {"pairs": 1,
                                                                "layers": {"0": 0.9}}}}}},
        "coactivation": {"conditional": "c", "uniform_conditional": 0.0,
                         "uniform_pair_share": 0.0,
                         "layers": {"0": {"counts": [[10, 0], [0, 0]],
                                          "conditional": [[0.0, 0.0], [0.0, 0.0]],
                                          "top_pairs": []}}},
        "files": ["analysis.json"],
    }  # fmt: skip


def analysis_context(text: str, png: str | None) -> dict[str, Any]:
    from moekit.analysis.report import ALT, SECTIONS
    from moekit.analysis.specialization import display_token

    return dict(a=Analysis.from_dict(analysis_dict(text)), sections=SECTIONS,
                images=dict.fromkeys(ALT, png), alt=ALT,
                display_token=display_token)  # fmt: skip


# One context builder per page template: a new template needs one here.
def evidence_context(text: str, png: str | None) -> dict[str, Any]:
    from moekit.bench.evidence import Evidence, RunFigures, Verdict

    run = RunFigures(text, 0, 2.5, [{"step": 1, "tokens": 8, "val_loss": 2.5}],
                     [{"step": 1, "imbalance": 1.2}], 0.0, 1.0, 10, 5)  # fmt: skip
    verdicts = [Verdict("aux_free", text, text, "moe", 2.5, 2.6, -0.1, 0.01, text, [run])]
    evidence = Evidence("small", [0, 1], 10, verdicts, [{"k": 1, "val_loss": 2.7,
                        "decode_tokens_per_s": 100.0}], 60.0)  # fmt: skip
    return {"evidence": evidence, "images": {"aux_free": png, "aux_free_balance": png}}


CONTEXTS = {"analysis.html.j2": analysis_context, "training.html.j2": training_context,
            "evidence.html.j2": evidence_context}  # fmt: skip


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("png") / "load.png"
    plots.expert_load({0: [0.25, 0.75]}, path)
    uri = page.png_data_uri(path)
    assert uri is not None
    return uri


def test_every_page_template_has_a_test_context():
    assert page.template_names() == sorted(CONTEXTS)


@pytest.mark.parametrize("template", sorted(CONTEXTS))
def test_every_template_escapes_what_it_writes(template, png):
    html = page.render(template, **CONTEXTS[template](EVIL, png))
    assert "<script" not in html
    assert ESCAPED in html
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "font: 15px/1.5 system-ui" in html  # the shared CSS of the page shell


@pytest.mark.parametrize("template", sorted(CONTEXTS))
def test_pages_are_self_contained(template, png):
    html = page.render(template, **CONTEXTS[template]("text", png))
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    images = re.findall(r'<img src="([^"]*)"', html)
    assert images and all(src == png for src in images)
    # Without an image a page shows none (rather than a broken one).
    assert "<img" not in page.render(template, **CONTEXTS[template]("text", None))


def test_a_missing_context_value_is_an_error():
    import jinja2

    context = training_context("x", None)
    del context["samples"]
    with pytest.raises(jinja2.UndefinedError, match="samples"):
        page.render("training.html.j2", **context)


def test_png_data_uri(tmp_path):
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    (tmp_path / "a.png").write_bytes(data)
    uri = page.png_data_uri(tmp_path / "a.png")
    assert uri is not None and uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.removeprefix("data:image/png;base64,")) == data
    assert page.png_data_uri(tmp_path / "missing.png") is None


def test_filters_and_tests():
    assert page.thousands(1234567) == "1,234,567"
    assert page.fixed(None) == "n/a" and page.fixed(1.23456) == "1.235"
    assert page.fixed(2.5, 0) == "2"
    assert page.pct(0.1) == "10%" and page.pct(0.0123, 1) == "1.2%"
    assert page.numeric("1.5") and page.numeric("-3") and page.numeric("0, 3")
    assert not page.numeric("layer 0") and not page.numeric("") and not page.numeric("n/a")


def test_the_training_page_renders_in_chromium(tmp_path, png, browser):
    (tmp_path / "report.html").write_text(page.render("training.html.j2",
                                                      **training_context("run", png)))  # fmt: skip
    shot = ARTIFACTS / "training-report-page.png"
    tab = browser.new_page(viewport={"width": 1100, "height": 900})
    requests: list[str] = []
    tab.on("request", lambda r: requests.append(r.url))
    tab.goto((tmp_path / "report.html").as_uri())
    tab.wait_for_load_state("load")
    widths = tab.locator("img").evaluate_all("els => els.map(e => e.naturalWidth)")
    assert len(widths) == 2 and all(w > 0 for w in widths), widths
    assert tab.locator("h2#expert-load").inner_text() == "Expert load"
    tab.screenshot(path=str(shot), full_page=True)
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
