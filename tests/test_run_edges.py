"""Issue 29 edges that need more than one CLI call: a disk-full crash, names that would break a table."""

from __future__ import annotations

import errno
import json
from pathlib import Path

from results_v2 import nested_config, run_results
from typer.testing import CliRunner

from jumplora.cli import app
from jumplora.data import resolve_data_dir

runner = CliRunner()


def test_disk_full_is_one_error_line_and_the_checkpoint_survives(tmp_path, tiny_model, monkeypatch) -> None:
    import jumplora.run.directory as checkpoint
    from jumplora.run.directory import read_state

    real, calls = checkpoint.atomic_save_tensors, []

    def full_disk(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # task 0's files: its update is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "atomic_save_tensors", full_disk)
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--tasks", "cb,rte", "--model", tiny_model, "--data-dir",
            str(resolve_data_dir()), "--max-train", "8", "--max-eval", "8", "--max-length", "32", "--batch-size",
            "8", "--cpu", "--quiet", "--no-plots"]  # fmt: skip
    result = runner.invoke(app, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "No space left on device" in errors[0] and "--resume" in errors[0]
    assert read_state(out)["next_task"] == 0  # the zero-shot checkpoint is whole
    monkeypatch.setattr(checkpoint, "atomic_save_tensors", real)
    assert runner.invoke(app, [*args, "--resume"]).exit_code == 0


def _results_only(root: Path, tasks: list[str]) -> Path:
    run = root / "run"
    run.mkdir()
    results = run_results(nested_config(strategy="inclora"), tasks=tasks, task_options={t: ["x", "y"] for t in tasks},
                          accuracy_matrix=[[0.5, 0.25], [0.5, 0.75]], zero_shot=[0.5, 0.5])
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_a_pipe_in_a_task_name_keeps_markdown_rows_whole(tmp_path) -> None:
    run = _results_only(tmp_path, ["a", "b|c"])
    result = runner.invoke(app, ["report", str(run), "--matrix", "--format", "markdown"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("| after")]
    assert rows and all(line.count(" | ") == 2 for line in rows), rows
    assert "| after b\\|c |" in result.stdout
