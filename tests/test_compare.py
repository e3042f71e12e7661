"""`jumplora report A B --compare` on small synthetic run directories whose answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from results_v2 import nested_config, run_results
from typer.testing import CliRunner

from jumplora.cli import app
from jumplora.metrics.compare import PairingError, compare, measures_from_matrices, within_noise
from jumplora.metrics.report import load_results
from jumplora.run.directory import predictions_file

TASKS = ("first", "second")
ITEMS = 50


def base_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """correct[e, j, item] and nll[e, j, item] for evaluations e = zero-shot, after first, after second."""
    rng = np.random.default_rng(seed)
    correct = rng.random((3, 2, ITEMS)) < 0.5
    correct[2, 0, :20] = False  # room for B to get 10 more right after the second task
    return correct, rng.random((3, 2, ITEMS)) + 0.5


def write_run(out: Path, seed: int, correct: np.ndarray, nll: np.ndarray, max_eval: int = ITEMS) -> Path:
    """A complete run directory: results.json whose matrices are the item means, and its predictions/."""
    R, L = correct.mean(-1), nll.mean(-1)
    config = nested_config(seed=seed, tasks=list(TASKS), max_eval=max_eval, eval_split="dev", jumplora=False)
    results = run_results(
        config, label="inclora", stream="toy", tasks=list(TASKS), accuracy_matrix=R[1:].tolist(),
        zero_shot=R[0].tolist(), nll_matrix=L[1:].tolist(), nll_zero_shot=L[0].tolist(), per_task=[],
    )  # fmt: skip
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(results))
    for e, after in enumerate(["zero-shot", *(f"after {t}" for t in TASKS)]):
        path = predictions_file(out, e, after)
        path.parent.mkdir(exist_ok=True)
        lines = [
            json.dumps({"after": after, "task": task, "index": i, "answer": f"{task}-{i}",
                        "correct": bool(correct[e, j, i]), "gold_nll": float(nll[e, j, i])})
            for j, task in enumerate(TASKS) for i in range(ITEMS)
        ]  # fmt: skip
        path.write_text("\n".join(lines) + "\n")
    return out


def make_pair(root: Path, seed: int) -> None:
    """B = A plus 10 more right answers on the first task after the second, and +0.5 nats on the second task."""
    correct, nll = base_scores(seed)
    write_run(root / f"a-s{seed}", seed, correct, nll)
    better, worse = correct.copy(), nll.copy()
    better[2, 0, :10] = True
    worse[2, 1] += 0.5
    write_run(root / f"b-s{seed}", seed, better, worse)


def test_measures_from_matrices_match_the_cl_definitions():
    R = np.array([[0.2, 0.1], [0.9, 0.3], [0.6, 0.8]])  # zero-shot, after first, after second
    L = np.array([[2.0, 3.0], [0.5, 2.5], [1.5, 0.4]])
    m = measures_from_matrices(R, L)
    assert m["op"] == pytest.approx(0.7) and m["bwt"] == pytest.approx(-0.3) and m["fwt"] == pytest.approx(0.2)
    assert m["nll_final"] == pytest.approx(0.95) and m["nll_bwt"] == pytest.approx(1.0)
    assert m["nll_forgetting"] == pytest.approx(1.0)


def test_known_paired_differences_and_intervals(tmp_path):
    for seed in (0, 1, 2):
        make_pair(tmp_path, seed)
    a = [load_results(tmp_path / f"a-s{s}") for s in (0, 1, 2)]
    b = [load_results(tmp_path / f"b-s{s}") for s in (2, 0, 1)]  # any order: paired by seed
    result = compare(a, b, draws=1000)
    rows = {row["measure"]: row for row in result["measures"]}
    assert result["seeds"] == [0, 1, 2]
    # 10 of 50 items right on one of two tasks: OP +10 points, BWT +20, FWT 0, in every pair
    assert rows["op"]["per_pair"] == pytest.approx([10.0] * 3) and rows["op"]["mean"] == pytest.approx(10.0)
    assert rows["bwt"]["mean"] == pytest.approx(20.0) and rows["fwt"]["mean"] == pytest.approx(0.0)
    assert rows["op"]["ci_seeds"] == pytest.approx([10.0, 10.0])  # no spread between pairs
    low, high = rows["op"]["ci_items"]  # binomial: 10 ± 1.96·√(0.2·0.8/150)/2·100 ≈ 10 ± 3.2
    assert 5.0 < low < 10.0 < high < 15.0
    assert rows["op"]["ci_both"][0] > 0 and within_noise(rows["op"]) is False
    assert rows["fwt"]["ci_both"] == pytest.approx([0.0, 0.0])
    # +0.5 nats on the last task: L final +0.25, L BWT 0 (the last task has no BWT), every draw alike
    assert rows["nll_final"]["ci_both"] == pytest.approx([0.25, 0.25])
    assert rows["nll_bwt"]["mean"] == pytest.approx(0.0, abs=1e-12)


def test_no_difference_is_within_noise(tmp_path):
    correct, nll = base_scores(0)
    noisy = correct.copy()  # B answers 5 items better and 5 worse than A: the same accuracy, other items
    final = noisy[2, 1]
    final[np.flatnonzero(final)[:5]] = False
    final[np.flatnonzero(~correct[2, 1])[:5]] = True
    write_run(tmp_path / "a", 0, correct, nll)
    write_run(tmp_path / "b", 0, noisy, nll)
    result = compare([load_results(tmp_path / "a")], [load_results(tmp_path / "b")], draws=1000)
    op = next(row for row in result["measures"] if row["measure"] == "op")
    assert op["ci_seeds"] is None and op["ci_items"] is not None  # one pair: items only
    assert op["mean"] == pytest.approx(0.0) and within_noise(op) is True


def test_pairs_must_share_seeds_and_data(tmp_path):
    correct, nll = base_scores(0)
    a = [load_results(write_run(tmp_path / "a", 0, correct, nll))]
    with pytest.raises(PairingError, match="seeds differ"):
        compare(a, [load_results(write_run(tmp_path / "b1", 1, correct, nll))])
    with pytest.raises(PairingError, match=r"different data.*max_eval"):
        compare(a, [load_results(write_run(tmp_path / "b2", 0, correct, nll, max_eval=40))])


def test_cli_compare_globs_and_one_error_line(tmp_path):
    for seed in (0, 1):
        make_pair(tmp_path, seed)
    runner = CliRunner()
    globs = [str(tmp_path / "a-s*"), str(tmp_path / "b-s*")]
    ok = runner.invoke(app, ["report", "--compare", "--format", "markdown", *globs])
    assert ok.exit_code == 0, ok.output
    assert "| OP (points) | +10.00 | +10.00, +10.00 |" in ok.output and "seeds 0, 1" in ok.output
    bad = runner.invoke(app, ["report", "--compare", str(tmp_path / "a-s0"), str(tmp_path / "b-s1")])
    assert bad.exit_code == 2
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "seeds differ" in lines[0]
    nll = runner.invoke(app, ["report", "--matrix", "--nll", "--format", "markdown", str(tmp_path / "a-s0")])
    assert nll.exit_code == 0 and "Gold-answer NLL" in nll.output
    first = load_results(tmp_path / "a-s0")["nll_matrix"][0][0]
    assert f"| after first | {first:.3f} |" in nll.output


def test_run_plots_carry_the_nll_heatmap(tmp_path):
    from jumplora.metrics.plots import write_run_plots

    correct, nll = base_scores(0)
    run = write_run(tmp_path / "run", 0, correct, nll)
    written = write_run_plots(run, load_results(run))
    assert "plots/nll_heatmap.png" in written and (run / "plots" / "nll_heatmap.png").stat().st_size > 0
