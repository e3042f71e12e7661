"""Two CPU processes through Accelerate give the run of one process with the same global batch.

``accelerate launch --multi_gpu --num_processes 2`` starts two gloo processes on a CPU-only machine
(``--cpu`` on ``accelerate launch`` would start one process unless MPI is set up); ``jumplora run
--cpu`` keeps the model on the CPU. Per-device batch 4 × 2 processes = the single process's batch 8:
the same examples per step, gradients averaged by DDP, evaluation sharded and summed.

Tolerances (observed on this tiny stream in brackets): R equal within one evaluation example
[identical]; supports equal in ≥ 99.9 % of entries [identical]; merged updates within 1 % relative
Frobenius norm [≤ 1e-5 here, up to 5e-4 in other tiny set-ups: float sums in another order,
amplified by Adam]; logged mean loss within 1e-3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_process import run_cli
from safetensors.torch import load_file

from jumplora.data import resolve_data_dir
from jumplora.io import read_jsonl

pytestmark = pytest.mark.slow

MAX_EVAL = 16


def run_args(out: Path, model: str, strategy: str, batch_size: int) -> list[str]:
    return [
        "run", "--out", str(out), "--tasks", "cb,rte", "--model", model, "--data-dir", str(resolve_data_dir()),
        "--max-train", "32", "--max-eval", str(MAX_EVAL), "--max-length", "64",
        "--batch-size", str(batch_size), "--lr", "0.01", "--strategy", strategy, "--jumplora", "--cpu",
        "--quiet", "--threads", "1", "--log-every", "1",
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPLORA_TEST_")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def two_processes() -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "jumplora.cli",
    ]  # fmt: skip


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("strategy", ["inclora", "olora"])
def test_two_processes_match_one(tmp_path, tiny_model, strategy):
    one, two = tmp_path / "one", tmp_path / "two"
    alone = run_cli(run_args(one, tiny_model, strategy, 8))
    assert alone.returncode == 0, alone.stderr[-4000:]
    proc = launch([*two_processes(), *run_args(two, tiny_model, strategy, 4)])
    assert proc.stdout.count("Accuracy (%)") == 1  # only the main process reports

    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1["complete"] and r2["complete"]
    assert r2["config"]["optim"]["batch_size"] * 2 == r1["config"]["optim"]["batch_size"]
    np.testing.assert_allclose(r2["accuracy_matrix"], r1["accuracy_matrix"], atol=1 / MAX_EVAL + 1e-9)
    np.testing.assert_allclose(r2["zero_shot"], r1["zero_shot"], atol=1e-9)

    s1 = json.loads((one / "checkpoint" / "state.json").read_text())
    s2 = json.loads((two / "checkpoint" / "state.json").read_text())
    assert s1["updates"] == s2["updates"] and s1["supports"] == s2["supports"]
    worst = {}
    for name in s1["supports"]:
        a, b = load_file(str(one / "checkpoint" / name)), load_file(str(two / "checkpoint" / name))
        assert a.keys() == b.keys()
        differing = sum(int((a[k] != b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
        assert differing <= 1e-3, (name, differing)
        worst[name] = differing
    for name in s1["updates"]:
        a, b = load_file(str(one / "checkpoint" / name)), load_file(str(two / "checkpoint" / name))
        dense_a, dense_b = _dense(a), _dense(b)
        for key in dense_a:
            rel = float((dense_a[key] - dense_b[key]).norm() / dense_a[key].norm().clamp(min=1e-12))
            assert rel <= 1e-2, (name, key, rel)
            worst[f"{name}:{key}"] = rel
    print("2-process vs 1-process differences:", json.dumps(worst, indent=1))

    l1, l2 = read_jsonl(one / "train_log.jsonl"), read_jsonl(two / "train_log.jsonl")
    assert [r["step"] for r in l1] == [r["step"] for r in l2]
    np.testing.assert_allclose([r["loss"] for r in l2], [r["loss"] for r in l1], atol=1e-3)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_with_a_tracker_and_predictions(tmp_path, tiny_model):
    """Trackers end and the process group is destroyed after the last barrier, on every rank; each
    process's share of the predictions is gathered into one file per evaluation."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    extra = ["--report-to", "tensorboard", "--save-predictions"]
    proc = launch([*two_processes(), *run_args(out, tiny_model, "inclora", 4), *extra])
    results = json.loads((out / "results.json").read_text())
    assert results["complete"]
    assert list((out / "tracking").rglob("events.out.tfevents.*"))
    assert "destroy_process_group" not in proc.stderr  # torch warns when a group outlives the program
    files = sorted((out / "predictions").iterdir())
    for path, row in zip(files, [results["zero_shot"], *results["accuracy_matrix"]], strict=True):
        records = read_jsonl(path)
        for task, accuracy in zip(results["tasks"], row, strict=True):
            mine = [r for r in records if r["task"] == task]
            assert [r["index"] for r in mine] == list(range(MAX_EVAL))
            assert np.mean([r["correct"] for r in mine]) == accuracy


def _dense(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unpack update_NNN files (values at a mask, or dense) into full matrices per module."""
    out = {}
    for key in tensors:
        module, kind = key.split("::")
        if kind == "dense":
            out[module] = tensors[key].double()
        elif kind == "mask":
            full = torch.zeros(tensors[key].shape, dtype=torch.float64)
            full[tensors[key]] = tensors[f"{module}::values"].double()
            out[module] = full
    return out
