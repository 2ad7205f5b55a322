"""The outputs of `moekit analyze`, written into the folder it is given:

  analysis.json       every number, as one JSON object (`Analysis.to_dict()`)
  load.png            share of routed copies per expert and MoE layer (a heatmap)
  classes.png         per layer, where each token class goes (class x expert)
  domains.png         per layer, where each domain goes (domain x expert)
  specialisation.png  normalised mutual information per layer, against its shuffled baseline
  consistency.png     expert overlap of paraphrases against unrelated prompts, per layer
  coactivation.png    per layer, how often expert j is chosen along with expert i
  report.html         all of it in one self-contained page (images embedded, no network)

The page is the template analysis.html.j2 of `moekit.report`, filled from the `Analysis`.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.analysis.plots import PLOTS, write_plots
from moekit.analysis.result import ANALYSIS_JSON, Analysis
from moekit.analysis.specialization import display_token
from moekit.files import atomic_write_text
from moekit.report.page import png_data_uri, render

REPORT_HTML = "report.html"

# The page's sections: (id, link text) for its navigation bar.
SECTIONS = [("summary", "Summary"), ("load", "Load"), ("classes", "Token classes"),
            ("domains", "Domains"), ("top", "Top tokens"), ("consistency", "Consistency"),
            ("coactivation", "Co-activation"), ("method", "Method and limits")]  # fmt: skip

# The alternative text of each figure on the page.
ALT = {
    "load": "share of routed copies per expert and layer",
    "classes": "expert distribution per token class",
    "domains": "expert distribution per domain",
    "specialisation": "normalised mutual information per layer against chance",
    "consistency": "expert overlap of paraphrases and of unrelated prompts",
    "coactivation": "conditional co-activation per layer",
}


def report_files() -> list[str]:
    """The files `write_report` writes, in the order analysis.json lists them."""
    return [*PLOTS.values(), ANALYSIS_JSON, REPORT_HTML]


def write_report(result: Analysis, out_dir: Path) -> None:
    """Write the plots, analysis.json and report.html of `result` into `out_dir` (created
    when missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plots(result, out_dir)
    atomic_write_text(out_dir / ANALYSIS_JSON, json.dumps(result.to_dict(), indent=1) + "\n")
    atomic_write_text(out_dir / REPORT_HTML, render_html(result, out_dir))


def render_html(result: Analysis, out: Path) -> str:
    """The self-contained report page for an `Analysis` whose plots are in `out`."""
    images = {key: png_data_uri(out / name) for key, name in PLOTS.items()}
    return render(
        "analysis.html.j2",
        a=result,
        sections=SECTIONS,
        images=images,
        alt=ALT,
        display_token=display_token,
    )
