"""`moekit analyze`: measure how a model routes real text.

`analyze` gathers the text, runs the model once over it (`moekit.analysis.routing`), measures
each section of an `Analysis` (`moekit.analysis.result`) and has `moekit.analysis.report`
write the plots, analysis.json and report.html. The metrics themselves are pure functions in
`moekit.analysis.routing` and `moekit.analysis.specialization`.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.analysis.paraphrases import ParaphrasePair, builtin_pairs, load_pairs
from moekit.analysis.report import report_files, write_report
from moekit.analysis.result import (
    Analysis,
    CategoryConsistency,
    CoactivationSection,
    ConsistencySection,
    DataSection,
    ExpertPair,
    ExpertTokens,
    GroupLoad,
    LabelSpecialisation,
    LayerCoactivation,
    LayerConsistency,
    LayerLoad,
    LayerSpecialisation,
    LoadSection,
    ModelSection,
    PairGroup,
    SpecialisationSection,
    TokenCount,
    TopTokensSection,
)
from moekit.analysis.routing import (
    NEARLY_DEAD_FRACTION,
    RoutingTrace,
    TokenSample,
    capacity_drops,
    check_vocabulary,
    coactivation,
    conditional_coactivation,
    consistency,
    copies_per_token,
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
    specialisation,
    top_tokens,
)
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
) -> Analysis:
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
    Returns the `Analysis`, whose `to_dict()` analysis.json holds. Raises ValueError for a
    model without MoE layers or a `layer` that is not an MoE layer, FileNotFoundError for a
    missing directory or file.
    """
    # 1. Config and arguments first: refuse a dense model before loading any weights.
    # 2. Text, tokens and labels; 3. one recorded pass; 4. metrics; 5. paraphrases;
    # 6. plots, JSON, HTML.
    from moekit.version import __version__

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    sizes = {"max_tokens": max_tokens, "batch_size": batch_size, "seq_len": seq_len,
             "shuffles": shuffles, "top_n": top_n}  # fmt: skip
    cfg, moe, chosen_layer = _check_arguments(model_dir, layer, sizes, capacity_factor)
    pairs = _pairs(paraphrases)
    docs, source = text_documents(model_dir, data, text_field, domain_field)
    run = _load(model_dir, cfg, docs, max_tokens, device)
    trace = trace_routing(
        run.model,
        run.sample.ids,
        seq_len=seq_len,
        batch_size=batch_size,
        progress=stderr_progress("moekit analyze") if progress else None,
    )
    gen = torch.Generator().manual_seed(seed)
    cf = capacity_factor or moe.capacity_factor or DEFAULT_CAPACITY_FACTOR
    result = Analysis(
        model_dir=str(model_dir),
        moekit_version=__version__,
        model=model_section(cfg, moe),
        data=DataSection(
            source=source,
            tokens=int(run.sample.ids.numel()),
            tokens_per_domain=run.sample.tokens_per_domain(),
            max_tokens=max_tokens,
            seq_len=trace.seq_len,
            batch_size=batch_size,
            seed=seed,
        ),
        load=load_section(trace, moe, cf),
        specialisation=specialisation_section(trace, run, shuffles, gen),
        top_tokens=top_tokens_section(trace, chosen_layer, run.sample, run.texts, top_n),
        consistency=consistency_section(run.model, run.tokenizer, pairs),
        coactivation=coactivation_section(trace, moe),
        files=report_files(),
    )
    write_report(result, out_dir)
    return result


# ----------------------------------------------------------------------------- inputs


def _check_arguments(
    model_dir: Path, layer: int | None, sizes: dict[str, int], capacity_factor: float | None
) -> tuple[ModelConfig, MoEConfig, int]:
    """The model's config, its MoE config and the layer for top tokens, once every argument
    is known to be valid."""
    cfg = ModelDir(model_dir).config()
    if cfg.moe is None or not cfg.moe_layers:
        raise ValueError(
            f"{str(model_dir)!r} holds a dense model (no MoE layers): there is no routing to "
            "analyse; `moekit info` describes dense models"
        )
    layers = cfg.moe_layers
    chosen = layers[len(layers) // 2] if layer is None else layer
    if chosen not in layers:
        raise ValueError(
            f"layer={layer} is not an MoE layer of this model; MoE layers: "
            f"{', '.join(map(str, layers))}"
        )
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} is invalid: must be > 0")
    return cfg, cfg.moe, chosen


def _pairs(paraphrases: str | Path | None) -> dict[str, list[ParaphrasePair]]:
    groups = {"builtin": builtin_pairs()}
    if paraphrases is not None:
        groups["user"] = load_pairs(paraphrases)
    return groups


def text_documents(
    model_dir: Path, data: str | None, text_field: str, domain_field: str | None
) -> tuple[list[Document], str]:
    """The documents to analyse and a sentence saying what they are: `data` read as
    `DataConfig.source` reads it, or (None) the validation split of the builtin corpus, cut
    as the run in `model_dir` cut it when its run.json says so."""
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


@dataclass
class _Run:
    """The model and the text it runs on: the token sample, each token's class and domain
    label (-1 for special tokens), and the text of each token id seen."""

    model: Transformer
    tokenizer: Tokenizer
    sample: TokenSample
    classes: Tensor
    domains: Tensor
    texts: dict[int, str]


def _load(
    model_dir: Path, cfg: ModelConfig, docs: list[Document], max_tokens: int, device: str | None
) -> _Run:
    """Load the tokenizer and the model, sample the documents and label every token."""
    from moekit.data.tokenizer import Tokenizer
    from moekit.model_dir import load_model

    tokenizer = Tokenizer.load(model_dir)
    check_vocabulary(tokenizer, cfg.vocab_size, model_dir)
    model = load_model(model_dir, device=str(resolve_device(device)))
    sample = sample_tokens(docs, tokenizer, max_tokens)
    seen = sample.ids.unique().tolist()
    texts = {i: tokenizer.decode([i]) for i in seen}
    size = max(seen) + 1
    specials = [tokenizer.pad_id]
    specials += [i for i in (tokenizer.eos_id, tokenizer.bos_id) if i is not None]
    table = class_table([texts.get(i, "") for i in range(size)], specials)
    is_code = torch.tensor([name == CODE_DOMAIN for name in sample.domain_names], dtype=torch.long)
    classes = table[is_code[sample.domains], sample.ids]
    special = torch.isin(sample.ids, torch.tensor(specials))
    domains = sample.domains.masked_fill(special, -1)
    return _Run(model, tokenizer, sample, classes, domains, texts)


# ----------------------------------------------------------------------------- sections


def model_section(cfg: ModelConfig, moe: MoEConfig) -> ModelSection:
    """The analysed model's layers and routing."""
    return ModelSection(
        num_layers=cfg.num_layers,
        moe_layers=cfg.moe_layers,
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        router=moe.router,
        score_func=moe.score_func,
    )


def load_section(trace: RoutingTrace, moe: MoEConfig, capacity_factor: float) -> LoadSection:
    """Load, entropy and capacity drops of every MoE layer of `trace`."""
    expert_choice = moe.router == "expert_choice"
    e = trace.num_experts
    layers: dict[int, LayerLoad] = {}
    for i in trace.layers:
        stats = trace.load(i, NEARLY_DEAD_FRACTION)
        entropy = trace.mean_entropy(i)
        dropped = None if expert_choice else capacity_drops(trace, i, moe, capacity_factor)
        copies = sum(stats.tokens_per_expert)
        layers[i] = LayerLoad(
            tokens_per_expert=stats.tokens_per_expert,
            share=stats.share,
            imbalance=stats.imbalance,
            cv=stats.cv,
            dead=stats.dead,
            nearly_dead=stats.nearly_dead,
            entropy=entropy,
            entropy_max=math.log(e),
            entropy_normalized=entropy / math.log(e) if e > 1 else 0.0,
            dropped=dropped,
            dropped_fraction=None if dropped is None else dropped / max(1, copies),
            groups=group_load(stats.tokens_per_expert, moe),
        )
    group = "row" if moe.capacity_priority == "position" else "batch"
    return LoadSection(
        capacity_factor=capacity_factor,
        capacity_priority=moe.capacity_priority,
        nearly_dead_fraction=NEARLY_DEAD_FRACTION,
        note="expert choice fills each expert to capacity: nothing is dropped"
        if expert_choice
        else f"copies over capacity per {group}",
        layers=layers,
    )


def group_load(tokens_per_expert: list[int], moe: MoEConfig) -> GroupLoad | None:
    """The load per expert group of a hierarchical router (None for the other routers)."""
    if moe.router != "hierarchical":
        return None
    per_group = moe.num_experts // moe.router_groups
    copies = [sum(tokens_per_expert[g * per_group : (g + 1) * per_group])
              for g in range(moe.router_groups)]  # fmt: skip
    stats = load_stats(copies)
    return GroupLoad(
        copies_per_group=copies,
        share=stats.share,
        imbalance=stats.imbalance,
        cv=stats.cv,
        dead=stats.dead,
    )


def specialisation_section(
    trace: RoutingTrace, run: _Run, shuffles: int, gen: torch.Generator
) -> SpecialisationSection:
    """Specialisation by token class and by domain, each against its shuffled baseline."""
    return SpecialisationSection(
        score="I(E;C) / H(C)",
        observations="each chosen expert of a token is one observation",
        shuffles=shuffles,
        by_class=label_specialisation(trace, run.classes, list(TOKEN_CLASSES), shuffles, gen),
        by_domain=label_specialisation(trace, run.domains, run.sample.domain_names, shuffles, gen),
    )


def label_specialisation(
    trace: RoutingTrace, labels: Tensor, names: list[str], shuffles: int, gen: torch.Generator
) -> LabelSpecialisation:
    """Specialisation of every MoE layer by per-token `labels` (indices into `names`)."""
    counts = torch.bincount(labels[labels >= 0], minlength=len(names)).tolist()
    layers: dict[int, LayerSpecialisation] = {}
    for i, lt in trace.layers.items():
        s = specialisation(
            lt.experts, labels, len(names), trace.num_experts, shuffles=shuffles, generator=gen
        )
        layers[i] = LayerSpecialisation(
            nmi=s.nmi,
            mi_bits=s.mi_bits,
            baseline_mean=s.baseline_mean,
            baseline_std=s.baseline_std,
            excess=s.excess,
            distribution=s.distribution.tolist(),
        )
    return LabelSpecialisation(labels=names, tokens=counts, layers=layers)


def top_tokens_section(
    trace: RoutingTrace, layer: int, sample: TokenSample, texts: dict[int, str], n: int
) -> TopTokensSection:
    """The `n` most routed and most distinctive tokens of each expert of `layer`."""
    lt = trace.layers[layer]
    by_count, distinctive = top_tokens(
        lt.experts, sample.ids, trace.num_experts, n=n, min_occurrences=TOP_MIN_OCCURRENCES
    )
    copies = trace.counts(layer).tolist()

    def rows(tokens: list[TopToken]) -> list[TokenCount]:
        return [
            TokenCount(token=texts.get(t.token_id, ""), id=t.token_id, count=t.count,
                       occurrences=t.occurrences, share=t.share)
            for t in tokens
        ]  # fmt: skip

    experts = [
        ExpertTokens(expert=e, copies=copies[e], by_count=rows(by_count[e]),
                     distinctive=rows(distinctive[e]))
        for e in range(trace.num_experts)
    ]  # fmt: skip
    return TopTokensSection(layer=layer, min_occurrences=TOP_MIN_OCCURRENCES, experts=experts)


def consistency_section(
    model: Transformer, tokenizer: Tokenizer, groups: dict[str, list[ParaphrasePair]]
) -> ConsistencySection:
    """Expert overlap of each group's paraphrase pairs against unrelated pairs, per layer."""
    out: dict[str, PairGroup] = {}
    for group, pairs in groups.items():
        pad = tokenizer.pad_id
        usage_a = prompt_usage(model, [tokenizer.encode(p.a) for p in pairs], pad_id=pad)
        usage_b = prompt_usage(model, [tokenizer.encode(p.b) for p in pairs], pad_id=pad)
        layers: dict[int, LayerConsistency] = {}
        categories: dict[str, CategoryConsistency] = {}
        for i in usage_a:
            c = consistency(usage_a[i], usage_b[i], [p.category for p in pairs])
            layers[i] = LayerConsistency(
                paraphrase_jaccard=c.paraphrase_jaccard,
                unrelated_jaccard=c.unrelated_jaccard,
                paraphrase_weighted=c.paraphrase_weighted,
                unrelated_weighted=c.unrelated_weighted,
                same_category_weighted=c.same_category_weighted,
            )
            for cat in dict.fromkeys(p.category for p in pairs):
                idx = [k for k, p in enumerate(pairs) if p.category == cat]
                entry = categories.setdefault(cat, CategoryConsistency(len(idx), {}))
                entry.layers[i] = sum(c.per_pair[k] for k in idx) / len(idx)
        out[group] = PairGroup(pairs=len(pairs), layers=layers, categories=categories)
    return ConsistencySection(
        set_measure="Jaccard of the sets of experts each prompt used (all its tokens)",
        weighted_measure="weighted Jaccard (sum of min / sum of max) of usage shares",
        unrelated="every mismatched pair (a_i, b_j), i != j, of the same group",
        same_category="the mismatched pairs whose two pairs share a category",
        groups=out,
    )


def coactivation_section(trace: RoutingTrace, moe: MoEConfig) -> CoactivationSection:
    """Which experts are chosen together, per layer, against uniform random routing."""
    e = trace.num_experts
    k = copies_per_token(moe)
    layers: dict[int, LayerCoactivation] = {}
    for i, lt in trace.layers.items():
        counts = coactivation(lt.experts, e)
        cond = conditional_coactivation(counts)
        n = max(1, lt.experts.shape[0])
        layers[i] = LayerCoactivation(
            counts=counts.tolist(),
            conditional=cond.tolist(),
            top_pairs=[
                ExpertPair(experts=[a, b], tokens=c, share=c / n, conditional=float(cond[a, b]))
                for a, b, c in top_pairs(counts, 10)
            ],
        )
    return CoactivationSection(
        conditional="[i][j] = P(j chosen | i chosen)",
        uniform_conditional=(k - 1) / (e - 1) if e > 1 else 0.0,
        uniform_pair_share=k * (k - 1) / (e * (e - 1)) if e > 1 else 0.0,
        layers=layers,
    )
