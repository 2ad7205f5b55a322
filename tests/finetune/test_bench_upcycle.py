import json

from moekit.cli import main
from moekit.config import ModelConfig
from moekit.model_dir import load_weights

from ..conftest import TINY_RUN


def test_bench_upcycle_runs_the_four_trainings(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "upcycle", "--preset", "debug", "--out", str(out),
            "--dense-steps", "4", "--steps", "4", *TINY_RUN, "--quiet", "--json"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["runs"]) == {"dense", "upcycled", "scratch", "dense_continued"}
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
