import json

import pytest

from moekit.bench.layer import LayerBench, LayerRow, bench_layer
from moekit.cli import main

# The keys of each row of `moekit bench layer --json`, in order.
KEYS = [
    "shape",
    "phase",
    "pass",
    "tokens",
    "dim",
    "num_experts",
    "top_k",
    "expert_hidden",
    "ours_s",
    "dense_s",
    "hf_best_s",
    "hf_impl",
    "hf_s",
    "dense_over_ours",
    "hf_over_ours",
    "max_abs_diff_hf",
]


def test_bench_layer_json_rows(capsys):
    assert main(["bench", "layer", "--json", "--dim", "64", "--prefill-tokens", "64",
                 "--repeats", "1"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8
    assert {(r["shape"], r["phase"], r["pass"]) for r in rows} == {
        (s, ph, pa) for s in ("coarse", "fine") for ph in ("prefill", "decode")
        for pa in ("fwd", "fwd_bwd")
    }  # fmt: skip
    for r in rows:
        assert list(r) == KEYS
        assert r["ours_s"] > 0 and r["dense_s"] > 0
        assert r["hf_best_s"] is None or r["hf_best_s"] > 0
        # Same weights, same routing: our output equals transformers' Mixtral block.
        if r["max_abs_diff_hf"] is not None:
            assert r["max_abs_diff_hf"] < 1e-5


def test_bench_layer_times_only_what_was_asked():
    result = bench_layer(dim=32, repeats=1, shapes=("coarse",), phases=("decode",))
    assert (result.dim, result.repeats) == (32, 1)
    assert [(r.shape, r.phase, r.pass_, r.tokens) for r in result.rows] == [
        ("coarse", "decode", "fwd", 1),
        ("coarse", "decode", "fwd_bwd", 1),
    ]
    assert result.to_rows() == [r.to_dict() for r in result.rows]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"shapes": ("huge",)}, "unknown shape"), ({"phases": ("train",)}, "unknown phase"),
     ({"dim": 30}, "divisible by 4"), ({"repeats": 0}, "repeats > 0")],
)  # fmt: skip
def test_bench_layer_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench_layer(**kwargs)


def _row(pass_: str, hf_s: dict[str, float]) -> LayerRow:
    return LayerRow(shape="fine", phase="decode", pass_=pass_, tokens=1, dim=64, num_experts=64,
                    top_k=8, expert_hidden=16, ours_s=0.002, dense_s=0.001, hf_s=hf_s,
                    max_abs_diff_hf=None if not hf_s else 1e-7)  # fmt: skip


def test_to_dict_has_the_json_keys_with_and_without_transformers():
    with_hf = _row("fwd", {"eager": 0.008, "grouped_mm": 0.004})
    data = with_hf.to_dict()
    assert list(data) == KEYS
    assert data["pass"] == "fwd" and data["hf_impl"] == "grouped_mm"
    assert data["hf_best_s"] == 0.004 and data["hf_over_ours"] == 2.0
    assert data["dense_over_ours"] == 0.5
    alone = _row("fwd_bwd", {}).to_dict()
    assert list(alone) == KEYS
    assert alone["hf_impl"] is None and alone["hf_best_s"] is None
    assert alone["hf_over_ours"] is None and alone["hf_s"] == {}
    bench = LayerBench(dim=64, repeats=1, prefill_tokens=64, rows=[with_hf, _row("fwd", {})])
    assert bench.to_rows() == [data, _row("fwd", {}).to_dict()]
    assert bench.hf_impls == ["eager", "grouped_mm"]
