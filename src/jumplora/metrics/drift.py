"""Where forgotten answers go (reads a run written with ``--save-predictions``).

BWT says how many answers to an old task went wrong, not what they became. A generative model can
forget by answering old inputs with the newest task's labels or with text that is no option at all; an
option ranker (MiniLM) can only pick a wrong option. Each answer to an earlier task is put in one kind,
checked in this order:

- ``correct``;
- ``own_option``: another of the task's own options (a confusion inside the task);
- ``newest_task``: an option of the task trained last (drift towards the newest labels);
- ``other_task``: an option of another task of the stream;
- ``no_option``: anything else (free text, a truncated or empty answer).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from jumplora.models.base import normalize_answer
from jumplora.run.directory import predictions_file

KINDS: tuple[str, ...] = ("correct", "own_option", "newest_task", "other_task", "no_option")


class NoPredictions(ValueError):
    """The run has no answers to sort (no saved predictions, a reference run, an old run without options):
    a reader of many runs skips it with a note; a damaged file is a different, fatal error."""


def prediction_keys(results: dict[str, Any]) -> tuple[str, ...]:
    """The answers a run saved: generated (or ranked, for encoders) and, for generative runs, ranked."""
    return ("prediction", "rank_prediction") if results.get("rank_accuracy_matrix") else ("prediction",)


def answer_kind(record: dict[str, Any], key: str, own: set[str], newest: set[str], stream: set[str]) -> str:
    """The kind of one answer; ``key`` is ``prediction`` (generation) or ``rank_prediction``."""
    if record[key.replace("prediction", "correct")]:
        return "correct"
    answer = normalize_answer(record[key])
    if answer in own:
        return "own_option"
    if answer in newest:
        return "newest_task"
    return "other_task" if answer in stream else "no_option"


def answer_drift(run_dir: str | Path, key: str = "prediction") -> list[dict[str, Any]]:
    """One row per evaluation after task i (i ≥ 1) and earlier task j < i: item count and share of each kind.

    Raises NoPredictions naming the file when the run has no saved predictions or no task options.
    """
    from jumplora.config import REFERENCE_RUNNERS
    from jumplora.run.directory import read_run

    record = read_run(run_dir, complete=False)  # the loader --resume and export use
    run, results = record.path, record.results
    if results["runner"] in REFERENCE_RUNNERS:
        raise NoPredictions(f"{record.results_path}: a {results['runner']} run has no earlier tasks to drift from")
    options = results.get("task_options")
    if not options:
        raise NoPredictions(f"{record.results_path}: no task_options (a run made before they were recorded)")
    tasks = results["tasks"]
    normal = {task: {normalize_answer(o) for o in options[task]} for task in tasks}
    stream = set().union(*normal.values())
    rows = []
    for i, newest in enumerate(tasks[1:], start=1):
        path = predictions_file(run, i + 1, f"after {newest}")
        if not path.is_file():
            raise NoPredictions(f"{path}: missing (run with --save-predictions)")
        records = read_predictions(path, key)
        for old in tasks[:i]:
            mine = [r for r in records if r["task"] == old]
            if not mine or key not in mine[0]:
                raise ValueError(f"{path}: no {key!r} for task {old}")
            counts = Counter(answer_kind(r, key, normal[old], normal[newest], stream) for r in mine)
            rows.append({"after": newest, "task": old, "n": len(mine), **{k: counts[k] / len(mine) for k in KINDS}})
    return rows


def read_predictions(path: Path, key: str) -> list[dict[str, Any]]:
    """Every line of a predictions file, checked: a damaged line is an error, never skipped (the files are
    written whole, atomically, so a bad line means damage, and skipping it would change the shares)."""
    from jumplora.data.safe import DataError, decode_utf8, read_bytes
    from jumplora.run.directory import RunDirectoryError

    try:
        lines = decode_utf8(read_bytes(path, "saved predictions"), path, "saved predictions").splitlines()
    except DataError as err:
        raise RunDirectoryError(str(err)) from err
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        correct = key.replace("prediction", "correct")
        if not (isinstance(record, dict) and isinstance(record.get("task"), str) and isinstance(record.get(key), str)
                and isinstance(record.get(correct), bool)):  # fmt: skip
            raise RunDirectoryError(f"{path}: line {number} is damaged (not a record with task, {key}, {correct})")
        records.append(record)
    return records


def final_drift(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Shares over every earlier task's items at the last evaluation (item-weighted)."""
    last = [r for r in rows if r["after"] == rows[-1]["after"]] if rows else []
    total = sum(r["n"] for r in last)
    return {k: sum(r[k] * r["n"] for r in last) / total for k in KINDS} if total else {}
