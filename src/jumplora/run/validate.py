"""The values of a run directory, checked: ``state.json``'s schema and checksum, ``results.json``'s schema,
and what "the same configuration" means.

Pure checks on values already read, with no knowledge of where the files are: each raises ValueError
(or returns the problem as text) naming the field, and :mod:`jumplora.run.directory`, which read the
file, puts the file's path in front. Both ``--resume`` and every reader of a finished run (export,
report, drift) go through these same checks.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

FORMAT_VERSION = 4  # 4: state.json records the run's config (config.json must match it)


def state_checksum(state: dict[str, Any]) -> str:
    """sha256 of the state's content (all but the checksum itself), in canonical JSON."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def first_difference(saved: Any, now: Any, path: str = "", skip: frozenset[str] = frozenset()) -> str | None:
    """``field: saved → now`` for the first (dotted) field where two configs differ; None when equal.

    Top-level keys in ``skip`` are ignored; 1 equals 1.0 (a float field may be written either way)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in [*saved, *(k for k in now if k not in saved)]:
            if not path and key in skip:
                continue
            where = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in now:
                return f"{where}: {'absent' if key not in saved else 'set'} → {'absent' if key not in now else 'set'}"
            found = first_difference(saved[key], now[key], where)
            if found:
                return found
        return None
    if isinstance(saved, list | tuple) and isinstance(now, list | tuple) and len(saved) == len(now):
        found = (first_difference(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(saved, now, strict=True)))
        return next((f for f in found if f), None)
    if saved == now and isinstance(saved, bool) == isinstance(now, bool) and type(saved) is not list:
        return None
    return f"{path}: {brief(saved)} → {brief(now)}"


def brief(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line quotes a value, never a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def is_accuracy(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


# -- state.json ----------------------------------------------------------------------------------------
def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_state(state: Any, num_tasks: int, steps_per_task: list[int]) -> None:
    """Every key, type and range of state.json; raises ValueError naming the field.

    ``steps_per_task``: optimizer steps of each task, to check a mid-task checkpoint's position."""
    _expect(isinstance(state, dict), "the checkpoint is not a JSON object")
    _expect(state.get("format") == FORMAT_VERSION, f"unknown checkpoint format {str(state.get('format'))[:20]}")
    n = state["next_task"]
    _expect(type(n) is int and 0 <= n <= num_tasks, f"field next_task must be in [0, {num_tasks}], got {str(n)[:20]}")
    rows, zero_shot = state["rows"], state["zero_shot"]
    _expect(isinstance(zero_shot, list) and len(zero_shot) == num_tasks and all(map(is_accuracy, zero_shot)),
            f"field zero_shot must hold {num_tasks} accuracies")  # fmt: skip
    _expect(isinstance(rows, list) and len(rows) == n, f"field rows must hold next_task={n} rows")
    for i, row in enumerate(rows):
        _expect(isinstance(row, list) and len(row) == num_tasks and all(map(is_accuracy, row)),
                f"field rows[{i}] must hold {num_tasks} accuracies in [0, 1]")  # fmt: skip
    if state["rank_rows"]:
        _expect(len(state["rank_rows"]) == n and all(isinstance(r, list) and len(r) == num_tasks and
                                                      all(map(is_accuracy, r)) for r in state["rank_rows"]),
                f"field rank_rows must hold next_task={n} rows of {num_tasks} accuracies")  # fmt: skip
    for key in ("per_task", "updates", "supports"):
        _expect(isinstance(state[key], list) and len(state[key]) == n, f"field {key} must have next_task={n} entries")
    _expect(type(state["global_step"]) is int and state["global_step"] >= 0, "field global_step must be an int >= 0")
    _expect(isinstance(state["wall_time_s"], (int, float)), "field wall_time_s must be a number")
    _expect(isinstance(state["fingerprint"], dict), "field fingerprint must be an object")
    _expect(isinstance(state["config"], dict), "field config must be an object")
    hashes = state["hashes"]
    _expect(isinstance(hashes, dict), "field hashes must be an object")
    named = [*state["updates"], *state["supports"], state["strategy"], state["adapter"]]
    if state["partial"] is not None:
        named.append(_validate_partial(state["partial"], n, steps_per_task))
    for name in named:
        _expect(name is None or (isinstance(name, str) and name in hashes and "/" not in name),
                f"file {str(name)[:40]} has no hash in field hashes")  # fmt: skip
    _expect(all(name is not None for name in state["supports"]), "field supports has an empty entry")


def _validate_partial(partial: Any, next_task: int, steps_per_task: list[int]) -> str:
    _expect(isinstance(partial, dict), "field partial must be an object")
    task, step = partial["task"], partial["step"]
    _expect(type(task) is int and task == next_task, f"field partial.task must be next_task={next_task}")
    limit = steps_per_task[task] if task < len(steps_per_task) else 0
    _expect(type(step) is int and 0 < step < limit, f"field partial.step must be in (0, {limit}), got {str(step)[:20]}")
    for key in ("epoch", "micro", "global_step"):
        _expect(type(partial[key]) is int and partial[key] >= 0, f"field partial.{key} must be an int >= 0")
    return partial["file"]


# -- results.json ----------------------------------------------------------------------------------------
def results_problem(results: Any) -> str:
    """The first problem of a results.json's content, '' when none: results schema 2 (every field present,
    the nested config; jumplora.results.schema_problem), then each value's type and shape."""
    from jumplora.results import schema_problem

    if not isinstance(results, dict):
        return f"expected a JSON object, got {type(results).__name__}"
    schema = schema_problem(results)
    if schema:
        return schema
    tasks = results["tasks"]
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
        return "field tasks must be a non-empty list of task names"
    for key in ("label", "stream", "runner", *tasks):
        value = results.get(key) if key in ("label", "stream", "runner") else key
        if value is not None and (not isinstance(value, str) or not value.isprintable()):
            return (
                f"field {key if key in ('label', 'stream', 'runner') else 'tasks'} holds {brief(value)} "
                "(names must be printable text)"
            )
    return _matrix_problem(results, len(tasks)) or _parts_problem(results, tasks)


def _matrix_problem(results: dict[str, Any], n: int) -> str:
    matrix = results["accuracy_matrix"]
    if results.get("complete") is not True:  # a stopped or running run: the rows of the tasks done so far
        if not isinstance(matrix, list) or len(matrix) > n:
            return f"field accuracy_matrix must hold at most {n} rows"
    elif not isinstance(matrix, list) or len(matrix) not in (n, 1):
        return f"field accuracy_matrix must hold {n} rows (or 1 for a reference run)"
    for key in ("accuracy_matrix", "rank_accuracy_matrix"):
        rows = results.get(key)
        if rows is None and key != "accuracy_matrix":
            continue
        for i, row in enumerate(rows if isinstance(rows, list) else [None]):
            if not (isinstance(row, list) and len(row) == n and all(map(is_accuracy, row))):
                return f"field {key}[{i}] must hold {n} accuracies in [0, 1]"
    for key in ("zero_shot", "rank_zero_shot", "independent"):
        row = results.get(key)
        if row is not None and not (isinstance(row, list) and len(row) == n and all(map(is_accuracy, row))):
            return f"field {key} must hold {n} accuracies in [0, 1]"
    return ""


def _parts_problem(results: dict[str, Any], tasks: list[str]) -> str:
    from jumplora.config import PART_TYPES, type_problems

    config = results["config"]
    if not isinstance(config, dict):
        return "field config must be an object"
    wrong = type_problems({k: v for k, v in config.items() if k in (*PART_TYPES, "seed", "runner", "out")})
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
    if options is not None and not (
        isinstance(options, dict)
        and all(isinstance(options.get(t), list) and all(isinstance(o, str) for o in options[t]) for t in tasks)
    ):
        return "field task_options must list each task's options as text"
    if results.get("wall_time_s") is not None and not _is_number(results["wall_time_s"]):
        return "field wall_time_s must be a number"
    return ""


def _is_number(value: Any, finite: bool = True) -> bool:
    """None or a number (finite unless ``finite`` is False: a metric may be NaN where it is undefined)."""
    if value is None:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and (not finite or math.isfinite(value))
