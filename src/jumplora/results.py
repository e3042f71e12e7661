"""The shape of results.json (schema 2), shared by the runners, the CLI, reports and bench scripts.

Every runner (continual, multitask, independent) writes this one shape; reference runners have one
row in ``accuracy_matrix`` and only ``op`` in ``metrics``. Schema 2 holds every field of
:class:`RunResults` (None where a run did not record it) and the nested config (one section per
part: stream, model, adapter, optim, strategy). Runs written before it were migrated once
(bench/migrate_runs.py), so :func:`schema_problem` is the only shape a reader has to know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

#: The results.json generation readers accept; bench/migrate_runs.py brings older runs to it.
SCHEMA_VERSION = 2
#: The CL metrics in results' ``metrics`` (jumplora.metrics.cl.cl_metrics), in display order.
METRIC_KEYS: tuple[str, ...] = ("op", "bwt", "fwt", "fwt_vs_independent", "forgetting", "learning_accuracy")
#: Metrics where a lower value is better (the rest: higher is better).
LOWER_IS_BETTER = frozenset({"forgetting"})
#: The nested config's sections: each a JSON object.
CONFIG_SECTIONS: tuple[str, ...] = ("stream", "model", "adapter", "optim", "strategy")


class TaskAnalytics(TypedDict):
    task: str
    density: float
    density_per_module: dict[str, float]
    thresholds: dict[str, float]
    jaccard_with_earlier: list[float]
    jaccard_with_past: float | None
    # ‖U‖_F and nnz(U) of the merged update (jumplora.metrics.interference); absent in runs made before
    # they were recorded, None where no update was merged.
    update_norm: NotRequired[float | None]
    kept_entries: NotRequired[int | None]


class RunResults(TypedDict):
    schema: int  # SCHEMA_VERSION
    complete: bool
    runner: str  # continual | multitask | independent
    label: str  # e.g. "ella+jumplora"
    stream: str  # the stream's name, e.g. "order1" or a custom stream's name
    config: dict[str, Any]  # nested: top-level run settings plus CONFIG_SECTIONS
    tasks: list[str]
    task_options: dict[str, list[str]] | None  # each task's options (None: not recorded by the run)
    tasks_done: int
    accuracy_matrix: list[list[float]]
    zero_shot: list[float] | None
    metrics: dict[str, float | None] | None
    per_task: list[TaskAnalytics]
    overlap_matrix: list[list[float]]
    wall_time_s: float
    precision: dict[str, str] | None  # requested / mixed_precision (what ran: no | fp16 | bf16) / reason
    dropped_eval_items: dict[str, int]
    plots: list[str]
    independent: list[float] | None  # the independent runner's row (FWT against training from scratch)
    # Generative runs: option ranking by likelihood beside exact match (None for encoders).
    rank_accuracy_matrix: list[list[float]] | None
    rank_zero_shot: list[float] | None
    rank_metrics: dict[str, float | None] | None
    # What the run ran on: versions, git commit, device, dtype, threads, world size, effective batch
    # (jumplora.environment.run_environment; None: not recorded by the run).
    environment: dict[str, Any] | None
    # L: mean gold-answer NLL on task j after task i (lower is better), its standard errors over items,
    # and the metrics on it (jumplora.metrics.cl.nll_metrics). None where the run did not record L.
    nll_matrix: list[list[float | None]] | None
    nll_se_matrix: list[list[float | None]] | None
    nll_zero_shot: list[float | None] | None
    nll_se_zero_shot: list[float | None] | None
    nll_metrics: dict[str, float | None] | None


#: Every field of schema 2, in the order the migration writes them.
RESULTS_FIELDS: tuple[str, ...] = tuple(RunResults.__annotations__)


def schema_problem(results: Mapping[str, Any]) -> str:
    """Why ``results`` is not schema 2 ('' when it is): a wrong ``schema``, a missing field, a flat config.

    The runners write it (jumplora.run.record.build_results); every committed run was migrated to it once
    (bench/migrate_runs.py).
    """
    if "schema" not in results:
        return (f"missing field 'schema' (a results.json older than schema {SCHEMA_VERSION}: "
                "python bench/migrate_runs.py RUN_DIR)")  # fmt: skip
    version = results["schema"]
    if version != SCHEMA_VERSION:
        return f"field schema is {str(version)[:20]!r}, this jumplora reads schema {SCHEMA_VERSION}"
    missing = [key for key in RESULTS_FIELDS if key != "schema" and key not in results]
    if missing:
        return (f"missing field {missing[0]!r} (a results.json older than schema {SCHEMA_VERSION}: "
                "python bench/migrate_runs.py RUN_DIR)")  # fmt: skip
    config = results["config"]
    if not isinstance(config, Mapping):
        return "field config must be an object"
    flat = [key for key in CONFIG_SECTIONS if not isinstance(config.get(key), Mapping)]
    if flat:
        return f"field config.{flat[0]} must be a mapping (the nested config of schema {SCHEMA_VERSION})"
    return ""
