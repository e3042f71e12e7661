"""Find and load finished runs for a report: every run through the one validated reader and schema 2."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


class IncompleteRunError(ValueError):
    """The run has not finished (it is skipped by reports, never averaged)."""


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Load ``run_dir/results.json`` (or a path to the file itself) of a *complete* run.

    Read through ``jumplora.run.directory.read_run``, the loader ``--resume`` and ``export`` share: the
    checks of a resume apply (when the run has a checkpoint, results.json must agree with it and every
    file it names must match its hash), then the shape must be results schema 2
    (:func:`jumplora.results.schema_problem`): older runs are migrated once (bench/migrate_runs.py), never
    read through a fallback. Raises ValueError naming the file (:class:`IncompleteRunError` when the run is
    not marked ``"complete": true``, so partial runs can never be averaged). The returned dict gets a
    ``"run_dir"`` entry for reporting.
    """
    from jumplora.run import directory  # torch and safetensors: only when a run is read

    record = directory.read_run(run_dir, complete=False)  # schema 2 included
    if record.results["complete"] is not True:
        raise IncompleteRunError(f'{record.results_path}: run is incomplete ("complete" is not true)')
    return {**record.results, "run_dir": str(record.path)}


def find_runs(root: str | Path) -> list[Path]:
    """All directories under ``root`` (inclusive) that contain a results.json, sorted."""
    from jumplora.run import directory

    return directory.find_runs(root)


def load_runs(run_dirs: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Load many runs; returns (complete results, [(run_dir, reason), ...] for incomplete ones).

    A damaged run raises ValueError naming its file: a report never silently leaves a run out."""
    ok: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for d in run_dirs:
        try:
            ok.append(load_results(d))
        except IncompleteRunError as e:  # a damaged or edited run is an error, not a skip
            skipped.append((str(d), str(e)))
    return ok, skipped
