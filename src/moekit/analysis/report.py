"""`moekit analyze`: measure a model's routing on real text and write a report about it.

Output, in the folder given:
  analysis.json       every number below, as one JSON object
  load.png            share of routed copies per expert and MoE layer (a heatmap)
  classes.png         per layer, where each token class goes (class x expert)
  domains.png         per layer, where each domain goes (domain x expert)
  specialisation.png  normalised mutual information per layer, against its shuffled baseline
  consistency.png     expert overlap of paraphrases against unrelated prompts, per layer
  coactivation.png    per layer, how often expert j is chosen along with expert i
  report.html         all of it in one self-contained page (images embedded, no network)

The metrics themselves live in `moekit.analysis.routing` and `moekit.analysis.specialization`
as pure functions; this module gathers the text, runs the model once, and writes the results.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from moekit.analysis.paraphrases import ParaphrasePair, builtin_pairs, load_pairs
from moekit.analysis.routing import (
    NEARLY_DEAD_FRACTION,
    RoutingTrace,
    TokenSample,
    capacity_drops,
    coactivation,
    conditional_coactivation,
    consistency,
    expert_counts,
    load_stats,
    prompt_usage,
    sample_tokens,
    stderr_progress,
    top_pairs,
    trace_routing,
)
from moekit.analysis.specialization import (
    TOKEN_CLASSES,
    TopToken,
    class_table,
    display_token,
    specialisation,
    top_tokens,
)
from moekit.files import atomic_write_text
from moekit.model_dir import ModelDir
from moekit.runtime import resolve_device

if TYPE_CHECKING:
    from moekit.config import ModelConfig, MoEConfig
    from moekit.data.corpus import Document
    from moekit.data.tokenizer import Tokenizer
    from moekit.model import Transformer

DEFAULT_CAPACITY_FACTOR = 1.25
CODE_DOMAIN = "code"  # tokens of documents in this domain may be classed as "code"
TOP_MIN_OCCURRENCES = 5  # a token must be seen this often to count as "distinctive"
MAX_PLOTTED_LAYERS = 8  # per-layer figures show at most this many layers, evenly spaced
PLOTS = {
    "load": "load.png",
    "classes": "classes.png",
    "domains": "domains.png",
    "specialisation": "specialisation.png",
    "consistency": "consistency.png",
    "coactivation": "coactivation.png",
}


def analyze(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    data: str | None = None,
    text_field: str = "text",
    domain_field: str | None = None,
    max_tokens: int = 32_768,
    batch_size: int = 8,
    seq_len: int = 256,
    capacity_factor: float | None = None,
    layer: int | None = None,
    paraphrases: str | Path | None = None,
    shuffles: int = 5,
    top_n: int = 10,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure how an MoE model routes real text and write plots, analysis.json and report.html.

    Runs up to `max_tokens` tokens of text through the model in `model_dir` (inference
    routing, rows of `seq_len`, `batch_size` rows per call) and measures, per MoE layer:
    expert load and router entropy, the copies a `capacity_factor` would drop (default: the
    model's own, else 1.25), specialisation by token class and by domain against a shuffled
    baseline (`shuffles` permutations, seeded by `seed`), co-activation, and the consistency of
    expert use across paraphrases (the builtin pairs plus the .jsonl file `paraphrases`);
    and the `top_n` tokens of each expert of `layer` (default: the middle MoE layer).

    `data`: None for the held-out validation documents of the builtin corpus (labelled with
    their domains), or a source as `DataConfig.source` reads it (.txt, folders, .jsonl with
    `text_field` and optional `domain_field`, .parquet). `device`: default CUDA when available.
    Returns what analysis.json holds. Raises ValueError for a model without MoE layers or a
    `layer` that is not an MoE layer, FileNotFoundError for a missing directory or file.
    """
    # 1. Config first: refuse a dense model before loading any weights.
    # 2. Text, tokens and labels; 3. one recorded pass; 4. metrics; 5. paraphrases;
    # 6. plots, JSON, HTML.
    from moekit.config import ModelConfig
    from moekit.data.tokenizer import Tokenizer
    from moekit.model_dir import load_model
    from moekit.version import __version__

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = ModelConfig.load(model_dir)
    moe = _moe_config(cfg, model_dir)
    layers = cfg.moe_layers
    chosen_layer = layers[len(layers) // 2] if layer is None else layer
    if chosen_layer not in layers:
        raise ValueError(
            f"layer={layer} is not an MoE layer of this model; MoE layers: "
            f"{', '.join(map(str, layers))}"
        )
    sizes = {"max_tokens": max_tokens, "batch_size": batch_size, "seq_len": seq_len,
             "shuffles": shuffles, "top_n": top_n}  # fmt: skip
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} is invalid: must be > 0")
    pairs = _pairs(paraphrases)

    docs, source = _documents(model_dir, data, text_field, domain_field)
    tokenizer = Tokenizer.load(model_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"{cfg.vocab_size}; the tokenizer.json belongs to another model"
        )
    device = str(resolve_device(device))
    model = load_model(model_dir, device=device)
    sample = sample_tokens(docs, tokenizer, max_tokens)
    classes, domains, texts = _labels(sample, tokenizer)

    trace = trace_routing(
        model,
        sample.ids,
        seq_len=seq_len,
        batch_size=batch_size,
        progress=stderr_progress("moekit analyze") if progress else None,
    )
    cf = capacity_factor or moe.capacity_factor or DEFAULT_CAPACITY_FACTOR
    gen = torch.Generator().manual_seed(seed)
    result: dict[str, Any] = {
        "model_dir": str(model_dir),
        "moekit_version": __version__,
        "model": {
            "num_layers": cfg.num_layers,
            "moe_layers": layers,
            "num_experts": moe.num_experts,
            "top_k": moe.top_k,
            "router": moe.router,
            "score_func": moe.score_func,
        },
        "data": {
            "source": source,
            "tokens": int(sample.ids.numel()),
            "tokens_per_domain": sample.tokens_per_domain(),
            "max_tokens": max_tokens,
            "seq_len": trace.seq_len,
            "batch_size": batch_size,
            "seed": seed,
        },
        "load": _load_section(trace, moe, cf),
        "specialisation": {
            "score": "I(E;C) / H(C)",
            "observations": "each chosen expert of a token is one observation",
            "shuffles": shuffles,
            "class": _spec_section(trace, classes, list(TOKEN_CLASSES), shuffles, gen),
            "domain": _spec_section(trace, domains, sample.domain_names, shuffles, gen),
        },
        "top_tokens": _top_tokens_section(trace, chosen_layer, sample, texts, top_n),
        "consistency": _consistency_section(model, tokenizer, pairs),
        "coactivation": _coactivation_section(trace, moe),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    result["files"] = _plot_all(result, out_dir)
    result["files"] += ["analysis.json", "report.html"]
    atomic_write_text(out_dir / "analysis.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out_dir / "report.html", render_html(result, out_dir))
    return result


# ----------------------------------------------------------------------------- inputs


def _moe_config(cfg: ModelConfig, model_dir: Path) -> MoEConfig:
    if cfg.moe is None or not cfg.moe_layers:
        raise ValueError(
            f"{str(model_dir)!r} holds a dense model (no MoE layers): there is no routing to "
            "analyse; `moekit info` describes dense models"
        )
    return cfg.moe


def _pairs(paraphrases: str | Path | None) -> dict[str, list[ParaphrasePair]]:
    groups = {"builtin": builtin_pairs()}
    if paraphrases is not None:
        groups["user"] = load_pairs(paraphrases)
    return groups


def _documents(
    model_dir: Path, data: str | None, text_field: str, domain_field: str | None
) -> tuple[list[Document], str]:
    """The documents to analyse and a sentence saying what they are."""
    from moekit.data.config import DataConfig
    from moekit.data.corpus import builtin_corpus, load_documents, split_documents

    if data is not None:
        cfg = DataConfig(source=data, text_field=text_field, domain_field=domain_field)
        return load_documents(cfg), f"user data: {data}"
    # The validation split of the builtin corpus, cut as the run that trained the model cut
    # it when its run.json says so (then the text is held out from training).
    cfg = DataConfig()
    run_file = model_dir / ModelDir.RUN_CONFIG
    if run_file.is_file():
        try:
            recorded = json.loads(run_file.read_text()).get("data", {})
        except (json.JSONDecodeError, AttributeError):
            recorded = {}
        if isinstance(recorded, dict) and recorded.get("source") == "builtin":
            # An unreadable record keeps the defaults, which still give a fair sample.
            with contextlib.suppress(TypeError, ValueError):
                cfg = DataConfig(
                    max_chars_per_domain=int(recorded.get("max_chars_per_domain", 2_000_000)),
                    val_fraction=float(recorded.get("val_fraction", 0.05)),
                    seed=int(recorded.get("seed", 0)),
                )
    docs = builtin_corpus(cfg.max_chars_per_domain, cfg.seed)
    _, val = split_documents(docs, cfg.val_fraction, cfg.seed)
    if val:
        return val, f"builtin corpus, validation split (val_fraction={cfg.val_fraction})"
    return docs, "builtin corpus (no validation split)"


def _labels(sample: TokenSample, tokenizer: Tokenizer) -> tuple[Tensor, Tensor, dict[int, str]]:
    """Per-token class and domain labels (-1 for special tokens) and the text of each id seen."""
    seen = sample.ids.unique().tolist()
    texts = {i: tokenizer.decode([i]) for i in seen}
    size = max(seen) + 1
    specials = [tokenizer.eos_id, tokenizer.pad_id]
    if tokenizer.bos_id is not None:
        specials.append(tokenizer.bos_id)
    table = class_table([texts.get(i, "") for i in range(size)], specials)
    is_code = torch.tensor([name == CODE_DOMAIN for name in sample.domain_names], dtype=torch.long)
    classes = table[is_code[sample.domains], sample.ids]
    special = torch.isin(sample.ids, torch.tensor(specials))
    domains = sample.domains.masked_fill(special, -1)
    return classes, domains, texts


# ----------------------------------------------------------------------------- sections


def _load_section(trace: RoutingTrace, moe: MoEConfig, cf: float) -> dict[str, Any]:
    expert_choice = moe.router == "expert_choice"
    layers: dict[str, Any] = {}
    for i, lt in trace.layers.items():
        stats = load_stats(expert_counts(lt.experts, trace.num_experts))
        copies = sum(stats.tokens_per_expert)
        entropy = float(lt.entropy.double().mean()) if lt.entropy.numel() else 0.0
        dropped = None if expert_choice else capacity_drops(trace, i, moe, cf)
        layers[str(i)] = {
            "tokens_per_expert": stats.tokens_per_expert,
            "share": stats.share,
            "imbalance": stats.imbalance,
            "cv": stats.cv,
            "dead": stats.dead,
            "nearly_dead": stats.nearly_dead,
            "entropy": entropy,
            "entropy_max": math.log(trace.num_experts),
            "entropy_normalized": entropy / math.log(trace.num_experts)
            if trace.num_experts > 1
            else 0.0,
            "dropped": dropped,
            "dropped_fraction": None if dropped is None else dropped / max(1, copies),
        }
    group = "row" if moe.capacity_priority == "position" else "batch"
    return {
        "capacity_factor": cf,
        "capacity_priority": moe.capacity_priority,
        "nearly_dead_fraction": NEARLY_DEAD_FRACTION,
        "note": "expert choice fills each expert to capacity: nothing is dropped"
        if expert_choice
        else f"copies over capacity per {group}",
        "layers": layers,
    }


def _spec_section(
    trace: RoutingTrace, labels: Tensor, names: list[str], shuffles: int, gen: torch.Generator
) -> dict[str, Any]:
    counts = torch.bincount(labels[labels >= 0], minlength=len(names)).tolist()
    layers: dict[str, Any] = {}
    for i, lt in trace.layers.items():
        s = specialisation(
            lt.experts, labels, len(names), trace.num_experts, shuffles=shuffles, generator=gen
        )
        layers[str(i)] = {
            "nmi": s.nmi,
            "mi_bits": s.mi_bits,
            "baseline_mean": s.baseline_mean,
            "baseline_std": s.baseline_std,
            "excess": s.excess,
            "distribution": s.distribution.tolist(),
        }
    return {"labels": names, "tokens": counts, "layers": layers}


def _top_tokens_section(
    trace: RoutingTrace, layer: int, sample: TokenSample, texts: dict[int, str], n: int
) -> dict[str, Any]:
    lt = trace.layers[layer]
    by_count, distinctive = top_tokens(
        lt.experts, sample.ids, trace.num_experts, n=n, min_occurrences=TOP_MIN_OCCURRENCES
    )
    copies = expert_counts(lt.experts, trace.num_experts).tolist()

    def rows(tokens: list[TopToken]) -> list[dict[str, Any]]:
        return [
            {"token": texts.get(t.token_id, ""), "id": t.token_id, "count": t.count,
             "occurrences": t.occurrences, "share": t.share}
            for t in tokens
        ]  # fmt: skip

    experts = [
        {"expert": e, "copies": copies[e], "by_count": rows(by_count[e]),
         "distinctive": rows(distinctive[e])}
        for e in range(trace.num_experts)
    ]  # fmt: skip
    return {"layer": layer, "min_occurrences": TOP_MIN_OCCURRENCES, "experts": experts}


def _consistency_section(
    model: Transformer, tokenizer: Tokenizer, groups: dict[str, list[ParaphrasePair]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group, pairs in groups.items():
        pad = tokenizer.pad_id
        usage_a = prompt_usage(model, [tokenizer.encode(p.a) for p in pairs], pad_id=pad)
        usage_b = prompt_usage(model, [tokenizer.encode(p.b) for p in pairs], pad_id=pad)
        layers: dict[str, Any] = {}
        categories: dict[str, Any] = {}
        for i in usage_a:
            c = consistency(usage_a[i], usage_b[i], [p.category for p in pairs])
            layers[str(i)] = {
                "paraphrase_jaccard": c.paraphrase_jaccard,
                "unrelated_jaccard": c.unrelated_jaccard,
                "paraphrase_weighted": c.paraphrase_weighted,
                "unrelated_weighted": c.unrelated_weighted,
                "same_category_weighted": c.same_category_weighted,
            }
            for cat in dict.fromkeys(p.category for p in pairs):
                idx = [k for k, p in enumerate(pairs) if p.category == cat]
                entry = categories.setdefault(cat, {"pairs": len(idx), "layers": {}})
                entry["layers"][str(i)] = sum(c.per_pair[k] for k in idx) / len(idx)
        out[group] = {"pairs": len(pairs), "layers": layers, "categories": categories}
    return {
        "set_measure": "Jaccard of the sets of experts each prompt used (all its tokens)",
        "weighted_measure": "weighted Jaccard (sum of min / sum of max) of usage shares",
        "unrelated": "every mismatched pair (a_i, b_j), i != j, of the same group",
        "same_category": "the mismatched pairs whose two pairs share a category",
        "groups": out,
    }


def _coactivation_section(trace: RoutingTrace, moe: MoEConfig) -> dict[str, Any]:
    e = trace.num_experts
    k = moe.top_k if moe.router != "expert_choice" else math.ceil(moe.capacity_factor or 1)
    layers: dict[str, Any] = {}
    for i, lt in trace.layers.items():
        counts = coactivation(lt.experts, e)
        cond = conditional_coactivation(counts)
        n = max(1, lt.experts.shape[0])
        layers[str(i)] = {
            "counts": counts.tolist(),
            "conditional": cond.tolist(),
            "top_pairs": [
                {"experts": [a, b], "tokens": c, "share": c / n, "conditional": float(cond[a, b])}
                for a, b, c in top_pairs(counts, 10)
            ],
        }
    return {
        "conditional": "[i][j] = P(j chosen | i chosen)",
        "uniform_conditional": (k - 1) / (e - 1) if e > 1 else 0.0,
        "uniform_pair_share": k * (k - 1) / (e * (e - 1)) if e > 1 else 0.0,
        "layers": layers,
    }


# ----------------------------------------------------------------------------- plots


def _plotted_layers(layers: Sequence[str]) -> list[str]:
    if len(layers) <= MAX_PLOTTED_LAYERS:
        return list(layers)
    step = (len(layers) - 1) / (MAX_PLOTTED_LAYERS - 1)
    return [layers[round(i * step)] for i in range(MAX_PLOTTED_LAYERS)]


def _plot_all(result: dict[str, Any], out: Path) -> list[str]:
    """Write every plot into `out`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    from moekit.report import plots

    load = {int(i): v["share"] for i, v in result["load"]["layers"].items()}
    plots.expert_load(load, out / PLOTS["load"])
    spec = result["specialisation"]
    for kind in ("class", "domain"):
        section = spec[kind]
        _plot_distributions(
            {i: v["distribution"] for i, v in section["layers"].items()},
            section["labels"],
            f"Where each {kind} goes: share of its expert choices (rows sum to 1)",
            out / PLOTS["classes" if kind == "class" else "domains"],
        )
    _plot_specialisation(spec, out / PLOTS["specialisation"])
    _plot_consistency(result["consistency"], out / PLOTS["consistency"])
    _plot_coactivation(result["coactivation"], out / PLOTS["coactivation"])
    return list(PLOTS.values())


def _grid(n: int, width: float, height: float) -> tuple[Any, list[Any]]:
    import matplotlib.pyplot as plt

    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _plot_distributions(
    layers: dict[str, list[list[float]]], labels: list[str], title: str, path: Path
) -> None:
    import matplotlib.pyplot as plt

    shown = _plotted_layers(list(layers))
    num_experts = len(layers[shown[0]][0])
    fig, axes = _grid(len(shown), max(3.6, 0.32 * num_experts + 1.8), 0.32 * len(labels) + 1.4)
    for ax, layer in zip(axes, shown, strict=True):
        grid = layers[layer]
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=max(0.01, _max(grid)))
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _max(grid: list[list[float]]) -> float:
    return max((v for row in grid for v in row), default=0.0)


def _plot_specialisation(spec: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, kind in zip(axes, ("class", "domain"), strict=True):
        layers = spec[kind]["layers"]
        names = list(layers)
        x = list(range(len(names)))
        real = [layers[i]["nmi"] for i in names]
        base = [layers[i]["baseline_mean"] for i in names]
        spread = [layers[i]["baseline_std"] for i in names]
        ax.bar([v - 0.2 for v in x], real, 0.4, label="real labels", color="#3b6fb6")
        ax.bar([v + 0.2 for v in x], base, 0.4, yerr=spread, label="shuffled labels (chance)",
               color="#bbbbbb", capsize=3)  # fmt: skip
        ax.set_xticks(x, [f"layer {i}" for i in names], fontsize=8)
        ax.set_ylabel("I(E;C) / H(C)")
        ax.set_title(f"Specialisation by {kind}")
        ax.set_ylim(0, max(0.05, *real, *base) * 1.25)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_consistency(section: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    groups = section["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.8), squeeze=False)
    for ax, (group, g) in zip(axes[0], groups.items(), strict=True):
        names = list(g["layers"])
        x = list(range(len(names)))
        bars = (("paraphrase_weighted", "paraphrases", "#3b6fb6"),
                ("same_category_weighted", "unrelated, same category", "#8c8c8c"),
                ("unrelated_weighted", "unrelated", "#c8c8c8"),
                ("paraphrase_jaccard", "paraphrases (sets)", "#9ab8e0"),
                ("unrelated_jaccard", "unrelated (sets)", "#e6e6e6"))  # fmt: skip
        width = 0.16
        for n, (key, label, colour) in enumerate(bars):
            values = [g["layers"][i][key] or 0.0 for i in names]
            dx = (n - (len(bars) - 1) / 2) * width
            ax.bar([v + dx for v in x], values, width, label=label, color=colour)
        ax.set_xticks(x, [f"layer {i}" for i in names], fontsize=8)
        ax.set_ylim(0, 1.4)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("overlap of experts used")
        ax.set_title(f"Consistency ({group} pairs: {g['pairs']})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_coactivation(section: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    layers = section["layers"]
    shown = _plotted_layers(list(layers))
    num_experts = len(layers[shown[0]]["conditional"])
    size = max(3.2, 0.3 * num_experts + 1.5)
    fig, axes = _grid(len(shown), size + 0.6, size)
    for ax, layer in zip(axes, shown, strict=True):
        grid = layers[layer]["conditional"]
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.01, _max(grid)))
        ax.set_title(f"layer {layer}", fontsize=10)
        ticks = range(0, num_experts, max(1, num_experts // 16))
        ax.set_xticks(list(ticks), [str(t) for t in ticks], fontsize=7)
        ax.set_yticks(list(ticks), [str(t) for t in ticks], fontsize=7)
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("expert i", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    uniform = section["uniform_conditional"]
    fig.suptitle(f"P(j chosen | i chosen); uniform random routing gives {uniform:.3f}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em;
  color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.6em 0; }
td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
p.note, li { color: #444; } nav a { margin-right: 1em; }
code.tok { background: #f3f3f3; padding: 0 3px; border-radius: 3px; white-space: pre; }
.cols { display: flex; flex-wrap: wrap; gap: 0 2.5em; }
td:first-child { white-space: nowrap; } th { vertical-align: bottom; }
span.tc { display: inline-block; margin: 0 0.7em 2px 0; white-space: nowrap; color: #555; }
"""


def _img(out: Path, key: str, alt: str) -> str:
    path = out / PLOTS[key]
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _tok(text: str) -> str:
    return f'<code class="tok">{html.escape(display_token(text))}</code>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if c[:1].isdigit() or c[:1] == "-"
                         else f"<td>{c}</td>" for c in row) + "</tr>"
        for row in rows
    )  # fmt: skip
    return f"<table><tr>{th}</tr>{body}</table>"


def render_html(result: dict[str, Any], out: Path) -> str:
    """The self-contained report page for an `analyze` result whose plots are in `out`."""
    esc = html.escape
    model, data, load = result["model"], result["data"], result["load"]
    spec, cons, coact = result["specialisation"], result["consistency"], result["coactivation"]
    top = result["top_tokens"]
    e = model["num_experts"]

    load_rows = [
        [f"layer {i}", _f(v["imbalance"], 2), _f(v["cv"], 2),
         ", ".join(map(str, v["dead"])) or "none", ", ".join(map(str, v["nearly_dead"])) or "none",
         f"{v['entropy']:.3f} / {v['entropy_max']:.3f}",
         "n/a" if v["dropped"] is None
         else f"{v['dropped']:,} ({100 * v['dropped_fraction']:.1f}%)"]
        for i, v in load["layers"].items()
    ]  # fmt: skip
    spec_rows = []
    for i in spec["class"]["layers"]:
        row = [f"layer {i}"]
        for kind in ("class", "domain"):
            v = spec[kind]["layers"][i]
            row += [f"{v['nmi']:.4f}", f"{v['baseline_mean']:.4f} ± {v['baseline_std']:.4f}"]
        spec_rows.append(row)
    class_rows = [
        [esc(name), f"{n:,}"] for name, n in zip(spec["class"]["labels"], spec["class"]["tokens"],
                                                  strict=True)
    ]  # fmt: skip
    domain_rows = [[esc(name), f"{n:,}"] for name, n in data["tokens_per_domain"].items()]
    top_rows = [
        [f"{x['expert']}", f"{x['copies']:,}",
         " ".join(f"<span class='tc'>{_tok(t['token'])}&nbsp;×{t['count']:,}</span>"
                  for t in x["by_count"]),
         " ".join(f"<span class='tc'>{_tok(t['token'])}&nbsp;{100 * t['share']:.0f}%</span>"
                  for t in x["distinctive"])
         or "none seen often enough"]
        for x in top["experts"]
    ]  # fmt: skip
    cons_html = ""
    for group, g in cons["groups"].items():
        rows = [
            [f"layer {i}", _f(v["paraphrase_weighted"]), _f(v["unrelated_weighted"]),
             _f(v["same_category_weighted"]), _f(v["paraphrase_jaccard"]),
             _f(v["unrelated_jaccard"])]
            for i, v in g["layers"].items()
        ]  # fmt: skip
        cat_layers = list(g["layers"])
        cat_rows = [
            [esc(cat), str(c["pairs"])] + [_f(c["layers"][i]) for i in cat_layers]
            for cat, c in g["categories"].items()
        ]
        head = ["", "paraphrases (weighted)", "unrelated (weighted)",
                "unrelated, same category (weighted)", "paraphrases (sets)",
                "unrelated (sets)"]  # fmt: skip
        cons_html += (
            f"<h3>{esc(group)} pairs ({g['pairs']})</h3>"
            + _table(head, rows)
            + "<p class='note'>Weighted overlap of paraphrase pairs, by category:</p>"
            + _table(["category", "pairs", *(f"layer {i}" for i in cat_layers)], cat_rows)
        )
    coact_html = ""
    for i, v in coact["layers"].items():
        rows = [
            [f"{p['experts'][0]} + {p['experts'][1]}", f"{p['tokens']:,}",
             f"{100 * p['share']:.1f}%", _f(p["conditional"])]
            for p in v["top_pairs"][:5]
        ]  # fmt: skip
        coact_html += (
            f"<div><h3>layer {i}</h3>"
            + (
                _table(["pair i + j", "tokens", "share of tokens", "P(j | i)"], rows)
                if rows
                else "<p class='note'>one expert per token: no pairs</p>"
            )
            + "</div>"
        )
    sections = [("summary", "Summary"), ("load", "Load"), ("classes", "Token classes"),
                ("domains", "Domains"), ("top", "Top tokens"), ("consistency", "Consistency"),
                ("coactivation", "Co-activation"), ("method", "Method and limits")]  # fmt: skip
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in sections)
    spec_head = ["", "class NMI", "class chance", "domain NMI", "domain chance"]
    load_head = ["", "imbalance (max/mean)", "CV", "dead", "nearly dead",
                 "router entropy (nats) / max",
                 f"dropped at capacity factor {load['capacity_factor']:g}"]  # fmt: skip
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moekit routing analysis</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head><body>
<h1>Routing analysis: {esc(result["model_dir"])}</h1>
<nav>{nav}</nav>
<h2 id="summary">Summary</h2>
<table>
<tr><th>model</th><td>{model["num_layers"]} layers, MoE layers {
        esc(", ".join(map(str, model["moe_layers"])))
    }; {e} experts, {esc(model["router"])} router
({esc(model["score_func"])}), top-{model["top_k"]}</td></tr>
<tr><th>text</th><td>{esc(data["source"])}: {data["tokens"]:,} tokens in rows of
{data["seq_len"]}, {data["batch_size"]} rows per forward pass</td></tr>
</table>
{_table(["", "tokens"], domain_rows)}
<p class="note">Routing was recorded as inference routes (<code>causal_routing=True</code>):
no capacity limit, each token's experts depend on that token and its past only.</p>

<h2 id="load">Load</h2>
<p>How the copies (token × chosen expert) spread over each layer's experts. An even spread is
healthy; a bright column is a hot expert, a dark one a dead expert.</p>
{_img(out, "load", "share of routed copies per expert and layer")}
{_table(load_head, load_rows)}
<ul>
<li><b>imbalance</b>: the busiest expert's copies over the mean; 1 is perfectly even, {e} would
be one expert taking everything.</li>
<li><b>CV</b>: coefficient of variation of copies per expert (std / mean); 0 is even.</li>
<li><b>dead</b>: experts that received no copy; <b>nearly dead</b>: below
{load["nearly_dead_fraction"]:.0%} of the uniform share.</li>
<li><b>router entropy</b>: mean over tokens of the entropy of the router's probabilities over
all experts; the maximum ln {e} means the router cannot tell experts apart for a token, near 0
means it is certain (possibly collapsed).</li>
<li><b>dropped</b>: copies that moekit's capacity rule would drop with this capacity factor,
{esc(load["note"])} of the run ({data["batch_size"]} rows of {data["seq_len"]} tokens), and
their share of all copies. Inference routing itself drops nothing.</li>
</ul>

<h2 id="classes">Specialisation by token class</h2>
<p>Each token is put in a class from its text (rules in <a href="#method">Method</a>). The
score is the normalised mutual information between the expert a token is sent to and its
class, I(E;C)/H(C): the share of the uncertainty about a token's class that knowing one of its
experts removes. 1 means every expert serves a single class, 0 that all classes spread over
the experts alike. Chance is not 0 on a finite sample, so the same score with the labels
shuffled across tokens is shown next to it ({spec["shuffles"]} shuffles, mean ± std): only the
part above chance is specialisation.</p>
{_img(out, "specialisation", "normalised mutual information per layer against chance")}
{_table(spec_head, spec_rows)}
{_img(out, "classes", "expert distribution per token class")}
{_table(["class", "tokens"], class_rows)}

<h2 id="domains">Specialisation by domain</h2>
<p>The same score with the document's domain as the label (builtin corpus: prose, code,
arithmetic, records; your data: the domains it names). Each row below shows where a domain's
expert choices go.</p>
{_img(out, "domains", "expert distribution per domain")}

<h2 id="top">Top tokens of layer {top["layer"]}</h2>
<p><b>Most routed</b>: the tokens sent to each expert most often, with counts (frequent tokens
such as spaces lead for many experts). <b>Distinctive</b>: among tokens seen at least {
        top["min_occurrences"]
    } times,
those with the largest share of their occurrences sent to this expert.
Shown with ␣ for a space, ↵ for a newline, ⇥ for a tab.</p>
{
        _table(
            ["expert", "copies", "most routed (count)", "distinctive (share of occurrences)"],
            top_rows,
        )
    }

<h2 id="consistency">Consistency across paraphrases</h2>
<p>Pairs of prompts that mean the same are run one by one. For each prompt and layer, the set
of experts its tokens used and how often each. <b>sets</b>: the Jaccard overlap |A∩B|/|A∪B| of
the two prompts' expert sets (it saturates when prompts are long enough to touch every
expert). <b>weighted</b>: Σ min / Σ max of the two prompts' usage shares, 1 for the same mix of
experts. The same overlaps of unrelated pairs (every first prompt with every other pair's
second prompt) show what any two prompts share; paraphrases above that are routed alike for
their meaning. Unrelated pairs of the same category (two different code snippets, two different
sums) are the stricter reference: they share the topic and the kind of text but not the
meaning.</p>
{_img(out, "consistency", "expert overlap of paraphrases and of unrelated prompts")}
{cons_html}

<h2 id="coactivation">Co-activation</h2>
<p>Which experts are chosen together for the same token. The matrices show P(j chosen | i
chosen); uniform random routing of {model["top_k"]} experts per token would give
{coact["uniform_conditional"]:.3f} everywhere. The tables list the most frequent pairs with the
share of tokens that chose both (uniform: {100 * coact["uniform_pair_share"]:.1f}%).</p>
{_img(out, "coactivation", "conditional co-activation per layer")}
<div class="cols">{coact_html}</div>

<h2 id="method">Method and limits</h2>
<ul>
<li>Observations: each chosen expert of a token counts once (routing weights are ignored), so
a token routed to {model["top_k"]} experts gives {model["top_k"]} observations.</li>
<li>Token classes, from the token's text with surrounding whitespace stripped: whitespace (empty),
digits (only 0-9), punctuation (no letter, digit or _), code (in a code document and shaped
like a Python identifier or keyword), capitalised (letters, first upper-case), word (letters),
other. Special tokens get no class.</li>
<li>A router sees each token's embedding, so even an untrained model routes by token and
scores above the shuffled baseline: the baseline rules out chance, not the tokens themselves.
To see what training added, analyse the model before and after training alike.</li>
<li>The sample is one pass of {data["tokens"]:,} tokens; small samples give noisy scores,
which is what the shuffled baseline measures. Scores compare layers of one model better than
models with different expert counts.</li>
<li>Every number is in <code>analysis.json</code> next to this page.</li>
</ul>
</body></html>
"""
