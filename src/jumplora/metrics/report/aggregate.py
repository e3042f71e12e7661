"""Group complete runs by *setting* and take mean ± std over seeds; the labels that name settings and runs.

A setting is the config with the per-run keys (seed, output paths, resume flags — see
:data:`IGNORED_CONFIG_KEYS`) removed. Results are schema 2 (:mod:`jumplora.results`): the nested
config, ``runner``, ``stream`` and ``metrics`` are always there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jumplora.config import REFERENCE_RUNNERS
from jumplora.environment import environment_differences
from jumplora.results import METRIC_KEYS

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

#: Aggregated quantities: the CL metrics, then the support's and the run's; each row gets
#: ``{key}_mean``, ``{key}_std`` and ``{key}_n``.
SUMMARY_KEYS: tuple[str, ...] = (*METRIC_KEYS, "density", "jaccard", "jaccard_past", "wall_time_s")
#: Runners of reference rows (bounds to compare against): never marked best.


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
    """The stream's name, as the run recorded it (e.g. ``order1``, a stream file's stem, ``cb,rte``)."""
    return str(results["stream"])


def setting_label(config: Mapping[str, Any], stream: str) -> str:
    """Short human label, e.g. ``"inclora+jumplora / order1"``."""
    adapter = config["adapter"]
    label = str(config["strategy"]["name"])
    if config["runner"] in REFERENCE_RUNNERS:  # reference rows have no strategy
        label = str(config["runner"])
    elif adapter.get("sparse"):
        label += "+jumplora"
    if adapter.get("merge_mask", "gate") != "gate":  # a mechanism-study control (runs before it: the gate)
        label += f"+mask-{adapter['merge_mask']}"
    elif adapter.get("norm_match"):
        label += "+norm-match"
    return f"{label} / {stream}"


def run_label(results: Mapping[str, Any]) -> str:
    """``setting label (seed s)``: names one run among the seeds of its setting."""
    seed = results["config"].get("seed")
    return setting_label(results["config"], stream_label(results)) + (f" (seed {seed})" if seed is not None else "")


def is_reference(results: Mapping[str, Any]) -> bool:
    """Multitask / independent rows are bounds to compare against, not competitors for the bold best."""
    return results["runner"] in REFERENCE_RUNNERS


def finite(v: Any) -> float | None:
    """``v`` as a finite float, None when it is missing, not a number, NaN or infinite."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _mean(vals: Iterable[Any]) -> float | None:
    xs = [x for x in (finite(v) for v in vals) if x is not None]
    return float(np.mean(xs)) if xs else None


def _run_values(res: Mapping[str, Any]) -> dict[str, float | None]:
    """Per-run scalars: the recorded CL metrics, the support's density and overlap, the wall time."""
    metrics = res["metrics"] or {}
    per_task = res["per_task"] or []
    out: dict[str, float | None] = {k: finite(metrics.get(k)) for k in METRIC_KEYS}
    out["density"] = _mean(t.get("density") for t in per_task)
    out["jaccard"] = _mean(j for t in per_task for j in (t.get("jaccard_with_earlier") or []))
    out["jaccard_past"] = _mean(t.get("jaccard_with_past") for t in per_task)
    out["wall_time_s"] = finite(res["wall_time_s"])
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
        if r["complete"] is not True:
            continue
        groups.setdefault(setting_key(r["config"]) + _world_suffix(r), []).append(r)
    rows = [_row(key, runs) for key, runs in groups.items()]
    _disambiguate(rows)
    rows.sort(key=lambda r: (r["label"], r["setting"]))
    return rows


def _row(key: str, runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One setting: what names it, then mean / std / n over its seeds of every :data:`SUMMARY_KEYS`."""
    cfg = runs[0]["config"]
    row: dict[str, Any] = {
        "setting": key,
        "label": setting_label(cfg, stream_label(runs[0])) + _world_suffix(runs[0]),
        "stream": stream_label(runs[0]),
        "reference": is_reference(runs[0]),
        "config": _strip(cfg),
        "n": len(runs),
        "seeds": [r["config"].get("seed") for r in runs],
        "tasks": list(runs[0]["tasks"]),
        "run_dirs": [r.get("run_dir") for r in runs],
        "environment_differs": environment_differences([r["environment"] for r in runs]),
    }
    per_run = [_run_values(r) for r in runs]
    for m in SUMMARY_KEYS:
        xs = [v[m] for v in per_run if v[m] is not None]
        row[f"{m}_mean"] = float(np.mean(xs)) if xs else None
        row[f"{m}_std"] = float(np.std(xs, ddof=1)) if len(xs) > 1 else None  # sample std
        row[f"{m}_n"] = len(xs)
    return row


def _world_suffix(results: Mapping[str, Any]) -> str:
    """Part of the grouping key: a 2-process run is not another seed of a 1-process run."""
    world = (results["environment"] or {}).get("world_size")
    return f" world_size={world}" if world not in (None, 1) else ""


def _option_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """The nested config by option name (``model``, ``lr``, ``jumplora``...), as a user passed the options."""
    from jumplora.config import flat_fields

    names = {place: name for name, place in flat_fields().items()}
    values: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            values |= {names.get((key, k), f"{key}.{k}"): v for k, v in value.items()}
        else:
            values[key] = value
    return values


def _disambiguate(rows: list[dict[str, Any]]) -> None:
    """Append the differing options to labels that would otherwise collide."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    for same in by_label.values():
        if len(same) < 2:
            continue
        options = [_option_values(r["config"]) for r in same]
        keys = sorted({k for o in options for k in o})
        diff = [k for k in keys if len({json.dumps(o.get(k), sort_keys=True, default=str) for o in options}) > 1]
        for r, o in zip(same, options, strict=True):
            r["label"] += " [" + ", ".join(f"{k}={o.get(k)}" for k in diff) + "]"


def matrix_rows(results: Mapping[str, Any]) -> list[tuple[str, list[float | None]]]:
    """R with row labels: the zero-shot row, then "after <task>" (one row named by the runner for references)."""
    names = list(results["tasks"])
    matrix = list(results["accuracy_matrix"])
    rows: list[tuple[str, list[float | None]]] = []
    if results["zero_shot"]:
        rows.append(("zero-shot", list(results["zero_shot"])))
    if len(matrix) == len(names):
        rows += [(f"after {name}", list(row)) for name, row in zip(names, matrix, strict=True)]
    else:
        rows += [(str(results["runner"]), list(row)) for row in matrix]
    return rows


def nll_matrix_rows(results: Mapping[str, Any]) -> list[tuple[str, list[float | None], list[float | None]]]:
    """L with its standard errors and row labels (zero-shot, then "after <task>"); empty for runs without L."""
    names = list(results["tasks"])
    matrix, errors = list(results["nll_matrix"] or []), list(results["nll_se_matrix"] or [])
    rows: list[tuple[str, list[float | None], list[float | None]]] = []
    if not matrix:
        return rows
    if results["nll_zero_shot"]:
        rows.append(("zero-shot", list(results["nll_zero_shot"]), list(results["nll_se_zero_shot"] or [])))
    labels = [f"after {name}" for name in names] if len(matrix) == len(names) else [str(results["runner"])]
    for label, row, se in zip(labels, matrix, errors or [[None] * len(names)] * len(matrix), strict=False):
        rows.append((label, list(row), list(se)))
    return rows
