"""Strict input handling: every bad input exits with code 2, one clear message, and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jumplora.cli import app
from jumplora.data import resolve_data_dir

runner = CliRunner()


def write_stream(folder: Path, **task_overrides) -> Path:
    """A valid two-task custom stream (JSON), with overrides for the first task."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"sentence": w, "label": lab} for w, lab in [("good", "yes"), ("bad", "no")] * 4]
    (folder / "a.json").write_text(json.dumps(items))
    tasks = [
        {
            "name": "a",
            "instruction": "Positive?",
            "options": ["yes", "no"],
            "train": "a.json",
            "test": "a.json",
        },
        {
            "name": "b",
            "instruction": "Negative?",
            "options": ["yes", "no"],
            "train": "a.json",
            "test": "a.json",
        },
    ]
    tasks[0].update(task_overrides)
    path = folder / "stream.json"
    path.write_text(json.dumps({"name": "toy", "tasks": tasks}))
    return path


def invoke(out: Path, *args: str):
    base = ["run", "--out", str(out), "--max-train", "8", "--max-eval", "8", "--max-length", "32", "--cpu"]
    return runner.invoke(app, [*base, "--quiet", *args])


def assert_bad_input(result, out: Path, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr
    assert err.count("error:") == 1, err
    message = err[err.index("error:") :].strip()
    assert "\n" not in message, message  # one line
    for needle in needles:
        assert needle in message, (needle, message)
    assert not out.exists(), f"{out} was written for a bad input"


@pytest.fixture
def paths(tmp_path, tiny_model):
    return {"out": tmp_path / "out", "model": tiny_model, "tmp": tmp_path}


BAD_STREAMS = {
    # name: (how to make the stream file, words the message must contain)
    "missing file": (lambda d: d / "nope.yaml", ["nope.yaml", "not found"]),
    "invalid yaml": (
        lambda d: _text(d / "s.yaml", "tasks: [\n  - name: a\n  bad"),
        ["s.yaml", "invalid YAML"],
    ),
    "invalid json": (lambda d: _text(d / "s.json", '{"tasks": [}'), ["s.json", "invalid JSON"]),
    "wrong top key": (lambda d: _text(d / "s.json", '{"taks": []}'), ["s.json", "unknown key 'taks'"]),
    "wrong task key": (lambda d: write_stream(d, lables=["x"]), ["tasks[0]", "unknown key 'lables'"]),
    "label outside options": (
        lambda d: write_stream(d, options=["yes", "maybe"]),
        ["a.json", "'no' is not one of the options"],
    ),
    "empty split": (lambda d: write_stream(d, train=_text(d / "e.json", "[]").name), ["e.json", "is empty"]),
    "missing split file": (lambda d: write_stream(d, test="gone.json"), ["gone.json", "not found"]),
    "unsupported suffix": (lambda d: _text(d / "s.txt", "x"), ["s.txt", "unsupported stream file type"]),
}


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_bad_stream_file(paths, case):
    make, needles = BAD_STREAMS[case]
    stream = make(paths["tmp"] / "stream")
    result = invoke(paths["out"], "--stream", str(stream), "--model", paths["model"])
    assert_bad_input(result, paths["out"], *needles)


BAD_OPTIONS = {
    "unknown strategy": (["--strategy", "ewc"], ["unknown strategy 'ewc'"]),
    "unknown target module": (["--targets", "query,qkv"], ["target modules ['qkv']"]),
    "target not linear": (["--targets", "word_embeddings"], ["word_embeddings", "Embedding"]),
    "unknown family": (["--family", "rnn"], ["unknown model family 'rnn'"]),
    "unknown task": (["--tasks", "cb,mnist"], ["unknown task 'mnist'"]),
    "unknown order": (["--order", "9"], ["unknown order 9"]),
    "bad eval split": (["--eval-split", "val"], ["eval_split"]),
    "bad batch size": (["--batch-size", "0"], ["batch_size must be >= 1"]),
    "bad granularity": (["--granularity", "per_head"], ["threshold_granularity"]),
    "bad mixed precision": (["--mixed-precision", "fp8x"], ["fp8x"]),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option(paths, case):
    args, needles = BAD_OPTIONS[case]
    if "--tasks" not in args and "--order" not in args:
        args = [*args, "--tasks", "cb,rte"]
    result = invoke(paths["out"], "--model", paths["model"], "--data-dir", str(resolve_data_dir()), *args)
    assert_bad_input(result, paths["out"], *needles)


def test_model_path_missing(paths):
    result = invoke(paths["out"], "--tasks", "cb", "--model", str(paths["tmp"] / "nomodel"))
    assert_bad_input(result, paths["out"], "nomodel", "does not exist")


def test_model_path_not_a_model(paths):
    folder = paths["tmp"] / "notamodel"
    folder.mkdir()
    (folder / "weights.txt").write_text("x")
    result = invoke(paths["out"], "--tasks", "cb", "--model", str(folder))
    assert_bad_input(result, paths["out"], "notamodel", "no config.json")


def test_model_config_invalid(paths):
    folder = paths["tmp"] / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))  # weights present: the config is what fails
    result = invoke(paths["out"], "--tasks", "cb", "--model", str(folder))
    assert_bad_input(result, paths["out"], "broken", "could not load the model")


def test_data_dir_not_the_benchmark(paths):
    folder = paths["tmp"] / "data"
    folder.mkdir()
    result = invoke(paths["out"], "--tasks", "cb", "--model", paths["model"], "--data-dir", str(folder))
    assert_bad_input(result, paths["out"], str(folder), "does not look like the CL benchmark")


def test_existing_run_needs_resume_or_overwrite(paths):
    out = paths["out"]
    out.mkdir()
    (out / "results.json").write_text('{"complete": true}')
    result = invoke(out, "--tasks", "cb", "--model", paths["model"])
    assert result.exit_code == 2 and "--resume" in result.stderr
    assert (out / "results.json").read_text() == '{"complete": true}'


@pytest.mark.slow
def test_resume_with_other_config_and_overwrite(paths):
    """A finished tiny run; --resume with another lr fails untouched; --overwrite replaces it."""
    out, model = paths["out"], paths["model"]
    args = ["--tasks", "cb", "--model", model, "--data-dir", str(resolve_data_dir()), "--batch-size", "8"]
    assert invoke(out, *args).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = invoke(out, *args, "--resume", "--lr", "0.5")
    needle = "--resume with a different configuration (first difference optim.lr: 0.001 → 0.5)"
    assert result.exit_code == 2 and needle in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    result = invoke(out, *args, "--overwrite", "--lr", "0.5")
    assert result.exit_code == 0, result.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and saved["config"]["optim"]["lr"] == 0.5


def test_console_script_exit_code(tmp_path):
    """Through a real process: exit status 2 and the message on stderr, nothing on stdout."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jumplora.cli",
            "run",
            "--out",
            str(out),
            "--stream",
            str(tmp_path / "a.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr and "a.yaml" in proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_config_file_then_options_over_it(tmp_path, monkeypatch):
    """`--config` takes a saved config.json (or YAML); options given on the command line override it."""
    import typer

    from jumplora import cli
    from jumplora.config import RunConfig

    saved = RunConfig.from_flat(out=str(tmp_path / "a"), tasks=["cb"], lr=3e-4, strategy="ella", jumplora=True)
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    (tmp_path / "run.yaml").write_text("optim: {lr: 0.0005}\nstrategy: {name: olora}\nstream: {tasks: [rte]}\n")
    seen = []

    def capture(config, **kwargs):
        seen.append(config)
        raise typer.Exit(0)

    monkeypatch.setattr(cli, "execute", capture)
    args = ["run", "--config", str(tmp_path / "config.json"), "--seed", "3", "--out", str(tmp_path / "b")]
    assert runner.invoke(app, args).exit_code == 0
    assert seen[-1] == saved.replace(seed=3, out=str(tmp_path / "b"))
    args = ["run", "--config", str(tmp_path / "run.yaml"), "--strategy-arg", "lam_orth=2"]
    assert runner.invoke(app, args).exit_code == 0
    assert seen[-1].optim.lr == 5e-4 and seen[-1].stream.tasks == ["rte"]
    assert seen[-1].strategy.name == "olora" and seen[-1].strategy.args["lam_orth"] == 2.0
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "run.yaml"), "--strategy", "ella"])
    # a new strategy drops the file's args
    assert result.exit_code == 0 and seen[-1].strategy.args == {"lam": 3e4, "past": "dense"}


def test_strategies_command_lists_every_strategy_and_its_arguments():
    result = runner.invoke(app, ["strategies"])
    assert result.exit_code == 0
    for needle in ("inclora", "seqlora", "ella", "lam", "olora", "lam_orth", "replay", "memory_per_task"):
        assert needle in result.stdout
