"""Reports over finished runs: :mod:`.load` (validated, schema 2) · :mod:`.aggregate` (mean ± std over
seeds per setting, labels) · :mod:`.render` (rich tables, markdown, LaTeX, CSV, JSON).

Runs are grouped by *setting*: the config with the per-run keys (seed, output paths, resume flags —
see :data:`IGNORED_CONFIG_KEYS`) removed. Incomplete runs are never averaged; :func:`load_runs` reports
them as skipped. Only :mod:`.render` imports rich.
"""

from jumplora.metrics.report.aggregate import (
    IGNORED_CONFIG_KEYS,
    REFERENCE_RUNNERS,
    SUMMARY_KEYS,
    aggregate,
    is_reference,
    matrix_rows,
    nll_matrix_rows,
    run_label,
    setting_key,
    setting_label,
    stream_label,
)
from jumplora.metrics.report.load import IncompleteRunError, find_runs, load_results, load_runs
from jumplora.metrics.report.render import (
    FORMATS,
    format_matrices,
    format_nll_matrices,
    format_rows,
    latex_escape,
    matrix_table,
    render_table,
    to_csv,
    to_json,
    to_latex,
    to_markdown,
)

__all__ = [
    "FORMATS",
    "IGNORED_CONFIG_KEYS",
    "REFERENCE_RUNNERS",
    "SUMMARY_KEYS",
    "IncompleteRunError",
    "aggregate",
    "find_runs",
    "format_matrices",
    "format_nll_matrices",
    "format_rows",
    "is_reference",
    "latex_escape",
    "load_results",
    "load_runs",
    "matrix_rows",
    "matrix_table",
    "nll_matrix_rows",
    "render_table",
    "run_label",
    "setting_key",
    "setting_label",
    "stream_label",
    "to_csv",
    "to_json",
    "to_latex",
    "to_markdown",
]
