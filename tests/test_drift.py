"""Answer drift: what answers to earlier tasks became, from a run's saved predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from results_v2 import nested_config, run_results
from typer.testing import CliRunner

from jumplora.cli import app
from jumplora.metrics.drift import KINDS, answer_drift, final_drift

runner = CliRunner()
OPTIONS = {"sst": ["positive", "negative"], "topic": ["sports", "world"], "nli": ["yes", "no", "positive"]}


def record(task: str, index: int, answer: str, prediction: str, rank_prediction: str | None = None) -> dict:
    out = {"task": task, "index": index, "answer": answer, "prediction": prediction, "correct": prediction == answer}
    if rank_prediction is not None:
        out |= {"rank_prediction": rank_prediction, "rank_correct": rank_prediction == answer}
    return out


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """sst → topic → nli; four sst items, two topic items after each later task."""
    (tmp_path / "predictions").mkdir()
    results = run_results(nested_config(), tasks=list(OPTIONS), task_options=OPTIONS,
                          accuracy_matrix=[[0.5, 0, 0], [0.5, 0.5, 0], [0.25, 0.5, 0.5]], zero_shot=[0, 0, 0],
                          rank_accuracy_matrix=[[0.5, 0, 0], [0.5, 0.5, 0], [0.25, 0.5, 0.5]])  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results))
    after_topic = [  # correct, own option, newest task's label, free text
        record("sst", 0, "positive", "positive", "positive"),
        record("sst", 1, "positive", "negative", "negative"),
        record("sst", 2, "negative", " Sports", "sports"),
        record("sst", 3, "negative", "I think it is", "positive"),
    ]
    after_nli = [  # "positive" is both sst's own option and an nli option: own wins; "world": another task's
        record("sst", 0, "positive", "positive", "positive"),
        record("sst", 1, "negative", "Positive", "positive"),
        record("sst", 2, "negative", "yes", "yes"),
        record("sst", 3, "negative", "world", "world"),
        record("topic", 0, "sports", "sports", "sports"),
        record("topic", 1, "world", "", "no"),
    ]
    for name, records in (("02-after-topic", after_topic), ("03-after-nli", after_nli)):
        (tmp_path / "predictions" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_each_answer_gets_its_kind(run: Path) -> None:
    rows = answer_drift(run)
    assert [(r["after"], r["task"], r["n"]) for r in rows] == [("topic", "sst", 4), ("nli", "sst", 4),
                                                               ("nli", "topic", 2)]  # fmt: skip
    assert {k: rows[0][k] for k in KINDS} == {"correct": 0.25, "own_option": 0.25, "newest_task": 0.25,
                                              "other_task": 0.0, "no_option": 0.25}  # fmt: skip
    assert {k: rows[1][k] for k in KINDS} == {"correct": 0.25, "own_option": 0.25, "newest_task": 0.25,
                                              "other_task": 0.25, "no_option": 0.0}  # fmt: skip
    assert rows[2]["correct"] == 0.5 and rows[2]["no_option"] == 0.5
    for row in rows:
        assert sum(row[k] for k in KINDS) == pytest.approx(1.0)


def test_final_drift_weights_items_and_ranking_never_leaves_the_options(run: Path) -> None:
    assert final_drift(answer_drift(run)) == pytest.approx(
        {"correct": 2 / 6, "own_option": 1 / 6, "newest_task": 1 / 6, "other_task": 1 / 6, "no_option": 1 / 6}
    )
    ranked = answer_drift(run, "rank_prediction")
    assert all(r["no_option"] == 0.0 for r in ranked)
    assert ranked[0]["newest_task"] == 0.25 and ranked[0]["own_option"] == 0.5


def test_report_drift_json_and_a_clear_error_without_predictions(run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(run), "--drift", "--format", "json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["prediction"] == answer_drift(run) and shown["rank_prediction"] == answer_drift(run, "rank_prediction")
    table = runner.invoke(app, ["report", str(run), "--drift", "--format", "markdown"])
    assert table.exit_code == 0 and "| topic | sst | 4 | 25.0 | 25.0 | 25.0 | 0.0 | 25.0 |" in table.output

    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "runner": "multitask"}))
    with pytest.raises(ValueError, match="a multitask run has no earlier tasks"):
        answer_drift(run)
    (run / "results.json").write_text(json.dumps(results))
    (run / "predictions" / "03-after-nli.jsonl").unlink()
    missing = runner.invoke(app, ["report", str(run), "--drift"])
    assert missing.exit_code == 2 and "03-after-nli.jsonl: missing (run with --save-predictions)" in missing.output


def test_report_drift_skips_a_run_without_predictions_and_csv_is_one_tidy_table(run: Path, tmp_path: Path) -> None:
    """`report runs/* --drift`: a run lacking predictions gets a note, not an abort; CSV: one header, fractions."""
    import csv
    import io
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run, other)
    shutil.rmtree(other / "predictions")
    result = runner.invoke(app, ["report", str(run), str(other), "--drift", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stderr and "other" in result.stderr and "missing" in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["run", "answers", "after", "task", "n", *KINDS]
    assert {r["answers"] for r in rows} == {"generated", "ranked"} and {r["run"] for r in rows} == {str(run)}
    first = next(r for r in rows if r["answers"] == "generated" and r["after"] == "topic" and r["task"] == "sst")
    assert [float(first[k]) for k in KINDS] == [0.25, 0.25, 0.25, 0.0, 0.25]  # fractions, not percentages
    assert len(rows) == 2 * len(answer_drift(run))
