"""Bad-input corpus: every case runs the CLI and must exit 2 with exactly one `error:` line (no
traceback), leave `--out` uncreated, and stay within a CPU-time bound.

To add a case, add one row to CASES: a function that writes its files into a scratch folder and
returns the extra CLI arguments, the words the error line must contain, and optional environment.
Cases run in this process through typer's runner (fast); those marked ``process=True`` run the real
``python -m jumplora.cli`` in a fresh interpreter, which also proves the exit status and stderr of
the console script (and is needed where the environment must differ at interpreter start).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Bounds on the child process: CPU seconds (a fresh interpreter importing torch takes ~7 s; a YAML
# "billion laughs" once took 48 s to fail), and wall seconds only to catch a hang on a loaded machine.
CPU_BOUND_S = 40
WALL_TIMEOUT_S = 600
GOOD = [{"sentence": f"text {i}", "label": "pos" if i % 2 else "neg"} for i in range(8)]


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], list[str]]  # writes files under the scratch folder, returns extra CLI args
    needles: tuple[str, ...]  # substrings of the error line
    env: dict[str, str] = field(default_factory=dict)  # "{dir}" is replaced by the scratch folder
    skip: str | None = None
    process: bool = False  # run in a fresh interpreter


def _write(path: Path, content: str | bytes | object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def stream(d: Path, train: object = "train.json", **task: object) -> list[str]:
    """A one-task JSON stream with a good train.json unless `train` points elsewhere."""
    if not (d / "train.json").exists():
        _write(d / "train.json", GOOD)
    spec = {"name": "a", "instruction": "Mood?", "options": ["neg", "pos"], "train": train, "test": "train.json"}
    spec.update(task)
    spec = {k: v for k, v in spec.items() if v is not None}  # None removes a key
    return ["--stream", str(_write(d / "stream.json", {"tasks": [spec]}))]


def raw(name: str, text: str | bytes) -> Callable[[Path], list[str]]:
    """A stream file with exactly this content."""
    return lambda d: ["--stream", str(_write(d / name, text))]


def split(name: str, content: str | bytes | object, **task: object) -> Callable[[Path], list[str]]:
    """A good stream whose train split is the file `name` with this content."""
    return lambda d: stream(d, str(_write(d / name, content).name), **task)


def _laughs(where: str) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    task = "  - {name: a, instruction: i, options: [neg, pos], train: t.json, test: t.json"
    if where == "name":
        return "\n".join([*lines, "name: *a9", "tasks:", task + "}"]) + "\n"
    return "\n".join([*lines, "tasks:", task + ", drop_labels: *a9}"]) + "\n"


def _bench(*extra: str) -> Callable[[Path], list[str]]:
    """A valid benchmark stream (two tiny tasks) plus the given options."""
    from jumplora.data import resolve_data_dir

    return lambda d: ["--tasks", "cb,rte", "--data-dir", str(resolve_data_dir()), "--max-train", "8", *extra]


def _symlink_loop(d: Path) -> list[str]:
    os.symlink(d / "loop2.json", d / "loop1.json")
    os.symlink(d / "loop1.json", d / "loop2.json")
    return stream(d, "loop1.json")


def _unreadable(d: Path) -> list[str]:
    args = stream(d, str(_write(d / "locked.json", GOOD).name))
    (d / "locked.json").chmod(0)
    return args


def _outside_link(d: Path) -> list[str]:
    _write(d.parent / "elsewhere.json", GOOD)
    os.symlink(d.parent / "elsewhere.json", d / "link.json")
    return stream(d, "link.json")


def _saved_dataset(d: Path) -> list[str]:
    import datasets

    datasets.Dataset.from_dict({"sentence": ["x"], "label": ["neg"]}).save_to_disk(str(d / "saved"))
    return stream(d, {"dataset": "./saved", "split": "train", "config": 3})


def _no_datasets_extra(d: Path) -> list[str]:
    _write(d / "shadow" / "datasets" / "__init__.py", "raise ImportError('simulated: datasets not installed')\n")
    return stream(d, {"dataset": "glue", "config": "rte", "split": "validation"})


CASES: dict[str, Case] = {
    # stream files
    "missing stream file": Case(lambda d: ["--stream", str(d / "nope.yaml")], ("nope.yaml", "not found")),
    "stream file is a folder": Case(lambda d: ["--stream", str((d / "s.yaml").mkdir() or d / "s.yaml")],
                                    ("s.yaml", "is a folder")),
    "billion laughs in name": Case(raw("s.yaml", _laughs("name")), ("s.yaml", "aliases (*a0) are not allowed"),
                                   process=True),
    "billion laughs in drop_labels": Case(raw("s.yaml", _laughs("drop_labels")), ("aliases (*a0)",)),
    "json nested 100000 deep": Case(raw("s.json", "[" * 100_000), ("s.json", "nested too deeply (limit: 100 levels)")),
    "yaml nested 100000 deep": Case(raw("s.yaml", "[" * 100_000), ("s.yaml", "nested too deeply (limit: 100 levels)")),
    "duplicate key in yaml": Case(raw("s.yaml", "name: x\ntasks: []\nname: y\n"), ("s.yaml", "duplicate key 'name'")),
    "duplicate key in json": Case(raw("s.json", '{"tasks": [], "tasks": []}'), ("s.json", "duplicate key 'tasks'")),
    "stream not utf-8": Case(raw("s.yaml", b"name: caf\xe9\n"), ("s.yaml", "is not UTF-8")),
    "huge value truncated": Case(raw("s.json", json.dumps({"name": ["x"] * 100_000, "tasks": []})),
                                 ("s.json", "field 'name' = a list of 100000 items must be")),
    "stream with tasks": Case(lambda d: [*stream(d), "--tasks", "cb"], ("--stream and --tasks conflict",)),
    # split files
    "symlink loop": Case(_symlink_loop, ("loop1.json", "symlink loop")),
    "split is a folder": Case(lambda d: stream(d, str((d / "dir.json").mkdir() or "dir.json")),
                              ("dir.json", "is a folder")),
    "split unreadable": Case(_unreadable, ("locked.json", "Permission denied"),
                             skip="root reads any file" if os.geteuid() == 0 else None),
    "split not utf-8": Case(split("t.json", b'[{"sentence": "caf\xe9", "label": "neg"}]'), ("t.json", "not UTF-8")),
    "lone surrogate": Case(split("t.json", '[{"sentence": "a\\ud800", "label": "neg"}]'),
                           ("t.json: item 0: field 'sentence' has a lone surrogate",)),
    "split nested deep": Case(split("t.json", "[" * 100_000), ("t.json", "nested too deeply (limit: 100 levels)")),
    "duplicate key in a row": Case(split("t.json", '[{"sentence": "a", "label": "neg", "label": "pos"}]'),
                                   ("t.json", "duplicate key 'label'")),
    "split over the size cap": Case(split("t.json", GOOD * 100), ("t.json", "byte limit"),
                                    env={"JUMPLORA_MAX_FILE_MB": "0.001"}),
    "jsonl bad line": Case(split("t.jsonl", '{"sentence": "a", "label": "neg"}\n{oops\n'),
                           ("t.jsonl: line 2", "invalid JSON")),
    "unsupported split type": Case(split("t.txt", "x"), ("t.txt", "unsupported")),
    "json int label out of range": Case(split("t.json", [{"sentence": "a", "label": 5}]),
                                        ("t.json: item 0: field 'label' = 5 is out of range for the 2 options",)),
    # paths
    "path leaves the folder": Case(lambda d: stream(d, "../../etc/hostname"), ("outside the stream file's folder",)),
    "absolute path": Case(lambda d: stream(d, "/etc/passwd"), ("'/etc/passwd' is outside",)),
    "symlink out of the folder": Case(_outside_link, ("'link.json' is outside", "--allow-outside-paths")),
    "labels file outside": Case(lambda d: stream(d, labels_file="../labels.json", options=None),
                                ("field 'labels_file' = '../labels.json' is outside",)),
    # CSV and parquet
    "csv wrong field count": Case(split("t.csv", "sentence,label\na,neg,x\n"), ("t.csv: line 2: 3 fields",)),
    "csv missing label column": Case(split("t.csv", "sentence,mood\na,neg\n"),
                                     ("t.csv: line 2: missing field 'label'",)),
    "csv int label out of range": Case(split("t.csv", "sentence,label\na,2\n"),
                                       ("t.csv: line 2", "= 2 is out of range")),
    "csv bad quoting": Case(split("t.csv", 'sentence,label\n"a"b,neg\n'), ("t.csv: line 2: invalid CSV",)),
    "parquet corrupt": Case(split("t.parquet", b"PAR1 not really parquet PAR1"), ("t.parquet", "invalid parquet")),
    # datasets specs
    "datasets extra missing": Case(_no_datasets_extra, ("needs the `datasets` package", "jumplora[datasets]"),
                                   env={"PYTHONPATH": "{dir}/shadow" + os.pathsep + os.environ.get("PYTHONPATH", "")},
                                   process=True),
    "datasets spec bad config": Case(_saved_dataset, ("field 'train': field 'config' = 3 must be a string",)),
    "datasets spec unknown key": Case(lambda d: stream(d, {"dataset": "csv", "split": "train", "file": "x"}),
                                      ("field 'train': unknown key 'file'",)),
    "datasets hub offline": Case(lambda d: stream(d, {"dataset": "glue", "config": "rte", "split": "validation"}),
                                 ("dataset 'glue', config 'rte', split 'validation'", "could not be loaded")),
    # CLI values: refused before anything is read or written (issue 14)
    "lr nan": Case(_bench("--lr", "nan"), ("lr must be a finite number",), process=True),
    "lr inf": Case(_bench("--lr", "inf"), ("lr must be a finite number",)),
    "lr absurd": Case(_bench("--lr", "1e6"), ("lr must be <= 1",)),
    "theta lr negative": Case(_bench("--theta-lr", "-1"), ("theta_lr must be > 0",)),
    "theta lr zero": Case(_bench("--theta-lr", "0"), ("theta_lr must be > 0",)),
    "lora alpha nan": Case(_bench("--lora-alpha", "nan"), ("lora_alpha must be a finite number",)),
    "bandwidth nan": Case(_bench("--bandwidth", "nan"), ("bandwidth must be a finite number",)),
    "strategy arg nan": Case(_bench("--strategy", "ella", "--strategy-arg", "lam=nan"), ("'lam' must be a finite",)),
    "strategy arg unknown": Case(_bench("--strategy", "ella", "--strategy-arg", "lambda=1"),
                                 ("unknown argument 'lambda'", "valid arguments: lam")),
    "strategy arg malformed": Case(_bench("--strategy-arg", "lam"), ("expected NAME=VALUE",)),
    "seed negative": Case(_bench("--seed", "-1"), ("seed must be in [0, 2**32)",)),
    "seed too large": Case(_bench("--seed", "99999999999"), ("seed must be in [0, 2**32)",)),
    "threads negative": Case(_bench("--threads", "-1"), ("--threads must be >= 1",)),
    "max length past the positions": Case(_bench("--max-length", "1000"), ("max_length 1000 exceeds the model's 128",)),
    "unknown tracker": Case(_bench("--report-to", "nosuchtracker"), ("report_to", "nosuchtracker")),
    "stream and tasks": Case(lambda d: [*stream(d), "--tasks", "cb"], ("--stream and --tasks conflict",)),
    "out is a file": Case(lambda d: [*_bench()(d), "--out", str(_write(d / "afile", "x"))], ("is not a directory",),
                          process=True),
    "out below a file": Case(lambda d: [*_bench()(d), "--out", str(_write(d / "f", "x") / "run")],
                             ("is not a directory",)),
    "config file unknown key": Case(lambda d: ["--config", str(_write(d / "c.json", {"optim": {"lrr": 1}}))],
                                    ("c.json", "unknown key optim.'lrr'")),
    "config file not a mapping": Case(lambda d: ["--config", str(_write(d / "c.json", [1, 2]))],
                                      ("c.json", "must be a mapping")),
}  # fmt: skip


def run_cli(args: list[str], out: Path, model: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "jumplora.cli", "run", "--out", str(out), "--threads", "1", "--quiet",
               "--model", model, *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=WALL_TIMEOUT_S, env=env, cwd=cwd)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_in_process(args: list[str], out: Path, model: str, cwd: Path, monkeypatch) -> tuple[int, str, float]:
    """The CLI through typer's runner: (exit code, stderr, CPU seconds); a traceback fails here."""
    import torch
    from typer.testing import CliRunner

    from jumplora.cli import app

    monkeypatch.chdir(cwd)
    threads, start = torch.get_num_threads(), time.process_time()
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--quiet", "--model", model, *args])
    cpu = time.process_time() - start
    torch.set_num_threads(threads)  # --threads must not leak into the rest of the session
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stderr, cpu


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(name: str, tmp_path: Path, tiny_model: str, monkeypatch) -> None:
    case = CASES[name]
    if case.skip:
        pytest.skip(case.skip)
    scratch, out = tmp_path / "in", tmp_path / "out"
    scratch.mkdir()
    args = case.make(scratch)
    extra = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    extra.update({k: v.replace("{dir}", str(scratch)) for k, v in case.env.items()})
    if case.process:
        start = children_cpu_s()
        proc = run_cli(args, out, tiny_model, {**os.environ, **extra}, scratch)
        code, stderr, cpu = proc.returncode, proc.stderr, children_cpu_s() - start
    else:
        for key, value in extra.items():
            monkeypatch.setenv(key, value)
        code, stderr, cpu = run_in_process(args, out, tiny_model, scratch, monkeypatch)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, (code, stderr[-3000:])
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert len(errors[0]) < 600, errors[0]
    for needle in case.needles:
        assert needle in errors[0], (needle, errors[0])
    assert not out.exists(), f"{out} was created for a bad input"
    assert cpu < CPU_BOUND_S, f"took {cpu:.1f} CPU seconds"
