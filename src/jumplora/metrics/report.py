"""Aggregate finished runs (``results.json``) into mean ± std tables over seeds.

Runs are grouped by *setting*: the config with the per-run keys (seed, output paths,
resume flags — see :data:`IGNORED_CONFIG_KEYS`) removed. Incomplete runs are never
averaged; :func:`load_runs` reports them as skipped.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from jumplora.environment import environment_differences
from jumplora.metrics.cl import cl_metrics

__all__ = [
    "CL_METRIC_KEYS",
    "FORMATS",
    "IGNORED_CONFIG_KEYS",
    "METRIC_KEYS",
    "aggregate",
    "find_runs",
    "format_matrices",
    "format_rows",
    "latex_escape",
    "load_results",
    "load_runs",
    "matrix_rows",
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

RESULTS_FILE = "results.json"

#: Config keys that differ between runs of the same setting and are therefore ignored by
#: :func:`setting_key` (at any nesting level): the seed, output/log/checkpoint/cache paths,
#: resume flags, run names and device placement.
IGNORED_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "seed",
        "out",
        "out_dir",
        "output_dir",
        "run_dir",
        "log_dir",
        "logging_dir",
        "save_dir",
        "checkpoint_dir",
        "ckpt_dir",
        "cache_dir",
        "resume",
        "resume_from",
        "resume_from_checkpoint",
        "run_name",
        "run_id",
        "device",
        "wandb_run",
        "wandb_dir",
        # output-only flags: what a run writes, not what it computes
        "cpu",
        "save_predictions",
        "plots",
        "log_every",
        "checkpoint_every",
        "report_to",
    }
)

#: CL metrics read from results' ``metrics`` (recomputed from R when absent).
CL_METRIC_KEYS: tuple[str, ...] = ("op", "bwt", "fwt", "fwt_vs_independent", "forgetting", "learning_accuracy")
#: Aggregated quantities; each row gets ``{key}_mean``, ``{key}_std`` and ``{key}_n``.
METRIC_KEYS: tuple[str, ...] = (*CL_METRIC_KEYS, "density", "jaccard", "jaccard_past", "wall_time_s")
#: Metrics where a lower value is better (the rest of the bolded CL metrics: higher is better).
LOWER_IS_BETTER: frozenset[str] = frozenset({"forgetting"})
#: Columns where the LaTeX table marks the best setting in bold.
BEST_MARKED: tuple[str, ...] = ("op", "bwt", "fwt", "forgetting")
#: Runners (or strategy names, in older results) of reference rows: never marked best.
REFERENCE_RUNNERS: frozenset[str] = frozenset({"multitask", "independent"})
#: Output formats of :func:`format_rows` and :func:`format_matrices`.
FORMATS: tuple[str, ...] = ("table", "markdown", "latex", "csv", "json")

_REQUIRED = ("config", "tasks", "accuracy_matrix")


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Load ``run_dir/results.json`` (or a path to the file itself) of a *complete* run.

    Read through ``jumplora.run.directory.read_run``, the loader ``--resume`` and ``export`` share: the
    schema is checked and, when the run has a checkpoint, results.json must agree with it and every
    file it names must match its hash. Raises ValueError naming the file (:class:`IncompleteRunError`
    when the run is not marked ``"complete": true``, so partial runs can never be averaged).
    The returned dict gets a ``"run_dir"`` entry for reporting.
    """
    from jumplora.run.directory import read_run

    record = read_run(run_dir, complete=False)
    if record.results.get("complete") is not True:
        raise IncompleteRunError(f'{record.path / RESULTS_FILE}: run is incomplete ("complete" is not true)')
    return {**record.results, "run_dir": str(record.path)}


class IncompleteRunError(ValueError):
    """The run has not finished (it is skipped by reports, never averaged)."""


def find_runs(root: str | Path) -> list[Path]:
    """All directories under ``root`` (inclusive) that contain a results.json, sorted."""
    return sorted({f.parent for f in Path(root).rglob(RESULTS_FILE)})


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


def _strip(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _strip(v) for k, v in obj.items() if k not in IGNORED_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    return obj


def setting_key(config: Mapping[str, Any]) -> str:
    """Canonical string of the config minus :data:`IGNORED_CONFIG_KEYS` (recursively).

    Two runs with equal keys are seeds of the same setting.
    """
    return json.dumps(_strip(config), sort_keys=True, default=str)


def stream_label(results: Mapping[str, Any]) -> str:
    """The stream's name: results' ``stream``, else (older results) the config's stream, file, tasks or order."""
    if isinstance(results.get("stream"), str):
        return results["stream"]
    config = results.get("config") or {}
    stream = config.get("stream")
    if isinstance(stream, Mapping):
        config = stream  # the nested config keeps the stream's fields in their own section
        if stream.get("name"):
            return str(stream["name"])
    if config.get("stream_file"):
        return Path(str(config["stream_file"])).stem
    if config.get("tasks"):
        return ",".join(map(str, config["tasks"]))
    return f"order{config['order']}" if config.get("order") is not None else "?"


def setting_label(config: Mapping[str, Any], stream: str | None = None) -> str:
    """Short human label, e.g. ``"inclora+jumplora / order1"``; ``stream`` defaults to the config's."""
    strategy, adapter = config.get("strategy", "?"), config.get("adapter")
    label = str(strategy.get("name", "?") if isinstance(strategy, Mapping) else strategy)
    if config.get("runner") in ("multitask", "independent"):  # reference rows have no strategy
        label = str(config["runner"])
    elif adapter.get("sparse") if isinstance(adapter, Mapping) else config.get("jumplora"):
        label += "+jumplora"
    if isinstance(adapter, Mapping) and adapter.get("merge_mask", "gate") != "gate":  # a mechanism-study control
        label += f"+mask-{adapter['merge_mask']}"
    elif isinstance(adapter, Mapping) and adapter.get("norm_match"):
        label += "+norm-match"
    return f"{label} / {stream or stream_label({'config': config})}"


def matrix_rows(results: Mapping[str, Any]) -> list[tuple[str, list[float | None]]]:
    """R with row labels: the zero-shot row, then "after <task>" (one "final" row for reference runners)."""
    names = list(results.get("tasks") or [])
    matrix = list(results.get("accuracy_matrix") or [])
    rows: list[tuple[str, list[float | None]]] = []
    if results.get("zero_shot"):
        rows.append(("zero-shot", list(results["zero_shot"])))
    if len(matrix) == len(names):
        rows += [(f"after {name}", list(row)) for name, row in zip(names, matrix, strict=True)]
    else:
        rows += [(str(results.get("runner") or "final"), list(row)) for row in matrix]
    return rows


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _mean(vals: Iterable[Any]) -> float | None:
    xs = [x for x in (_finite(v) for v in vals) if x is not None]
    return float(np.mean(xs)) if xs else None


def _run_values(res: Mapping[str, Any]) -> dict[str, float | None]:
    """Per-run scalars; CL metrics are recomputed from the matrix when ``metrics`` is absent."""
    metrics = res.get("metrics")
    if not isinstance(metrics, Mapping):
        metrics = cl_metrics(res["accuracy_matrix"], res.get("zero_shot"), res.get("independent"))
    per_task = res.get("per_task") or []
    out: dict[str, float | None] = {k: _finite(metrics.get(k)) for k in CL_METRIC_KEYS}
    out["density"] = _mean(t.get("density") for t in per_task)
    out["jaccard"] = _mean(j for t in per_task for j in (t.get("jaccard_with_earlier") or []))
    out["jaccard_past"] = _mean(t.get("jaccard_with_past") for t in per_task)
    out["wall_time_s"] = _finite(res.get("wall_time_s"))
    return out


def aggregate(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group complete runs by :func:`setting_key` and world size; mean and sample std over seeds.

    Results not marked complete are skipped. For each metric the mean/std are taken over
    the seeds where it is defined (``{key}_n`` counts them); ``None`` if no seed has it,
    e.g. density for dense runs; the std is None for a single value. Runs with another number of
    processes are another setting; ``environment_differs`` lists what else differs among pooled runs.
    Rows are sorted by label.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        if r.get("complete") is not True:
            continue
        groups.setdefault(setting_key(r["config"]) + _world_suffix(r), []).append(r)

    rows: list[dict[str, Any]] = []
    for key, runs in groups.items():
        cfg = runs[0]["config"]
        row: dict[str, Any] = {
            "setting": key,
            "label": setting_label(cfg, stream_label(runs[0])) + _world_suffix(runs[0]),
            "stream": stream_label(runs[0]),
            "reference": _is_reference(runs[0]),
            "config": _strip(cfg),
            "n": len(runs),
            "seeds": [r["config"].get("seed") for r in runs],
            "tasks": list(runs[0].get("tasks") or []),
            "run_dirs": [r.get("run_dir") for r in runs],
            "environment_differs": environment_differences([r.get("environment") for r in runs]),
        }
        per_run = [_run_values(r) for r in runs]
        for m in METRIC_KEYS:
            xs = [v[m] for v in per_run if v[m] is not None]
            row[f"{m}_mean"] = float(np.mean(xs)) if xs else None
            row[f"{m}_std"] = float(np.std(xs, ddof=1)) if len(xs) > 1 else None  # sample std
            row[f"{m}_n"] = len(xs)
        rows.append(row)

    _disambiguate(rows)
    rows.sort(key=lambda r: (r["label"], r["setting"]))
    return rows


def _world_suffix(results: Mapping[str, Any]) -> str:
    """Part of the grouping key: a 2-process run is not another seed of a 1-process run."""
    world = (results.get("environment") or {}).get("world_size")
    return f" world_size={world}" if world not in (None, 1) else ""


def _disambiguate(rows: list[dict[str, Any]]) -> None:
    """Append the differing config keys to labels that would otherwise collide."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = sorted({k for r in same for k in r["config"]})
        diff = [
            k
            for k in keys
            if len({json.dumps(r["config"].get(k), sort_keys=True, default=str) for r in same}) > 1
        ]
        for r in same:
            r["label"] += " [" + ", ".join(f"{k}={r['config'].get(k)}" for k in diff) + "]"


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


def render_table(
    rows: Sequence[Mapping[str, Any]], title: str | None = "Continual-learning results"
) -> Table:
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


def _is_reference(results: Mapping[str, Any]) -> bool:
    """Multitask / independent rows are bounds to compare against, not competitors for the bold best."""
    strategy = (results.get("config") or {}).get("strategy")
    name = strategy.get("name") if isinstance(strategy, Mapping) else strategy
    return results.get("runner", name) in REFERENCE_RUNNERS or name in REFERENCE_RUNNERS


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
        "metrics": {k: {"mean": row[f"{k}_mean"], "std": row[f"{k}_std"], "n": row[f"{k}_n"]} for k in METRIC_KEYS},
    }


def to_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """A JSON list, one object per setting (see :func:`_plain_row`); values are fractions, not %."""
    return json.dumps([_plain_row(r) for r in rows], indent=2, default=str) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per setting: label, stream, n, seeds (``;``-separated), then mean/std/n of every metric."""
    buffer = io.StringIO()
    fields = ["label", "stream", "n", "seeds", *(f"{k}_{s}" for k in METRIC_KEYS for s in ("mean", "std", "n"))]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        line = {f"{k}_{s}": r[f"{k}_{s}"] for k in METRIC_KEYS for s in ("mean", "std", "n")}
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
def run_label(results: Mapping[str, Any]) -> str:
    """``setting label (seed s)``: names one run among the seeds of its setting."""
    seed = _find_seed(results.get("config") or {})
    return setting_label(results.get("config") or {}, stream_label(results)) + (
        f" (seed {seed})" if seed is not None else ""
    )


def _find_seed(config: Mapping[str, Any]) -> Any:
    if "seed" in config:
        return config["seed"]
    return next((v["seed"] for v in config.values() if isinstance(v, Mapping) and "seed" in v), None)


def _acc(v: Any, digits: int = 1) -> str:
    f = _finite(v)
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
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["run_dir", "label", "row", "task", "accuracy"])
        for r in results:
            for name, vals in matrix_rows(r):
                cells = zip(r["tasks"], vals, strict=True)
                writer.writerows([r.get("run_dir"), run_label(r), name, task, v] for task, v in cells)
        return buffer.getvalue()
    if fmt == "table":
        return [matrix_table(r, width=width) for r in results]
    if fmt == "markdown":
        return "\n".join(_matrix_markdown(r) for r in results)
    if fmt == "latex":
        return "\n".join(_matrix_latex(r) for r in results)
    raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")


def matrix_table(
    results: Mapping[str, Any], title: str | None = None, width: int | None = None
) -> Table | Group:
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


# -- per-run gold-answer NLL matrices (L) --------------------------------------------------------------
def nll_matrix_rows(results: Mapping[str, Any]) -> list[tuple[str, list[float | None], list[float | None]]]:
    """L with its standard errors and row labels (zero-shot, then "after <task>"); empty for runs without L."""
    names = list(results.get("tasks") or [])
    matrix, errors = list(results.get("nll_matrix") or []), list(results.get("nll_se_matrix") or [])
    rows: list[tuple[str, list[float | None], list[float | None]]] = []
    if not matrix:
        return rows
    if results.get("nll_zero_shot"):
        rows.append(("zero-shot", list(results["nll_zero_shot"]), list(results.get("nll_se_zero_shot") or [])))
    labels = [f"after {name}" for name in names] if len(matrix) == len(names) else [str(results.get("runner"))]
    for label, row, se in zip(labels, matrix, errors or [[None] * len(names)] * len(matrix), strict=False):
        rows.append((label, list(row), list(se)))
    return rows


def _nll(value: Any, se: Any = None) -> str:
    v, e = _finite(value), _finite(se)
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
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["run_dir", "label", "row", "task", "nll", "se"])
        for r in results:
            for name, vals, errs in nll_matrix_rows(r):
                for task, v, e in zip(r["tasks"], vals, errs or [None] * len(vals), strict=True):
                    writer.writerow([r.get("run_dir"), run_label(r), name, task, v, e])
        return buffer.getvalue()
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
