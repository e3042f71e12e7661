"""Crash safety: `kill -9` at named points, `--resume`, and the result equals an uninterrupted run.

Each run is a real child process (`jumplora run`, forked with its imports done: tests/cli_process.py);
``JUMPLORA_TEST_KILL_AT=<point>:<n>`` makes it SIGKILL itself the n-th time it reaches ``<point>``
(``--plugin tests/fault_plugin.py``). A chain of runs is killed at several points in turn, each one resuming
the previous, and the last one completes.
Tiny: a 2-layer BERT (hidden 32), 2 tasks × 32 training examples (4 optimizer steps each), 16 eval.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_process import run_cli
from safetensors.torch import load_file

from jumplora.data import resolve_data_dir
from jumplora.io import read_jsonl

pytestmark = pytest.mark.slow

KILLED = -9  # returncode of a process that died of SIGKILL
#: Fault injection lives in the tests: this plugin arms the points from the environment.
FAULT_PLUGIN = str(Path(__file__).with_name("fault_plugin.py"))


def run_args(out: Path, model: str, strategy: str, *extra: str) -> list[str]:
    return [
        "--out", str(out), "--tasks", "cb,rte", "--model", model, "--data-dir", str(resolve_data_dir()),
        "--max-train", "32", "--max-eval", "16", "--max-length", "64", "--batch-size", "8",
        "--eval-batch-size", "16", "--lr", "0.01", "--strategy", strategy, "--jumplora", "--cpu",
        "--quiet", "--threads", "1", "--log-every", "1", *extra,
    ]  # fmt: skip


def cli(args: list[str], *, kill_at: str | None = None, nan_at: str | None = None, cwd=None):
    armed = {"JUMPLORA_TEST_KILL_AT": kill_at, "JUMPLORA_TEST_NAN_AT": nan_at}
    plugin = ["--plugin", FAULT_PLUGIN] if kill_at or nan_at else []
    return run_cli(["run", *args, *plugin], extra_env={k: v for k, v in armed.items() if v}, cwd=cwd)


def check_consistent_after_crash(out: Path) -> None:
    """Whatever a crash left is whole: JSON parses, the checkpoint names existing files, no 'complete'."""
    results = out / "results.json"
    if results.exists():
        assert json.loads(results.read_text())["complete"] is False
    state_path = out / "checkpoint" / "state.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        for name in [*state["updates"], *state["supports"], state["strategy"], state["adapter"]]:
            if name is not None:
                load_file(str(out / "checkpoint" / name))
    read_jsonl(out / "train_log.jsonl")


def assert_same_run(a: Path, b: Path) -> None:
    """Same R (within 1e-6), same merged updates, supports and strategy state, same training log."""
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["complete"] is True and rb["complete"] is True
    np.testing.assert_allclose(ra["accuracy_matrix"], rb["accuracy_matrix"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(ra["zero_shot"], rb["zero_shot"], atol=1e-6, rtol=0)
    assert ra["tasks_done"] == rb["tasks_done"] == 2
    assert ra["overlap_matrix"] == rb["overlap_matrix"]
    sa, sb = (json.loads((d / "checkpoint" / "state.json").read_text()) for d in (a, b))
    assert sa["updates"] == sb["updates"] and sa["supports"] == sb["supports"]
    for name in [*sa["updates"], *sa["supports"], sa["strategy"]]:
        if name is None:
            continue
        ta, tb = load_file(str(a / "checkpoint" / name)), load_file(str(b / "checkpoint" / name))
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert torch.allclose(ta[key].double(), tb[key].double(), atol=1e-6, rtol=0), (name, key)
    la, lb = read_jsonl(a / "train_log.jsonl"), read_jsonl(b / "train_log.jsonl")
    assert [(r["task_index"], r["step"]) for r in la] == [(r["task_index"], r["step"]) for r in lb]
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], atol=1e-6, rtol=0)
    assert not list((b / "checkpoint").glob(".*.tmp")) and not list(b.glob(".*.tmp"))


def kill_chain(out: Path, args: list[str], kill_points: list[str]) -> list[str]:
    """Run, killed at each point in turn (each run resuming the last), then resume to the end."""
    stderr = []
    for i, point in enumerate(kill_points):
        proc = cli(args + (["--resume"] if i else []), kill_at=point)
        assert proc.returncode == KILLED, f"{point}: rc={proc.returncode}\n{proc.stderr[-3000:]}"
        check_consistent_after_crash(out)
        stderr.append(proc.stderr)
    proc = cli([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    stderr.append(proc.stderr)
    return stderr


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """Uninterrupted runs, one per setting, made on first use."""
    cache: dict[tuple[str, ...], Path] = {}

    def get(strategy: str, *extra: str) -> Path:
        key = (strategy, *extra)
        if key not in cache:
            out = tmp_path_factory.mktemp("ref") / "run"
            proc = cli(run_args(out, tiny_model, strategy, *extra))
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[key] = out
        return cache[key]

    return get


def test_inclora_killed_at_six_points_resumes_to_the_same_run(tmp_path, tiny_model, reference):
    out = tmp_path / "run"
    args = run_args(out, tiny_model, "inclora")
    # Hit counts are per process. In order: mid-training of task 0 (only the zero-shot checkpoint
    # exists); task 0's files written but state.json not (mid-checkpoint); mid-evaluation after
    # task 0; state.json committed but results.json not; inside an atomic write of task 1's
    # checkpoint (temporary file complete, not renamed); after the final plots, before results.json.
    stderr = kill_chain(out, args, ["step:3", "checkpoint:1", "eval:2", "commit:1", "write:3", "finish:1"])
    assert_same_run(reference("inclora"), out)
    assert "resuming" in stderr[-1]


def test_saved_predictions_survive_kills_and_resumes(tmp_path, tiny_model, reference):
    """Killed mid-evaluation and after the plots: the resumed run's predictions/ equals an uninterrupted one's."""
    out = tmp_path / "run"
    kill_chain(out, [*run_args(out, tiny_model, "inclora"), "--save-predictions"], ["eval:2", "finish:1"])
    ref = reference("inclora", "--save-predictions")
    assert_same_run(ref, out)
    names = sorted(p.name for p in (out / "predictions").iterdir())
    assert names == ["00-zero-shot.jsonl", "01-after-cb.jsonl", "02-after-rte.jsonl"]
    for name in names:
        assert (out / "predictions" / name).read_text() == (ref / "predictions" / name).read_text()


@pytest.mark.parametrize(
    ("strategy", "extra"), [("ella", ()), ("ella", ("--strategy-arg", "past=merged")), ("olora", ())]
)
def test_stateful_strategy_killed_mid_checkpoint(tmp_path, tiny_model, reference, strategy, extra):
    # The strategy state after task 0 (W_past / past A's) is on disk, state.json still says task 0
    # is not done: resuming must not count task 0 twice.
    out = tmp_path / "run"
    kill_chain(out, run_args(out, tiny_model, strategy, *extra), ["checkpoint:2", "step:5"])
    assert_same_run(reference(strategy, *extra), out)


def test_seqlora_mid_task_checkpoints(tmp_path, tiny_model, reference):
    """Shared adapter, 2 epochs with gradient accumulation, mid-task checkpoints every 2 steps."""
    out = tmp_path / "run"
    extra = ("--epochs", "2", "--grad-accum", "2")
    args = run_args(out, tiny_model, "seqlora", *extra, "--checkpoint-every", "2")
    # 1: task 0's end checkpoint half written (adapter file there, not committed; the mid-task
    # checkpoint at step 2 is the committed one). 2: resumed from that mid-task checkpoint, killed
    # after step 3 of task 1 (its step-2 checkpoint committed). 3: resumed mid-task 1 to the end.
    stderr = kill_chain(out, args, ["checkpoint:3", "step:5"])
    assert "task 0 from its mid-task checkpoint at step 2" in stderr[1]
    assert "task 1 from its mid-task checkpoint at step 2" in stderr[2]
    # checkpoint_every is free to differ on resume and does not change the numbers
    assert_same_run(reference("seqlora", *extra), out)
    assert not list((out / "checkpoint").glob("partial_*"))


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_checkpoint(tmp_path, tiny_model, reference):
    out = tmp_path / "run"
    args = run_args(out, tiny_model, "inclora")
    proc = cli(args, nan_at="1:2")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "numerical fault: task 'rte' (index 1), step 2: loss is nan" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and results["tasks_done"] == 1
    assert json.loads((out / "checkpoint" / "state.json").read_text())["next_task"] == 1
    proc = cli([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference("inclora"), out)


def test_nan_threshold_is_caught(tmp_path, tiny_model, monkeypatch):
    """θ going non-finite (not only the loss) stops the run, naming the task and the step."""
    from jumplora import ContinualTrainer
    from jumplora.adapters import threshold_parameters
    from jumplora.config import RunConfig
    from jumplora.train.numerics import NumericalError

    config = RunConfig.from_flat(
        out=str(tmp_path / "run"), tasks=["cb", "rte"], model=tiny_model, max_train=16, max_eval=16,
        max_length=64, batch_size=8, jumplora=True, cpu=True, plots=False,
    )  # fmt: skip
    trainer = ContinualTrainer(config, quiet=True)
    trainer.prepare()
    from jumplora.train import loop

    original = loop.check_thresholds

    def poisoned(model, where):
        if where == "task 'cb' (index 0), step 1":
            with torch.no_grad():
                next(iter(threshold_parameters(model).values())).fill_(float("inf"))
        original(model, where)

    monkeypatch.setattr(loop, "check_thresholds", poisoned)
    with pytest.raises(NumericalError, match=r"task 'cb' \(index 0\), step 1: threshold"):
        trainer.run()
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["next_task"] == 0 and state["zero_shot"] is not None


def test_run_directory_files_are_safetensors_or_json(tmp_path, tiny_model, reference):
    """Nothing in a run directory needs unpickling; the checkpoint stores updates, not the model."""
    out = reference("inclora")
    model_bytes = (Path(tiny_model) / "model.safetensors").stat().st_size
    ckpt_bytes = sum(p.stat().st_size for p in (out / "checkpoint").iterdir())
    assert ckpt_bytes < model_bytes  # only the sparse updates and supports
    for path in out.rglob("*"):
        if path.is_file():
            assert path.suffix in {".json", ".jsonl", ".safetensors", ".png", ".lock"}, path  # .lock: the PID
    source = Path(__file__).resolve().parents[1] / "src" / "jumplora"
    for py in source.rglob("*.py"):
        assert not re.search(r"torch\.load\(|import pickle|pickle\.loads?\(", py.read_text()), py


def test_remote_code_is_off_unless_asked():
    from jumplora.config import RunConfig

    assert RunConfig().model.trust_remote_code is False
