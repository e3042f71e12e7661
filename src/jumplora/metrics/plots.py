"""Matplotlib figures for runs and reports.

Every ``plot_*`` function but the two helpers at the end (several figures each) writes exactly one PNG,
closes its figure (long sweeps would otherwise leak memory) and returns the path. matplotlib is imported
on first use, with the Agg backend so plotting works on headless training machines. Accuracies are
fractions in [0, 1] and are displayed in %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
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
]


def _pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend, imported on first use (reports and the CLI stay light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(p, dpi=120)
    finally:
        _pyplot().close(fig)
    return p


def _square(M: Any, task_names: Sequence[str], what: str) -> np.ndarray:
    m = np.asarray(M, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{what} must be square, got shape {m.shape}")
    if len(task_names) != m.shape[0]:
        raise ValueError(f"{what} is {m.shape[0]}×{m.shape[0]} but {len(task_names)} task names were given")
    return m


def _annotated_matrix(
    m: np.ndarray,
    task_names: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    row_labels: Sequence[str],
    cmap: str,
    fmt: str,
    text_scale: float = 1.0,
) -> Figure:
    """Heat map on a fixed [0, 1] colour scale (so runs are visually comparable), cells annotated."""
    T = m.shape[0]
    size = max(4.0, 0.7 * T + 2.0)
    fig, ax = _pyplot().subplots(figsize=(size + 1.0, size))
    im = ax.imshow(m, cmap=cmap, vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(T), labels=list(task_names), rotation=45, ha="right")
    ax.set_yticks(range(T), labels=list(row_labels))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i in range(T):
        for j in range(T):
            v = m[i, j]
            if np.isnan(v):
                continue
            ax.text(
                j,
                i,
                format(v * text_scale, fmt),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if v < 0.5 else "black",
            )
    return fig


def plot_accuracy_heatmap(
    R: Any, task_names: Sequence[str], path: str | Path, title: str = "Accuracy (%) after each task"
) -> Path:
    """Annotated heat map of R: row i = "after task i", column j = "task j", values in %."""
    m = _square(R, task_names, "accuracy matrix")
    fig = _annotated_matrix(
        m,
        task_names,
        title,
        "task j",
        "after task i",
        [f"after {n}" for n in task_names],
        "viridis",
        ".1f",
        text_scale=100.0,
    )
    return _save(fig, path)


def plot_nll_heatmap(
    L: Any, task_names: Sequence[str], path: str | Path, title: str = "Gold-answer NLL (nats) after each task"
) -> Path:
    """Annotated heat map of L (row i = after task i); colours run from 0 to the matrix's largest value."""
    m = _square(L, task_names, "NLL matrix")
    top = float(np.nanmax(m)) if np.isfinite(m).any() else 1.0
    top = top if top > 0 else 1.0
    rows = [f"after {n}" for n in task_names]
    fig = _annotated_matrix(m / top, task_names, title, "task j", "after task i", rows, "viridis_r", ".2f", top)
    return _save(fig, path)


def plot_accuracy_curves(R: Any, task_names: Sequence[str], path: str | Path) -> Path:
    """Accuracy of each task across the stream; the part before the task is trained is dashed."""
    m = _square(R, task_names, "accuracy matrix") * 100.0
    T = m.shape[0]
    fig, ax = _pyplot().subplots(figsize=(max(6.0, 0.8 * T + 3.0), 4.5))
    x = np.arange(T)
    for j, name in enumerate(task_names):
        (line,) = ax.plot(x[j:], m[j:, j], marker="o", label=name)
        if j > 0:
            ax.plot(x[: j + 1], m[: j + 1, j], linestyle=":", color=line.get_color(), alpha=0.6)
    ax.plot(x, m.mean(axis=1), color="black", linewidth=2.0, linestyle="--", label="mean (all tasks)")
    ax.set_xticks(x, labels=[f"after {n}" for n in task_names], rotation=45, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Per-task accuracy over the task stream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_density(
    per_task_density: Sequence[float | None], task_names: Sequence[str], path: str | Path
) -> Path:
    """Bar chart of each task's update density in % (None, i.e. dense, is drawn as 100%)."""
    if len(per_task_density) != len(task_names):
        raise ValueError(f"{len(per_task_density)} densities for {len(task_names)} tasks")
    vals = [100.0 if d is None else 100.0 * float(d) for d in per_task_density]
    fig, ax = _pyplot().subplots(figsize=(max(5.0, 0.7 * len(vals) + 2.0), 4.0))
    bars = ax.bar(range(len(vals)), vals, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=8)
    ax.set_xticks(range(len(vals)), labels=list(task_names), rotation=45, ha="right")
    ax.set_ylabel("density of the update (%)")
    ax.set_title("Update density per task")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_overlap(M: Any, task_names: Sequence[str], path: str | Path) -> Path:
    """Annotated Jaccard overlap matrix between task supports."""
    m = _square(M, task_names, "overlap matrix")
    fig = _annotated_matrix(
        m, task_names, "Jaccard overlap of task supports", "task", "task", list(task_names), "magma", ".2f"
    )
    return _save(fig, path)


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _density_panel(ax: Any, x: np.ndarray, recs: Sequence[Mapping[str, Any]]) -> None:
    """Density against its target (with the 0.5×–2× band) and, on a twin axis, the controller state."""
    dens = np.array([_num(r.get("density")) for r in recs], dtype=float) * 100.0
    ax.plot(x, dens, color="tab:purple", linewidth=1.0, label="density")
    target = np.array([_num(r.get("target_density")) for r in recs], dtype=float) * 100.0
    if np.any(np.isfinite(target)):
        ax.plot(x, target, color="black", linestyle="--", linewidth=1.0, label="target")
        ax.fill_between(x, target / 2, target * 2, color="grey", alpha=0.15, label="0.5×–2× target")
        ax.set_yscale("log")
    ax.set_ylabel("density (%)")
    ax.set_xlabel("global step")
    for key, color in (("multiplier", "tab:orange"), ("density_penalty", "tab:red")):
        state = np.array([_num(r.get(key)) for r in recs], dtype=float)
        if np.any(np.isfinite(state)):
            twin = ax.twinx()
            twin.plot(x, state, color=color, linewidth=0.8, alpha=0.8, label=key.replace("_", " "))
            twin.set_ylabel(key.replace("_", " "), color=color)
            twin.legend(fontsize=7, loc="lower right")
            break  # the multiplier when there is one, else the l0 penalty
    ax.legend(fontsize=7, loc="upper left")


def plot_training_curves(log_records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Loss / gamma / theta (log scale, one line per group) / density vs. global_step from train_log.jsonl.

    When the records carry ``target_density`` and the controller state (``multiplier`` or
    ``density_penalty``, from ``Sparsifier.log_state()``), the density panel shows the target, its
    0.5×–2× band and the controller state on a second axis.

    Dashed vertical lines mark the first step of each new task so that jumps in the
    curves can be attributed to task switches.
    """
    recs = sorted(log_records, key=lambda r: _num(r.get("global_step", r.get("step", 0))))
    x = np.array([_num(r.get("global_step", r.get("step", i))) for i, r in enumerate(recs)], dtype=float)
    fig, axes = _pyplot().subplots(4, 1, figsize=(9.0, 10.0), sharex=True)
    ax_loss, ax_gamma, ax_theta, ax_dens = axes

    loss = np.array([_num(r.get("loss")) for r in recs], dtype=float)
    ax_loss.plot(x, loss, label="loss", linewidth=1.0)
    sl = np.array([_num(r.get("strategy_loss")) for r in recs], dtype=float)
    if np.any(np.isfinite(sl) & (sl != 0)):
        ax_loss.plot(x, sl, label="strategy loss", linewidth=1.0)
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=7, loc="upper right")

    ax_gamma.plot(x, [_num(r.get("gamma")) for r in recs], color="tab:green", linewidth=1.0)
    ax_gamma.set_ylabel("gamma")

    _theta_panel(ax_theta, x, recs)
    _density_panel(ax_dens, x, recs)
    _task_boundaries(axes, x, recs)
    for ax in axes:
        ax.grid(alpha=0.3)
    ax_loss.set_title("Training curves" if recs else "no training records")
    return _save(fig, path)


def _theta_panel(ax: Any, x: np.ndarray, recs: Sequence[Mapping[str, Any]]) -> None:
    """θ of each threshold group on a log scale (zeros, negatives and missing values dropped)."""
    groups: list[str] = []
    for r in recs:
        groups += [g for g in r.get("theta") or {} if g not in groups]
    plotted = False
    for g in groups:
        vals = np.array([_num((r.get("theta") or {}).get(g)) for r in recs], dtype=float)
        vals[~(vals > 0)] = np.nan
        if np.any(np.isfinite(vals)):
            ax.plot(x, vals, label=g, linewidth=1.0)
            plotted = True
    if plotted:
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_ylabel("theta")


def _task_boundaries(axes: Any, x: np.ndarray, recs: Sequence[Mapping[str, Any]]) -> None:
    """A dashed line at the first step of each new task, named on the top panel."""
    prev: Any = None
    for xi, r in zip(x, recs, strict=True):
        tid = r.get("task_index", r.get("task"))
        if prev is not None and tid != prev:
            for ax in axes:
                ax.axvline(xi, color="grey", linestyle="--", linewidth=0.8, alpha=0.7)
            axes[0].annotate(str(r.get("task", tid)), (xi, 0.97), xycoords=("data", "axes fraction"),
                             fontsize=7, rotation=90, va="top", ha="right", color="grey")  # fmt: skip
        prev = tid


def _mean_std(row: Mapping[str, Any], metric: str) -> tuple[float, float]:
    mean = row["mean"] if "mean" in row else row.get(f"{metric}_mean")
    std = row["std"] if "std" in row else row.get(f"{metric}_std")
    return _num(mean), (0.0 if std is None else _num(std))


def plot_bars(rows: Sequence[Mapping[str, Any]], metric: str, path: str | Path, over: str = "seeds") -> Path:
    """Grouped bar chart (mean ± std over ``over``, in %) of one metric.

    Each row needs ``label`` and ``mean``/``std`` (or ``{metric}_mean``/``{metric}_std`` as
    produced by :func:`jumplora.metrics.report.aggregate`). Rows with an optional ``group``
    key are clustered by group with one colour per label; otherwise one bar per label.
    None means are skipped.
    """
    groups: list[str] = []
    labels: list[str] = []
    for r in rows:
        g = str(r.get("group", ""))
        if g not in groups:
            groups.append(g)
        if r["label"] not in labels:
            labels.append(str(r["label"]))
    grouped = groups != [""]
    fig, ax = _pyplot().subplots(figsize=(max(6.0, 0.9 * len(rows) + 2.5), 4.5))
    if grouped:
        width = 0.8 / max(1, len(labels))
        for k, lab in enumerate(labels):
            xs, ms, ss = [], [], []
            for gi, g in enumerate(groups):
                for r in rows:
                    if str(r["label"]) == lab and str(r.get("group", "")) == g:
                        m, s = _mean_std(r, metric)
                        if math.isfinite(m):
                            xs.append(gi - 0.4 + width * (k + 0.5))
                            ms.append(100 * m)
                            ss.append(100 * s)
            ax.bar(xs, ms, width=width, yerr=ss, capsize=3, label=lab)
        ax.set_xticks(range(len(groups)), labels=groups, rotation=30, ha="right")
        ax.legend(fontsize=7)
    else:
        ms, ss = zip(*(_mean_std(r, metric) for r in rows), strict=True) if rows else ((), ())
        xs = [i for i, m in enumerate(ms) if math.isfinite(m)]
        ax.bar(
            xs,
            [100 * ms[i] for i in xs],
            yerr=[100 * ss[i] for i in xs],
            capsize=3,
            color=[f"C{i % 10}" for i in xs],
        )
        ax.set_xticks(range(len(rows)), labels=[str(r["label"]) for r in rows], rotation=30, ha="right")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} (mean ± std over {over})")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def write_run_plots(out: str | Path, results: Mapping[str, Any]) -> list[str]:
    """Every plot of one run into its plots folder; returns their paths relative to ``out``."""
    from jumplora.run.directory import plots_dir, read_train_log

    out = Path(out)
    plots, names = plots_dir(out), results["tasks"]
    written = []
    matrix = np.array(results["accuracy_matrix"])
    if matrix.ndim == 2 and matrix.shape[0] == matrix.shape[1] == len(names):
        written.append(plot_accuracy_heatmap(matrix, names, plots / "accuracy_heatmap.png", title=results["label"]))
        written.append(plot_accuracy_curves(matrix, names, plots / "accuracy_curves.png"))
    nll = np.array(results.get("nll_matrix") or [], dtype=float)
    if nll.shape == (len(names), len(names)):
        written.append(plot_nll_heatmap(nll, names, plots / "nll_heatmap.png", title=f"{results['label']}: NLL"))
    per_task = results.get("per_task") or []
    if per_task and len(per_task) == len(names):
        written.append(plot_density([t["density"] for t in per_task], names, plots / "density.png"))
    if results.get("overlap_matrix") and len(results["overlap_matrix"]) == len(names):
        written.append(plot_overlap(np.array(results["overlap_matrix"]), names, plots / "overlap.png"))
    log = read_train_log(out)
    if log:
        written.append(plot_training_curves(log, plots / "training_curves.png"))
    return [str(Path(p).relative_to(out)) for p in written]


def plot_comparison(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    metrics: Sequence[str] = ("op", "bwt"),
    suffix: str = "",
    over: str = "seeds",
) -> list[Path]:
    """One bar chart per metric comparing settings (``bars_<metric><suffix>.png``), skipping undefined metrics.

    ``rows`` are :func:`jumplora.metrics.report.aggregate` rows (``label``, ``{metric}_mean``/``_std``);
    ``over`` names what the spread is over in the title (rows that pool orders are not seeds).
    """
    made = []
    for metric in metrics:
        present = [r for r in rows if r.get(f"{metric}_mean") is not None]
        if present:
            made.append(plot_bars(present, metric, Path(out_dir) / f"bars_{metric}{suffix}.png", over))
    return made


def plot_run_figures(
    results: Mapping[str, Any],
    log_records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    name: str,
    *,
    title: str | None = None,
    kinds: Sequence[str] = ("heatmap", "nll", "overlap", "training"),
) -> list[Path]:
    """A run's accuracy and NLL heat maps, support overlap and training curves (``<kind>_<name>.png``), where
    defined (runs made before L have no NLL map)."""
    out, tasks = Path(out_dir), list(results["tasks"])
    matrix = np.array(results["accuracy_matrix"], dtype=float)
    made = []
    if "heatmap" in kinds and matrix.shape == (len(tasks), len(tasks)):
        made.append(plot_accuracy_heatmap(matrix, tasks, out / f"heatmap_{name}.png", title=title or name))
    nll = np.array(results.get("nll_matrix") or [], dtype=float)
    if "nll" in kinds and nll.shape == (len(tasks), len(tasks)):
        made.append(plot_nll_heatmap(nll, tasks, out / f"nll_{name}.png", title=f"{title or name}: NLL (nats)"))
    overlap = results.get("overlap_matrix")
    if "overlap" in kinds and overlap and len(overlap) == len(tasks):
        made.append(plot_overlap(np.array(overlap), tasks, out / f"overlap_{name}.png"))
    if "training" in kinds and log_records:
        made.append(plot_training_curves(log_records, out / f"training_{name}.png"))
    return made


#: The density frontier's panels: (key, axis label, scale).
FRONTIER_PANELS = (("op", "OP (%)", 100.0), ("bwt", "BWT (%)", 100.0), ("nll_forgetting", "L forgetting (nats)", 1.0))


def plot_frontier(points: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Density frontier") -> Path:
    """OP, BWT and L-forgetting against the final density (log scale): one dot per run and, per ``series``,
    a line through the means of its ``group``s (runs of one setting over seeds, e.g. each target of dual's
    sweep; a series of one group gets one larger mean marker). ``points`` carry ``density``, ``series``,
    optionally ``group`` (default: the density itself) and the panel keys."""
    fig, axes = _pyplot().subplots(1, len(FRONTIER_PANELS), figsize=(4.2 * len(FRONTIER_PANELS), 3.8))
    series = sorted({str(p["series"]) for p in points})
    for ax, (key, label, scale) in zip(axes, FRONTIER_PANELS, strict=True):
        for name in series:
            own = [p for p in points if str(p["series"]) == name and p.get(key) is not None]
            if not own:
                continue
            xs = np.array([100 * float(p["density"]) for p in own])
            ys = np.array([scale * float(p[key]) for p in own])
            groups = np.array([str(p.get("group", p["density"])) for p in own])
            dots = ax.scatter(xs, ys, s=14, alpha=0.5, label=name)
            means = sorted((float(xs[groups == g].mean()), float(ys[groups == g].mean())) for g in set(groups))
            size = 3 if len(means) > 1 else 6
            ax.plot(*zip(*means, strict=True), color=dots.get_facecolor()[0], alpha=0.9, marker="o", markersize=size)
        ax.set_xscale("log")
        ax.set_xlabel("final density (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)
