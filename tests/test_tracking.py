"""CLI runs log like a well-behaved tool: trackers through Accelerate, levels through `logging`, clean stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jumplora.data import resolve_data_dir

pytestmark = pytest.mark.slow


def run_cli(out: Path, model: str, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "--out", str(out), "--tasks", "cb", "--model", model, "--data-dir", str(resolve_data_dir()),
        "--max-train", "16", "--max-eval", "8", "--max-length", "64", "--batch-size", "8", "--cpu",
        "--threads", "1", "--log-every", "1", "--no-plots", *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPLORA_TEST_")}
    return subprocess.run(
        [sys.executable, "-m", "jumplora.cli", "run", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_tensorboard_tracker_gets_the_training_log(tmp_path, tiny_model):
    pytest.importorskip("tensorboard")
    proc = run_cli(tmp_path / "run", tiny_model, "--report-to", "tensorboard", "--jumplora")
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = list((tmp_path / "run" / "tracking").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/gamma", "train/lr", "train/theta", "train/density"} <= tags, tags
    assert not tags & {"step", "global_step", "task_index", "train/step", "train/global_step"}, tags  # the x-axis
    assert {"eval/acc/cb", "eval/op"} <= tags, tags  # evaluations and the final metrics
    after_training = acc.Scalars("eval/acc/cb")[-1]
    assert after_training.step > 0 and 0.0 <= after_training.value <= 1.0
    assert (tmp_path / "run" / "train_log.jsonl").stat().st_size > 0  # the log file is still written
    env = json.loads((tmp_path / "run" / "results.json").read_text())["environment"]
    assert env["world_size"] == 1 and env["threads"] == 1 and env["device"] == "cpu" and env["dtype"] == "float32"
    assert env["effective_batch_size"] == 8 and env["torch_version"] and env["warnings"] == []


def test_unknown_tracker_is_bad_input(tmp_path, tiny_model):
    proc = run_cli(tmp_path / "run", tiny_model, "--report-to", "nosuchtracker")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "report_to" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_redirected_output_is_clean_and_levels_work(tmp_path, tiny_model):
    proc = run_cli(tmp_path / "run", tiny_model)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr, "progress bars in a redirected log"
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]
    assert "zero-shot eval" in proc.stderr and "eval after cb" in proc.stderr  # INFO lines replace the bars
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d cb step 1  loss \d", proc.stderr, re.M), proc.stderr[-2000:]
    quiet = run_cli(tmp_path / "quiet", tiny_model, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr.strip() == "", quiet.stderr[-2000:]
    verbose = run_cli(tmp_path / "verbose", tiny_model, "-v")
    assert verbose.returncode == 0 and "zero-shot eval" in verbose.stderr
