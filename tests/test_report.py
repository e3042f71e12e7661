"""`jumplora report`: table/markdown/LaTeX/CSV/JSON formats, --matrix, stream labels, --plot."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from results_v2 import nested_config, run_results
from typer.testing import CliRunner

from jumplora.cli import app
from jumplora.metrics.report import SUMMARY_KEYS, aggregate, latex_escape, load_runs, stream_label

runner = CliRunner()
TASKS = ["dbpedia", "amazon"]


def _run(root: Path, name: str, *, strategy: str, seed: int, op: float, forgetting: float, **config) -> Path:
    run = root / name
    run.mkdir(parents=True)
    runner_name = strategy if strategy in ("multitask", "independent") else "continual"
    options = {"jumplora": False, "order": 1, "tasks": None, "seed": seed, **config}
    results = run_results(
        nested_config(runner=runner_name, strategy=strategy, **options),
        tasks=TASKS,
        accuracy_matrix=[[0.8, 0.1], [0.7, 0.9]],
        zero_shot=[0.25, 0.5],
        metrics={"op": op, "bwt": -0.1, "fwt": 0.05, "forgetting": forgetting, "learning_accuracy": 0.8},
        per_task=[{"task": t, "density": None} for t in TASKS],
        overlap_matrix=[[1.0, 0.5], [0.5, 1.0]],
        wall_time_s=10.0 + seed,
    )
    (run / "results.json").write_text(json.dumps(results))
    (run / "train_log.jsonl").write_text(json.dumps({"global_step": 1, "task_index": 0, "loss": 1.0}) + "\n")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        _run(tmp_path, "a0", strategy="in_c&lora", seed=0, op=0.60, forgetting=0.30),
        _run(tmp_path, "a1", strategy="in_c&lora", seed=1, op=0.70, forgetting=0.10),
        _run(tmp_path, "b0", strategy="seqlora", seed=0, op=0.50, forgetting=0.05),
        _run(tmp_path, "m0", strategy="multitask", seed=0, op=0.90, forgetting=0.0),
    ]


def _report(*args: str) -> str:
    result = runner.invoke(app, ["report", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_latex_booktabs_bold_best_and_escaped(runs: list[Path]) -> None:
    tex = _report(*map(str, runs), "--format", "latex")
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "OP (\\%)" in tex
    row_a = next(line for line in tex.splitlines() if line.startswith("in\\_c\\&lora"))
    row_b = next(line for line in tex.splitlines() if line.startswith("seqlora"))
    assert "$\\mathbf{65.00 \\pm 7.07}$" in row_a  # OP: higher is better
    assert "$50.00$" in row_b
    assert "$\\mathbf{5.00}$" in row_b  # forgetting: lower is better
    assert "$20.00 \\pm 14.14$" in row_a
    row_m = next(line for line in tex.splitlines() if line.startswith("multitask"))
    assert "$90.00$" in row_m and "mathbf" not in row_m  # an upper bound, not a competitor
    assert latex_escape("a_b 50% {x}") == "a\\_b 50\\% \\{x\\}"


def test_csv_parses_back(runs: list[Path]) -> None:
    rows = list(csv.DictReader(io.StringIO(_report(*map(str, runs), "--format", "csv"))))
    assert [r["label"] for r in rows] == ["in_c&lora / order1", "multitask / order1", "seqlora / order1"]
    a = rows[0]
    assert a["n"] == "2" and a["seeds"] == "0;1" and a["stream"] == "order1"
    assert float(a["op_mean"]) == pytest.approx(0.65) and float(a["op_std"]) == pytest.approx(0.05 * 2**0.5)
    assert a["op_n"] == "2" and a["density_mean"] == "" and a["density_n"] == "0"
    assert {f"{k}_{s}" for k in SUMMARY_KEYS for s in ("mean", "std", "n")} <= set(a)


def test_json_schema(runs: list[Path]) -> None:
    data = json.loads(_report(*map(str, runs), "--format", "json"))
    assert [d["label"] for d in data] == ["in_c&lora / order1", "multitask / order1", "seqlora / order1"]
    assert [d["reference"] for d in data] == [False, True, False]
    for d in data:
        assert {"label", "stream", "n", "reference", "seeds", "run_dirs", "config", "metrics"} <= set(d)
        assert set(d["metrics"]) == set(SUMMARY_KEYS)
        assert all(set(v) == {"mean", "std", "n"} for v in d["metrics"].values())
    assert data[0]["metrics"]["forgetting"] == {"mean": pytest.approx(0.2), "std": pytest.approx(0.1 * 2**0.5), "n": 2}


def test_markdown_alias_and_bad_format(runs: list[Path]) -> None:
    assert _report(*map(str, runs), "--markdown") == _report(*map(str, runs), "--format", "markdown")
    result = runner.invoke(app, ["report", str(runs[0]), "--format", "docx"])
    assert result.exit_code == 2 and "--format" in result.output


def test_matrix(runs: list[Path]) -> None:
    md = _report(str(runs[0]), "--matrix", "--format", "markdown")
    assert "| after \\ on | dbpedia | amazon |" in md
    assert "| zero-shot | 25.0 | 50.0 |" in md and "| after dbpedia | 80.0 | 10.0 |" in md
    assert "| after amazon | 70.0 | 90.0 |" in md and "(seed 0)" in md
    rows = list(csv.DictReader(io.StringIO(_report(str(runs[0]), "--matrix", "--format", "csv"))))
    assert len(rows) == 6 and rows[0] == {"run_dir": str(runs[0]), "label": "in_c&lora / order1 (seed 0)",
                                          "row": "zero-shot", "task": "dbpedia", "accuracy": "0.25"}  # fmt: skip
    data = json.loads(_report(*map(str, runs[:2]), "--matrix", "--format", "json"))
    assert len(data) == 2 and data[0]["tasks"] == TASKS
    assert data[0]["rows"][-1] == {"row": "after amazon", "accuracy": [0.7, 0.9]}
    table = _report(str(runs[0]), "--matrix")
    assert "zero-shot" in table and "after amazon" in table and "90.0" in table
    tex = _report(str(runs[0]), "--matrix", "--format", "latex")
    assert "after amazon & 70.0 & 90.0 \\\\" in tex


def test_labels_by_stream_and_rich_escape(tmp_path: Path) -> None:
    custom = _run(tmp_path, "c", strategy="inclora", seed=0, op=0.5, forgetting=0.1, stream_file="s/my-stream.yaml")
    tasks = _run(tmp_path, "t", strategy="inclora", seed=0, op=0.5, forgetting=0.1, tasks=["cb", "rte"])
    named = _run(tmp_path, "n", strategy="inclora", seed=0, op=0.5, forgetting=0.1)
    results = json.loads((named / "results.json").read_text())
    (named / "results.json").write_text(json.dumps({**results, "stream": "long-15"}))
    labels = [r["label"] for r in aggregate(load_runs([custom, tasks, named])[0])]
    assert sorted(labels) == ["inclora / cb,rte", "inclora / long-15", "inclora / my-stream"]
    assert stream_label(run_results(nested_config(order=3), stream="nested")) == "nested"  # as the run recorded it
    # Two settings with equal labels get "[key=value]" suffixes, which rich must print, not eat.
    small = _run(tmp_path, "s", strategy="inclora", seed=0, op=0.5, forgetting=0.1, model="small")
    big = _run(tmp_path, "b", strategy="inclora", seed=0, op=0.5, forgetting=0.1, model="big")
    table = _report(str(small), str(big), "--format", "table")
    assert "inclora / order1 [model=big]" in table and "inclora / order1 [model=small]" in table


def test_plots_and_no_matplotlib_on_import(runs: list[Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", *map(str, runs), "--plot", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    made = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert {"bars_op.png", "bars_bwt.png", "bars_fwt.png", "bars_forgetting.png"} <= set(made)
    assert {"heatmap_a0.png", "overlap_b0.png", "training_a1.png"} <= set(made)
    code = "import sys, jumplora.cli, jumplora.metrics; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_matrix_table_fits_a_narrow_console_without_cutting_cells() -> None:
    """A 15-task R in 80 columns: numbered columns, whole percents, the task names as a legend; no "…"."""
    from rich.console import Console

    from jumplora.metrics.report import matrix_table

    tasks = [f"task{i:02d}name" for i in range(15)]
    matrix = [[(i * 7 + j) % 101 / 100 for j in range(15)] for i in range(15)]
    results = {"tasks": tasks, "accuracy_matrix": matrix, "zero_shot": [1.0] * 15}
    console = Console(width=80, record=True)
    console.print(matrix_table(results, title="R", width=80))
    text = console.export_text()
    assert "…" not in text and all(f"{i + 1}:{task}" in text for i, task in enumerate(tasks))
    assert "after 15" in text and " 100" in text and "1.0" not in text  # zero-shot row as whole percents
    wide = Console(width=400, record=True)
    wide.print(matrix_table(results, title="R", width=400))
    text = wide.export_text()
    assert "after task14name" in text and "100.0" in text


def test_a_stopped_run_with_some_rows_is_skipped_not_an_error(runs: list[Path], tmp_path: Path) -> None:
    """A run killed after two of four tasks (or still running) holds two rows: report notes it and goes on."""
    tasks = ["a", "b", "c", "d"]
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    partial = run_results(nested_config(order=1), complete=False, tasks=tasks, tasks_done=2,
                          accuracy_matrix=[[0.5] * 4, [0.25] * 4], zero_shot=[0.0] * 4)  # fmt: skip
    (stopped / "results.json").write_text(json.dumps(partial))
    result = runner.invoke(app, ["report", str(runs[0]), str(stopped), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "incomplete" in result.output
    partial["accuracy_matrix"] = [[0.5] * 4] * 5  # more rows than tasks is damage, not progress
    (stopped / "results.json").write_text(json.dumps(partial))
    result = runner.invoke(app, ["report", str(runs[0]), str(stopped)])
    assert result.exit_code == 2 and "at most 4 rows" in result.output
