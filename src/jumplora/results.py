"""The shape of results.json, shared by the runners, the CLI, reports and bench scripts.

Every runner (continual, multitask, independent) writes this one shape; reference runners have one
row in ``accuracy_matrix`` and only ``op`` in ``metrics``.
"""

from __future__ import annotations

from typing import Any, TypedDict

#: Scalar metrics a run may report, in display order; higher is better except ``forgetting``.
METRIC_KEYS: tuple[str, ...] = ("op", "bwt", "fwt", "forgetting", "learning_accuracy")
LOWER_IS_BETTER = frozenset({"forgetting"})


class TaskAnalytics(TypedDict):
    task: str
    density: float
    density_per_module: dict[str, float]
    thresholds: dict[str, float]
    jaccard_with_earlier: list[float]
    jaccard_with_past: float | None


class RunResults(TypedDict):
    complete: bool
    runner: str  # continual | multitask | independent
    label: str  # e.g. "ella+jumplora"
    stream: str  # the stream's name, e.g. "order1" or a custom stream's name
    config: dict[str, Any]
    tasks: list[str]
    task_options: dict[str, list[str]]  # each task's options (absent in runs made before they were recorded)
    tasks_done: int
    accuracy_matrix: list[list[float]]
    zero_shot: list[float] | None
    metrics: dict[str, float | None] | None
    per_task: list[TaskAnalytics]
    overlap_matrix: list[list[float]]
    wall_time_s: float
    precision: dict[str, str]  # requested / mixed_precision (what ran: no | fp16 | bf16) / reason; newer runs
    dropped_eval_items: dict[str, int]
    plots: list[str]
    independent: list[float] | None  # the independent runner's row (FWT against training from scratch)
    # Generative runs: option ranking by likelihood beside exact match (None for encoders).
    rank_accuracy_matrix: list[list[float]] | None
    rank_zero_shot: list[float] | None
    rank_metrics: dict[str, float | None] | None
    # What the run ran on: versions, git commit, device, dtype, threads, world size, effective batch
    # (jumplora.environment.run_environment; absent in runs made before it was recorded).
    environment: dict[str, Any]
    # L: mean gold-answer NLL on task j after task i (lower is better), its standard errors over items,
    # and the metrics on it (jumplora.metrics.cl.nll_metrics). Absent in runs made before L was recorded.
    nll_matrix: list[list[float | None]] | None
    nll_se_matrix: list[list[float | None]] | None
    nll_zero_shot: list[float | None] | None
    nll_se_zero_shot: list[float | None] | None
    nll_metrics: dict[str, float | None] | None
