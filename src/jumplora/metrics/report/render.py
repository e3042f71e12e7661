"""Render :func:`~jumplora.metrics.report.aggregate` rows and runs' matrices: rich tables, markdown, LaTeX,
CSV and JSON (values in %, "mean ± std" over seeds; JSON and CSV keep fractions)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from jumplora.metrics.report.aggregate import (
    SUMMARY_KEYS,
    finite,
    matrix_rows,
    nll_matrix_rows,
    run_label,
    stream_label,
)
from jumplora.results import LOWER_IS_BETTER

#: Columns where the LaTeX table marks the best setting in bold.
BEST_MARKED: tuple[str, ...] = ("op", "bwt", "fwt", "forgetting")
#: Output formats of :func:`format_rows` and :func:`format_matrices`.
FORMATS: tuple[str, ...] = ("table", "markdown", "latex", "csv", "json")


# (column title, metric key, in percent)
_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("OP (%)", "op", True),
    ("BWT (%)", "bwt", True),
    ("FWT (%)", "fwt", True),
    ("Forgetting (%)", "forgetting", True),
    ("Density (%)", "density", True),
    ("Jaccard (%)", "jaccard", True),
    ("Jaccard past (%)", "jaccard_past", True),
    ("Wall time (s)", "wall_time_s", False),
)


def _fmt(row: Mapping[str, Any], key: str, pct: bool) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "—"
    s = 100.0 if pct else 1.0
    digits = 2 if pct else 1
    return f"{mean * s:.{digits}f}" if std is None else f"{mean * s:.{digits}f} ± {std * s:.{digits}f}"


def render_table(rows: Sequence[Mapping[str, Any]], title: str | None = "Continual-learning results") -> Table:
    """Rich table of :func:`aggregate` rows (values in %, "mean ± std", "—" for None)."""
    table = Table(title=title)
    table.add_column("Setting", style="bold")
    table.add_column("n", justify="right")
    for name, _, _ in _COLUMNS:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(escape(str(r["label"])), str(r["n"]), *(_fmt(r, k, p) for _, k, p in _COLUMNS))
    return table


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """GitHub-flavoured markdown table with the same content as :func:`render_table`."""
    header = ["Setting", "n", *(name for name, _, _ in _COLUMNS)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for r in rows:
        cells = [str(r["label"]).replace("|", "\\|"), str(r["n"]), *(_fmt(r, k, p) for _, k, p in _COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- paper formats -----------------------------------------------------------------------------------
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


def latex_escape(text: str) -> str:
    """Text safe inside a LaTeX table cell (labels carry ``_``, ``%``, ``&``, braces...)."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def _best(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    means = [r[f"{key}_mean"] for r in rows if r.get(f"{key}_mean") is not None and not r.get("reference")]
    if not means:
        return None
    return min(means) if key in LOWER_IS_BETTER else max(means)


def _latex_cell(row: Mapping[str, Any], key: str, pct: bool, best: float | None) -> str:
    mean = row.get(f"{key}_mean")
    if mean is None:
        return "--"
    cell = _fmt(row, key, pct).replace(" ± ", r" \pm ")
    bold = (
        key in BEST_MARKED
        and not row.get("reference")
        and best is not None
        and math.isclose(mean, best, rel_tol=0.0, abs_tol=1e-12)
    )
    return f"$\\mathbf{{{cell}}}$" if bold else f"${cell}$"


def to_latex(rows: Sequence[Mapping[str, Any]]) -> str:
    """A booktabs tabular (mean ± std over seeds); the best CL method per CL metric column in bold.

    Reference rows (multitask, independent) are shown but never bolded: they bound the methods.
    """
    best = {k: _best(rows, k) for _, k, _ in _COLUMNS}
    header = ["Setting", "$n$", *(latex_escape(name) for name, _, _ in _COLUMNS)]
    lines = [
        "% requires \\usepackage{booktabs}",
        "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        "\\toprule",
        " & ".join(header) + " \\\\",
        "\\midrule",
    ]
    for r in rows:
        cells = [latex_escape(str(r["label"])), str(r["n"]), *(_latex_cell(r, k, p, best[k]) for _, k, p in _COLUMNS)]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One setting as plain data: label, stream, seeds and (mean, std, n) per metric, as fractions."""
    return {
        "label": row["label"],
        "stream": row.get("stream"),
        "n": row["n"],
        "reference": bool(row.get("reference")),
        "seeds": list(row.get("seeds") or []),
        "run_dirs": list(row.get("run_dirs") or []),
        "config": row.get("config"),
        "metrics": {k: {"mean": row[f"{k}_mean"], "std": row[f"{k}_std"], "n": row[f"{k}_n"]} for k in SUMMARY_KEYS},
    }


def to_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """A JSON list, one object per setting (see :func:`_plain_row`); values are fractions, not %."""
    return json.dumps([_plain_row(r) for r in rows], indent=2, default=str) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per setting: label, stream, n, seeds (``;``-separated), then mean/std/n of every metric."""
    buffer = io.StringIO()
    fields = ["label", "stream", "n", "seeds", *(f"{k}_{s}" for k in SUMMARY_KEYS for s in ("mean", "std", "n"))]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        line = {f"{k}_{s}": r[f"{k}_{s}"] for k in SUMMARY_KEYS for s in ("mean", "std", "n")}
        writer.writerow({**line, "label": r["label"], "stream": r.get("stream"), "n": r["n"],
                         "seeds": ";".join(str(s) for s in r.get("seeds") or [])})  # fmt: skip
    return buffer.getvalue()


def format_rows(rows: Sequence[Mapping[str, Any]], fmt: str) -> str | Table:
    """:func:`aggregate` rows in one of :data:`FORMATS` (a rich Table for ``"table"``)."""
    writers = {"table": render_table, "markdown": to_markdown, "latex": to_latex, "csv": to_csv, "json": to_json}
    if fmt not in writers:
        raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return writers[fmt](rows)


# -- per-run accuracy matrices -----------------------------------------------------------------------
def _csv_text(header: list[str], rows: Iterable[list[Any]]) -> str:
    """One CSV text: a header, then a line per row (the long, tidy form of the matrix renderers)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _acc(v: Any, digits: int = 1) -> str:
    f = finite(v)
    return "—" if f is None else f"{100 * f:.{digits}f}"


def format_matrices(
    results: Sequence[Mapping[str, Any]], fmt: str, width: int | None = None
) -> str | list[Table | Group]:
    """The accuracy matrix R of each run (zero-shot row, then after task i; columns = tasks), in ``fmt``;
    ``width``: the console's, for tables."""
    if fmt == "json":
        data = [
            {"run_dir": r.get("run_dir"), "label": run_label(r), "stream": stream_label(r), "tasks": r["tasks"],
             "rows": [{"row": name, "accuracy": vals} for name, vals in matrix_rows(r)]}
            for r in results
        ]  # fmt: skip
        return json.dumps(data, indent=2) + "\n"
    if fmt == "csv":
        cells = ([r.get("run_dir"), run_label(r), name, task, v]
                 for r in results for name, vals in matrix_rows(r) for task, v in zip(r["tasks"], vals, strict=True))
        return _csv_text(["run_dir", "label", "row", "task", "accuracy"], cells)  # fmt: skip
    if fmt == "table":
        return [matrix_table(r, width=width) for r in results]
    if fmt == "markdown":
        return "\n".join(_matrix_markdown(r) for r in results)
    if fmt == "latex":
        return "\n".join(_matrix_latex(r) for r in results)
    raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")


def matrix_table(results: Mapping[str, Any], title: str | None = None, width: int | None = None) -> Table | Group:
    """R as a rich table. Where task names would not fit ``width`` (15-task streams), columns are numbered,
    cells whole percents and the names a legend below, so that no cell is cut to "…"."""
    tasks, rows = [str(t) for t in results["tasks"]], matrix_rows(results)
    title = escape(title or f"Accuracy (%) — {run_label(results)} — {results.get('run_dir')}")
    corner = "after \\ on"
    label_width = max(len(corner), *(len(name) for name, _ in rows))
    if width is None or label_width + sum(max(len(t), 5) + 3 for t in tasks) + 4 <= width:
        table = Table(title=title)
        table.add_column(corner)
        for task in tasks:
            table.add_column(escape(task), justify="right")
        for name, vals in rows:
            table.add_row(escape(name), *(_acc(v) for v in vals))
        return table
    # The legend goes below, not in the caption: a caption wider than the table widens its columns.
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=0, pad_edge=False)  # the box's blank divides columns
    table.add_column(corner)
    for i in range(1, len(tasks) + 1):
        table.add_column(str(i), justify="right")
    numbered = {f"after {task}": f"after {i}" for i, task in enumerate(tasks, 1)}
    for name, vals in rows:
        table.add_row(escape(numbered.get(name, name)), *(_acc(v, digits=0) for v in vals))
    legend = "  ".join(f"{i}:{task}" for i, task in enumerate(tasks, 1))  # no space: a line break never splits one
    return Group(table, Text(legend))


def _matrix_markdown(results: Mapping[str, Any]) -> str:
    tasks = [str(t).replace("|", "\\|") for t in results["tasks"]]
    lines = [f"### {run_label(results)} ({results.get('run_dir')})", "",
             "| after \\ on | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]  # fmt: skip
    lines += ["| " + " | ".join([name.replace("|", "\\|"), *(_acc(v) for v in vals)]) + " |"
              for name, vals in matrix_rows(results)]  # fmt: skip
    return "\n".join(lines) + "\n"


def _matrix_latex(results: Mapping[str, Any]) -> str:
    lines = [f"% {latex_escape(run_label(results))}", "\\begin{tabular}{l" + "r" * len(results["tasks"]) + "}",
             "\\toprule", " & ".join(["after $\\backslash$ on", *(latex_escape(str(t)) for t in results["tasks"])])
             + " \\\\", "\\midrule"]  # fmt: skip
    lines += [" & ".join([latex_escape(name), *(_acc(v).replace("—", "--") for v in vals)]) + " \\\\"
              for name, vals in matrix_rows(results)]  # fmt: skip
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _nll(value: Any, se: Any = None) -> str:
    v, e = finite(value), finite(se)
    if v is None:
        return "—"
    return f"{v:.3f}" if e is None else f"{v:.3f} ± {e:.3f}"


def format_nll_matrices(results: Sequence[Mapping[str, Any]], fmt: str) -> str | list[Table]:
    """Each run's L (mean gold-answer NLL ± its standard error over items, nats) in ``fmt`` (not latex)."""
    if fmt == "latex":
        raise ValueError("--matrix --nll prints as table, markdown, csv or json")
    if fmt == "json":
        data = [
            {"run_dir": r.get("run_dir"), "label": run_label(r), "tasks": r["tasks"],
             "rows": [{"row": n, "nll": v, "se": e} for n, v, e in nll_matrix_rows(r)]}
            for r in results
        ]  # fmt: skip
        return json.dumps(data, indent=2) + "\n"
    if fmt == "csv":
        cells = ([r.get("run_dir"), run_label(r), name, task, v, e]
                 for r in results for name, vals, errs in nll_matrix_rows(r)
                 for task, v, e in zip(r["tasks"], vals, errs or [None] * len(vals), strict=True))
        return _csv_text(["run_dir", "label", "row", "task", "nll", "se"], cells)  # fmt: skip
    tables, lines = [], []
    for r in results:
        rows = nll_matrix_rows(r)
        title = f"Gold-answer NLL (nats, ± s.e.) — {run_label(r)} — {r.get('run_dir')}"
        if not rows:
            title += " — not recorded (run made before L)"
        cells = [[name, *(_nll(v, e) for v, e in zip(vals, errs or [None] * len(vals), strict=True))]
                 for name, vals, errs in rows]  # fmt: skip
        if fmt == "markdown":
            header = ["| after \\ on | " + " | ".join(map(str, r["tasks"])) + " |", "|---|" + "---:|" * len(r["tasks"])]
            lines += [f"### {title}", "", *header, *("| " + " | ".join(c) + " |" for c in cells), ""]
            continue
        table = Table(title=escape(title))
        table.add_column("after \\ on")
        for task in r["tasks"]:
            table.add_column(escape(str(task)), justify="right")
        for row in cells:
            table.add_row(*map(escape, row))
        tables.append(table)
    return "\n".join(lines) if fmt == "markdown" else tables
