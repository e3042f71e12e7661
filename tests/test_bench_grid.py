"""The benchmark grid's runs are valid `jumplora run` commands: a renamed option must fail here, in
seconds, rather than hours into a grid."""

import json
import sys
from pathlib import Path

import pytest
import typer
from results_v2 import nested_config, run_results
from typer.testing import CliRunner

from jumplora import cli
from jumplora.cli import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import grid


@pytest.mark.parametrize("phase", list(grid.PHASES))
def test_every_grid_run_parses_into_the_config_it_names(phase, monkeypatch, tmp_path):
    seen = []

    def capture(config, **kwargs):
        seen.append(config)
        raise typer.Exit(0)

    monkeypatch.setattr(cli, "execute", capture)
    make_runs, _ = grid.PHASES[phase]
    runs = make_runs()
    assert runs, f"phase {phase} has no runs"
    for name, opts in runs.items():
        args = ["run", "--out", str(tmp_path / name), "--quiet", *grid.to_args(opts)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{phase}/{name}: {result.output}"
        config = seen[-1]
        assert config.seed == opts.get("seed", 0), name
        assert config.adapter.sparse is bool(opts.get("jumplora")), name
        assert config.stream.order == opts.get("order", 1) and config.model.name == opts.get("model"), name
        assert config.runner == opts.get("runner", "continual"), name
        for arg, value in opts.get("strategy_args", {}).items():
            assert config.strategy.args[arg] == value, name


def test_long_order_runs_are_the_study_at_order_4():
    long = grid.smollm2_long_runs()
    assert list(long)[:2] == ["o4-inclora-s0", "o4-inclora-jl-s0"]
    assert {opts["order"] for opts in long.values()} == {4}
    study = grid.smollm2_runs()
    for name, opts in long.items():
        twin = study[name.replace("o4-", "o1-")]
        assert {k: v for k, v in opts.items() if k != "order"} == {k: v for k, v in twin.items() if k != "order"}


def test_mechanism_runs_parse_and_match_the_l0_density(monkeypatch, tmp_path):
    import mechanism

    seen = []

    def capture(config, **kwargs):
        seen.append(config)
        raise typer.Exit(0)

    monkeypatch.setattr(cli, "execute", capture)
    names = mechanism.names()
    assert names[:3] == ["dense-s0", "dual-s0", "l0-s0"] and len(names) == len(set(names)) == 8 * 3 + 6 * 3
    assert mechanism.options("random-s0", tmp_path) is None  # waits for l0-s0
    for seed in mechanism.SEEDS:
        (tmp_path / f"l0-s{seed}").mkdir()
        per_task = [{"density": d} for d in (0.011, 0.007, 0.007, 0.0071)]
        (tmp_path / f"l0-s{seed}" / "results.json").write_text(json.dumps({"complete": True, "per_task": per_task}))
    for name in names:
        opts = mechanism.options(name, tmp_path)
        result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "x" / name), "--quiet", *grid.to_args(opts)])
        assert result.exit_code == 0, f"{name}: {result.output}"
        config = seen[-1]
        assert config.mixed_precision == "no" and config.save_predictions and config.stream.eval_split == "dev"
        setting = name.rpartition("-s")[0]
        if setting in mechanism.MATCHED:
            assert config.adapter.target_density == pytest.approx(0.008025, rel=1e-3), name
    config = seen[names.index("posthoc-s1")]
    assert config.adapter.merge_mask == "posthoc-topk" and not config.adapter.sparse and config.seed == 1
    assert seen[names.index("thetapath-s0")].adapter.target_path == "falling"
    assert seen[names.index("normmatch-s2")].adapter.norm_match
    assert seen[-1].adapter.target_density == 0.25


def test_mechanism_doc_from_finished_runs(monkeypatch, tmp_path):
    import mechanism

    monkeypatch.setattr(mechanism, "DOC", tmp_path / "docs" / "MECHANISM.md")
    monkeypatch.setattr(mechanism, "FIGURE", tmp_path / "docs" / "results" / "frontier.png")
    monkeypatch.setattr(mechanism, "NORM_RUNS", tmp_path / "norm-reruns")
    for name, final in (("dense-s0", [0.4, 0.8]), ("dual-s0", [0.6, 0.8])):  # dual: +10 OP, +20 BWT
        results = run_results(
            nested_config(seed=0, max_eval=10), tasks=["a", "b"], zero_shot=[0.5, 0.5],
            accuracy_matrix=[[0.9, 0.5], final], nll_zero_shot=[1.0, 1.0], nll_matrix=[[0.2, 1.0], [0.7, 0.3]],
            per_task=[{"density": 0.04}, {"density": 0.05}], wall_time_s=10.0,
        )  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    mechanism.DOC.parent.mkdir()
    mechanism.DOC.write_text("old\n\n## Notes\n\nkept by hand\n")
    mechanism.write_doc(tmp_path)
    doc = mechanism.DOC.read_text()
    assert "2 of 42 runs complete" in doc and "| OP (points) | +10.00 | +10.00 |" in doc
    assert "| BWT (points) | +20.00 |" in doc and "### l0 − dense" in doc and "Not run yet." in doc
    assert doc.endswith("## Notes\n\nkept by hand\n") and mechanism.FIGURE.exists()
    assert "(no re-runs yet)" in doc


def test_mechanism_norm_reruns_are_checked_against_the_grid(monkeypatch, tmp_path):
    """A re-run that records ‖U‖ and kept entries gives the per-unit interference, and says whether it
    reproduced the grid's run of its name."""
    import mechanism

    monkeypatch.setattr(mechanism, "NORM_RUNS", tmp_path)
    grid_run = run_results(
        nested_config(seed=0), tasks=["a", "b"], zero_shot=[0.5, 0.5], accuracy_matrix=[[0.9, 0.5], [0.6, 0.8]],
        nll_zero_shot=[1.0, 1.0], nll_matrix=[[0.2, 1.0], [0.7, 0.3]], per_task=[{"density": 1.0}] * 2,
    )  # fmt: skip
    rerun = {**grid_run, "per_task": [{"density": 1.0, "update_norm": 2.0, "kept_entries": 10**6},
                                      {"density": 1.0, "update_norm": 4.0, "kept_entries": 2 * 10**6}]}  # fmt: skip
    (tmp_path / "dense-s0").mkdir()
    (tmp_path / "dense-s0" / "results.json").write_text(json.dumps(rerun))
    # ΔL after task 1 on task 0: 0.7 - 0.2 = 0.5 nats; per unit of ‖U_1‖ = 4: 0.125; per 10⁶ of 2·10⁶: 0.25
    assert mechanism.norm_rerun_lines({"dense-s0": grid_run})[2] == \
        "| dense-s0 | yes | +0.5000 | +0.1250 | +0.250 | 3.000 | 1,500,000 |"  # fmt: skip
    changed = {**grid_run, "accuracy_matrix": [[0.9, 0.5], [0.7, 0.8]]}
    assert "| dense-s0 | NO |" in mechanism.norm_rerun_lines({"dense-s0": changed})[2]
