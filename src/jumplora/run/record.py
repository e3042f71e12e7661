"""What a run has done so far (``RunState``: progress, supports, overlap, global step, in one place) and
results.json built from it (``build_results``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from jumplora.adapters import MergeResult
from jumplora.metrics import cl_metrics, density, density_per_module, jaccard, nll_metrics
from jumplora.results import SCHEMA_VERSION
from jumplora.run.directory import Progress


@dataclass
class RunState:
    """The run's record: the rows of R and per-task analytics (``progress``, checkpointed), every finished
    task's support and their pairwise overlap, and the optimizer steps taken (``progress.global_step``)."""

    progress: Progress = field(default_factory=Progress)
    supports: list[dict[str, torch.Tensor]] = field(default_factory=list)
    overlap: list[list[float]] = field(default_factory=list)  # Jaccard of the supports, task by task
    started: float = field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0  # wall time of the runs this one resumes

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    @global_step.setter
    def global_step(self, value: int) -> None:
        self.progress.global_step = value

    def resume_from(self, progress: Progress, supports: list[dict[str, torch.Tensor]]) -> None:
        """Continue a checkpointed run: its progress, wall time and supports (overlaps recomputed)."""
        self.progress, self.elapsed_before = progress, progress.wall_time_s
        for support in supports:
            self.add_support(support)

    def wall_time(self) -> float:
        self.progress.wall_time_s = self.elapsed_before + time.perf_counter() - self.started
        return self.progress.wall_time_s

    def add_support(self, support: dict[str, torch.Tensor]) -> None:
        """Keep a finished task's support and its Jaccard overlap with every earlier one (computed once)."""
        self.supports.append(support)
        row = [jaccard(support, other) for other in self.supports]
        for earlier, value in zip(self.overlap, row, strict=False):
            earlier.append(value)
        self.overlap.append(row)

    def task_analytics(self, name: str, support: dict[str, torch.Tensor], thresholds: dict[str, float]) -> dict:
        """A finished task's density, thresholds and overlap with the earlier tasks' supports."""
        past_union: dict[str, torch.Tensor] = {}
        for earlier in self.supports:
            for module, mask in earlier.items():
                past_union[module] = past_union[module] | mask if module in past_union else mask.clone()
        return {
            "task": name,
            "density": density(support),
            "density_per_module": density_per_module(support),
            "thresholds": thresholds,
            "jaccard_with_earlier": [jaccard(support, earlier) for earlier in self.supports],
            "jaccard_with_past": jaccard(support, past_union) if past_union else None,
        }

    def record(self, scores: dict[str, list[float]], zero_shot: bool = False) -> None:
        """One evaluation of every task: a row of R (and of the ranking metric when there is one)."""
        p = self.progress
        nll, nll_se = finite_or_none(scores["gold_nll"]), finite_or_none(scores["gold_nll_se"])
        if zero_shot:
            p.zero_shot, p.rank_zero_shot = scores["accuracy"], scores.get("rank_accuracy")
            p.nll_zero_shot, p.nll_se_zero_shot = nll, nll_se
        else:
            p.rows.append(scores["accuracy"])
            p.nll_rows.append(nll)
            p.nll_se_rows.append(nll_se)
            if "rank_accuracy" in scores:
                p.rank_rows.append(scores["rank_accuracy"])


def build_results(state: RunState, run: dict[str, Any], complete: bool, **override: Any) -> dict[str, Any]:
    """results.json from the state; ``run`` holds what the state does not know (runner, label, stream,
    config, tasks, task_options, precision, dropped_eval_items, environment)."""
    progress, names = state.progress, run["tasks"]
    rows = progress.rows
    results: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "complete": complete,
        "runner": run["runner"],
        "label": run["label"],
        "stream": run["stream"],
        "config": run["config"],
        "tasks": names,
        "task_options": run["task_options"],
        "tasks_done": len(rows),
        "accuracy_matrix": rows,
        "zero_shot": progress.zero_shot,
        "independent": None,
        "metrics": cl_metrics(np.array(rows), progress.zero_shot) if rows and len(rows) == len(names) else None,
        "per_task": progress.per_task,
        "overlap_matrix": state.overlap,
        "wall_time_s": state.wall_time(),
        "precision": run["precision"],
        "dropped_eval_items": run["dropped_eval_items"],
        "rank_accuracy_matrix": progress.rank_rows or None,
        "rank_zero_shot": progress.rank_zero_shot,
        "rank_metrics": cl_metrics(np.array(progress.rank_rows), progress.rank_zero_shot)
        if progress.rank_rows and len(progress.rank_rows) == len(names)
        else None,
        "plots": [],
        "environment": run["environment"],
        **_nll_results(progress, len(names)),
    }
    results.update(override)
    return results


def _nll_results(p: Progress, num_tasks: int) -> dict[str, Any]:
    """L (gold-answer NLL after each task), its standard errors and the metrics computed on it."""
    complete = bool(p.nll_rows) and len(p.nll_rows) == num_tasks
    return {
        "nll_matrix": p.nll_rows or None,
        "nll_se_matrix": p.nll_se_rows or None,
        "nll_zero_shot": p.nll_zero_shot,
        "nll_se_zero_shot": p.nll_se_zero_shot,
        "nll_metrics": nan_to_none(nll_metrics(np.array(p.nll_rows, dtype=float), p.nll_zero_shot))
        if complete
        else None,
    }


def finite_or_none(values: list[float]) -> list[float | None]:
    """JSON has no NaN: a cell without a scorable item is null."""
    return [value if math.isfinite(value) else None for value in values]


def nan_to_none(metrics: dict[str, float | None]) -> dict[str, float | None]:
    return {key: None if value is None or not math.isfinite(value) else value for key, value in metrics.items()}


def update_size(merged: MergeResult | None) -> dict[str, float | int | None]:
    """‖U‖_F over the modules and nnz(U) of the merged update U, for function-space interference
    (jumplora.metrics.interference); None where no update was merged or a sharded merge kept local rows only."""
    if merged is None or merged.sizes is not None or not merged.updates:
        return {"update_norm": None, "kept_entries": None}
    squares = sum(float(update.double().pow(2).sum()) for update in merged.updates.values())
    kept = sum(int(mask.sum()) for mask in merged.supports.values())
    return {"update_norm": math.sqrt(squares), "kept_entries": kept}
