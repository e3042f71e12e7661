"""Metrics for continual-learning runs: CL scores, support overlap, plots and reports.

The plotting functions load matplotlib on first use (``jumplora.metrics.plot_*`` or
``jumplora.metrics.plots``), so training and reporting never pay for it unless they draw; the report
helpers load rich on first use (``jumplora.metrics.aggregate`` or ``jumplora.metrics.report``), so
training, which imports this package for density and overlap, never pays for it.
"""

from typing import Any

from jumplora.metrics.cl import (
    average_accuracy,
    bwt,
    cl_metrics,
    forgetting,
    fwt,
    fwt_vs_independent,
    learning_accuracy,
    nll_metrics,
)
from jumplora.metrics.overlap import density, density_per_module, jaccard, overlap_matrix, support_size

#: Report helpers, imported on first use (``jumplora.metrics.aggregate``...): the report package renders
#: with rich, which training never needs (the engine imports this package for density and overlap).
_REPORT_NAMES = frozenset(
    {"IGNORED_CONFIG_KEYS", "aggregate", "find_runs", "load_results", "load_runs", "render_table", "setting_key",
     "setting_label", "to_markdown"}
)  # fmt: skip

__all__ = [
    "IGNORED_CONFIG_KEYS",
    "aggregate",
    "average_accuracy",
    "bwt",
    "cl_metrics",
    "density",
    "density_per_module",
    "find_runs",
    "forgetting",
    "fwt",
    "fwt_vs_independent",
    "jaccard",
    "learning_accuracy",
    "load_results",
    "load_runs",
    "nll_metrics",
    "overlap_matrix",
    "plot_accuracy_curves",
    "plot_accuracy_heatmap",
    "plot_bars",
    "plot_comparison",
    "plot_density",
    "plot_frontier",
    "plot_nll_heatmap",
    "plot_overlap",
    "plot_run_figures",
    "plot_training_curves",
    "render_table",
    "setting_key",
    "setting_label",
    "support_size",
    "to_markdown",
]


def __getattr__(name: str) -> Any:
    if name.startswith("plot_") or name == "write_run_plots":
        from jumplora.metrics import plots

        return getattr(plots, name)
    if name in _REPORT_NAMES:
        from jumplora.metrics import report

        return getattr(report, name)
    raise AttributeError(f"module 'jumplora.metrics' has no attribute {name!r}")
