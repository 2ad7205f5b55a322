import json

from moekit.bench.upcycle import CurvePoint, UpcycleBench, UpcycleRun
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.model_dir import load_weights

from ..conftest import TINY_RUN

# The keys of `moekit bench upcycle --json` (and upcycle.json), in order; the dense model
# trained for the same extra steps adds its loss at the end.
KEYS = [
    "dense_steps",
    "steps",
    "num_experts",
    "top_k",
    "granularity",
    "noise",
    "upcycled_val_loss",
    "scratch_val_loss",
    "upcycled_minus_scratch",
    "runs",
]
RUN_KEYS = ["total_params", "active_params", "steps", "tokens", "train_seconds", "val_loss",
            "curve"]  # fmt: skip
CURVE_KEYS = ["step", "tokens", "seconds", "val_loss"]


def test_bench_upcycle_runs_the_four_trainings(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "upcycle", "--preset", "debug", "--out", str(out),
            "--dense-steps", "4", "--steps", "4", *TINY_RUN, "--quiet", "--json"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["runs"]) == {"dense", "upcycled", "scratch", "dense_continued"}
    assert list(summary) == [*KEYS, "dense_continued_val_loss"]
    assert summary == json.loads((out / "upcycle.json").read_text())
    assert (out / "upcycle.png").stat().st_size > 0
    runs = summary["runs"]
    assert (
        runs["dense"]["steps"] == 4 and runs["upcycled"]["steps"] == runs["scratch"]["steps"] == 4
    )
    assert (
        summary["upcycled_minus_scratch"]
        == runs["upcycled"]["val_loss"] - runs["scratch"]["val_loss"]
    )
    # The scratch and upcycled runs train the same MoE; the upcycled one started from the
    # dense model's weights (its attention is the dense model's, moved by 4 more steps).
    assert ModelConfig.load(out / "upcycled") == ModelConfig.load(out / "scratch")
    assert runs["upcycled"]["total_params"] > runs["dense"]["total_params"]
    assert runs["upcycled"]["active_params"] > runs["dense"]["active_params"]  # top-2 of copies
    init, dense = load_weights(out / "upcycled_init"), load_weights(out / "dense")
    assert all((init[k] == dense[k]).all() for k in dense if ".ffn." not in k)
    # Running it again continues (here: finds every run finished) and gives the same figures.
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["runs"]["scratch"] == runs["scratch"]


def _run(val_loss: float, steps: int = 4) -> UpcycleRun:
    curve = [CurvePoint(step=s, tokens=64 * s, seconds=0.5 * s, val_loss=val_loss + 4 - s)
             for s in range(1, steps + 1)]  # fmt: skip
    return UpcycleRun(total_params=100, active_params=50, steps=steps, tokens=64 * steps,
                      train_seconds=0.5 * steps, val_loss=val_loss, curve=curve)  # fmt: skip


def test_to_dict_has_the_json_keys():
    runs = {"dense": _run(3.0), "upcycled": _run(2.5), "scratch": _run(2.75)}
    bench = UpcycleBench(dense_steps=4, steps=4, num_experts=4, top_k=2, granularity=1,
                         noise=0.0, runs=runs)  # fmt: skip
    data = bench.to_dict()
    assert list(data) == KEYS
    assert list(data["runs"]) == ["dense", "upcycled", "scratch"]
    assert list(data["runs"]["upcycled"]) == RUN_KEYS
    assert list(data["runs"]["upcycled"]["curve"][0]) == CURVE_KEYS
    assert data["runs"]["upcycled"]["curve"][-1]["val_loss"] == 2.5
    assert data["upcycled_minus_scratch"] == -0.25
    assert bench.dense_continued_val_loss is None
    continued = UpcycleBench(**{**vars(bench), "runs": {**runs, "dense_continued": _run(2.9)}})
    data = continued.to_dict()
    assert list(data) == [*KEYS, "dense_continued_val_loss"]
    assert data["dense_continued_val_loss"] == 2.9
