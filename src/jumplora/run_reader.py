"""Read a run directory as ``--resume`` does: the one validated loader for export, report, drift and plots.

A reader that trusts ``results.json`` can be made to print, export or plot something the run never
computed (an edited R, swapped update files, a path out of the run). Every reader therefore goes
through :func:`read_run`, which applies the checks of a resume:

- ``results.json`` is read size-capped, strict (no duplicate keys) and depth-limited, and its schema is
  checked key by key (types, lengths, accuracies in [0, 1], names without control characters);
- when the run has a checkpoint, ``state.json``'s checksum and schema are verified, ``config.json``
  must equal the config it recorded, ``results.json`` must agree with it (config, R, zero-shot row,
  per-task analytics), and every tensor file it names must be a plain file inside ``checkpoint/``
  whose sha256 matches the recorded one (:func:`load_checked_tensors`).

Errors are :class:`~jumplora.checkpoint.RunDirectoryError`, one line naming the file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jumplora.checkpoint import (
    RunDirectoryError,
    _brief,
    _is_acc,
    _read_json,
    _validate_state,
    check_same_config,
    file_sha256,
    first_difference,
    read_hashed_tensors,
    read_state,
)

RESULTS_FILE = "results.json"


@dataclass
class RunRecord:
    """A validated run: its folder, results, and (when it has one) the verified checkpoint state."""

    path: Path
    results: dict[str, Any]
    state: dict[str, Any] | None

    @property
    def updates(self) -> list[str | None]:
        """Each task's update file name (None where a shared adapter's update is folded into a later one)."""
        return list(self.state["updates"]) if self.state else []


def read_run(run_dir: str | Path, *, need_checkpoint: bool = False, complete: bool = True) -> RunRecord:
    """``run_dir`` (or its results.json) validated as described above; RunDirectoryError otherwise."""
    given = Path(run_dir)
    run = given.parent if given.name == RESULTS_FILE else given
    path = run / RESULTS_FILE
    results = _read_json(path, "the run's results")
    _check(_results_problem(results), path)
    if complete and results.get("complete") is not True:
        raise RunDirectoryError(f'{path}: the run is incomplete ("complete" is not true); finish it first')
    has_checkpoint = (run / "checkpoint" / "state.json").exists()
    if need_checkpoint and not has_checkpoint:
        raise RunDirectoryError(f"{run / 'checkpoint' / 'state.json'}: missing; the run kept no checkpoint")
    state = verify_checkpoint(run, results) if has_checkpoint else None
    return RunRecord(run, results, state)


def verify_checkpoint(run: Path, results: dict[str, Any]) -> dict[str, Any]:
    """state.json (checksum, schema, files, hashes) and its agreement with config.json and results.json."""
    from jumplora.config import RESUME_FREE_KEYS

    path = run / "checkpoint" / "state.json"
    state = read_state(run)
    num_tasks = len(results["tasks"])
    try:
        _validate_state(state, num_tasks, [2**62] * num_tasks)
    except (KeyError, TypeError, ValueError) as err:
        raise RunDirectoryError(f"{path}: {err}") from err
    check_same_config(run, state["config"], None, frozenset())
    config = first_difference(state["config"], results["config"], skip=RESUME_FREE_KEYS)
    for key, name in (("rows", "accuracy_matrix"), ("zero_shot", "zero_shot"), ("per_task", "per_task")):
        differs = f"config.{config}" if config else first_difference({name: state[key]}, {name: results.get(name)})
        if differs:
            raise RunDirectoryError(f"{run / RESULTS_FILE}: does not match the checkpoint ({differs}); "
                                    "edited or from another run")  # fmt: skip
    for name, expected in state["hashes"].items():  # every file, as --resume reads them
        path = _confined(run / "checkpoint", name)
        if _sha256(path) != expected:
            raise RunDirectoryError(f"{path}: content does not match the hash in state.json (edited or damaged)")
    return state


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as err:
        raise RunDirectoryError(_unreadable(path, err)) from err


def _unreadable(path: Path, err: OSError) -> str:
    return f"{path}: cannot read it ({err.strerror or err})"


def load_checked_tensors(record: RunRecord, name: str) -> dict[str, Any]:
    """A tensor file the verified state names, read once: its sha256 checked, then the same bytes parsed."""
    if record.state is None or name not in record.state["hashes"]:
        raise RunDirectoryError(f"{record.path / 'checkpoint' / 'state.json'}: names no file {str(name)[:40]}")
    path = _confined(record.path / "checkpoint", name)
    return read_hashed_tensors(path, record.state["hashes"][name], lambda err: _unreadable(path, err))


def _confined(folder: Path, name: str) -> Path:
    """``folder/name`` when it is a plain file name of a regular, non-symlinked file in ``folder``."""
    path = folder / name
    plain = isinstance(name, str) and name == Path(name).name and not name.startswith(".")
    if not plain or path.is_symlink() or (path.exists() and not path.is_file()):
        raise RunDirectoryError(f"{folder / 'state.json'}: file {str(name)[:60]!r} is not a plain file of {folder}")
    if not path.exists():
        raise RunDirectoryError(f"{folder / 'state.json'}: names {name}, which is missing from {folder}")
    return path


def _check(problem: str, path: Path) -> None:
    if problem:
        raise RunDirectoryError(f"{path}: {problem}")


# -- the schema of results.json -------------------------------------------------------------------
def _results_problem(results: Any) -> str:
    """The first problem of a results.json's content, '' when none (absent optional keys are fine)."""
    if not isinstance(results, dict):
        return f"expected a JSON object, got {type(results).__name__}"
    missing = [k for k in ("config", "tasks", "accuracy_matrix") if k not in results]
    if missing:
        return f"missing required key {missing[0]!r}"
    tasks = results["tasks"]
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
        return "field tasks must be a non-empty list of task names"
    for key in ("label", "stream", "runner", *tasks):
        value = results.get(key) if key in ("label", "stream", "runner") else key
        if value is not None and (not isinstance(value, str) or not _printable(value)):
            return f"field {key if key in ('label', 'stream', 'runner') else 'tasks'} holds {_brief(value)} " \
                   "(names must be printable text)"
    return _matrix_problem(results, len(tasks)) or _parts_problem(results, tasks)


def _matrix_problem(results: dict[str, Any], n: int) -> str:
    matrix = results["accuracy_matrix"]
    if not isinstance(matrix, list) or len(matrix) not in (n, 1):
        return f"field accuracy_matrix must hold {n} rows (or 1 for a reference run)"
    for key in ("accuracy_matrix", "rank_accuracy_matrix"):
        rows = results.get(key)
        if rows is None and key != "accuracy_matrix":
            continue
        for i, row in enumerate(rows if isinstance(rows, list) else [None]):
            if not (isinstance(row, list) and len(row) == n and all(map(_is_acc, row))):
                return f"field {key}[{i}] must hold {n} accuracies in [0, 1]"
    for key in ("zero_shot", "rank_zero_shot", "independent"):
        row = results.get(key)
        if row is not None and not (isinstance(row, list) and len(row) == n and all(map(_is_acc, row))):
            return f"field {key} must hold {n} accuracies in [0, 1]"
    return ""


def _parts_problem(results: dict[str, Any], tasks: list[str]) -> str:
    from jumplora.config import PART_TYPES, type_problems

    config = results["config"]
    if not isinstance(config, dict):
        return "field config must be an object"
    flat_names = {k: v for k, v in config.items() if k in ("strategy", "model") and (v is None or isinstance(v, str))}
    wrong = type_problems({k: v for k, v in config.items() if k not in flat_names and k in (*PART_TYPES, "seed",
                                                                                             "runner", "out")})
    if wrong:
        return f"field config.{wrong[0]}"
    per_task = results.get("per_task")
    if per_task is not None and not (isinstance(per_task, list) and all(isinstance(t, dict) for t in per_task)):
        return "field per_task must be a list of objects"
    for key in ("metrics", "rank_metrics"):
        metrics = results.get(key)
        numbers = isinstance(metrics, dict) and all(_is_number(v, finite=False) for v in metrics.values())
        if metrics is not None and not numbers:
            return f"field {key} must map names to numbers (or null)"
    options = results.get("task_options")
    if options is not None and not (isinstance(options, dict) and all(
            isinstance(options.get(t), list) and all(isinstance(o, str) for o in options[t]) for t in tasks)):
        return "field task_options must list each task's options as text"
    if results.get("wall_time_s") is not None and not _is_number(results["wall_time_s"]):
        return "field wall_time_s must be a number"
    return ""


def _printable(text: str) -> bool:
    return text.isprintable()


def _is_number(value: Any, finite: bool = True) -> bool:
    """None or a number (finite unless ``finite`` is False: a metric may be NaN where it is undefined)."""
    if value is None:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and (not finite or math.isfinite(value))


