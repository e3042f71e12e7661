"""Paired comparison of two settings run on the same data and seeds: B − A with bootstrap intervals.

Single runs of a CL stream move by several points from the evaluation items alone (100 items per task
give a standard error of ≈ 2.5 points of accuracy), and from training noise (seeds). Runs of the two
settings are paired by seed (same items, same initialisation), and each measure's difference B − A gets:

- ``ci_items``: 95 % percentile interval when each task's eval items are resampled (the same items for A
  and B of a pair, so the noise shared by the pair cancels); needs saved predictions (``--save-predictions``);
- ``ci_seeds``: 95 % percentile interval when the pairs are resampled (2 pairs or more);
- ``ci_both``: both at once (pairs, then items within each pair): the interval to quote when it exists.

Measures: OP, BWT, FWT (accuracy, points) and the gold-answer NLL's final value, BWT and forgetting
(nats; positive = B's answers are less likely, i.e. worse).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jumplora.run.directory import predictions_file

#: (key, label, unit scale): accuracy measures in points, NLL measures in nats.
MEASURES: tuple[tuple[str, str, float], ...] = (
    ("op", "OP (points)", 100.0),
    ("bwt", "BWT (points)", 100.0),
    ("fwt", "FWT (points)", 100.0),
    ("nll_final", "L final (nats)", 1.0),
    ("nll_bwt", "L BWT (nats, + = forgot more)", 1.0),
    ("nll_forgetting", "L forgetting (nats)", 1.0),
)
#: Stream settings that must agree for two runs to be a pair (the data folder's path may differ).
_DATA_KEYS = ("order", "stream_file", "tasks", "max_train", "max_eval", "eval_split", "option_space")


class PairingError(ValueError):
    """The two groups of runs are not the same data and seeds."""


def measures_from_matrices(R: np.ndarray, L: np.ndarray) -> dict[str, np.ndarray]:
    """Measures from stacked matrices: R and L of shape (..., T + 1, T), row 0 = zero-shot, row i = after task i."""
    T = R.shape[-1]
    final, learned = R[..., T, :], np.stack([R[..., j + 1, j] for j in range(T)], axis=-1)
    before = np.stack([R[..., j, j] - R[..., 0, j] for j in range(1, T)], axis=-1)
    nll_final, nll_learned = L[..., T, :], np.stack([L[..., j + 1, j] for j in range(T)], axis=-1)
    best = np.stack([np.min(L[..., j + 1 : T, j], axis=-1) for j in range(T - 1)], axis=-1)
    return {
        "op": final.mean(-1),
        "bwt": (final[..., :-1] - learned[..., :-1]).mean(-1),
        "fwt": before.mean(-1),
        "nll_final": nll_final.mean(-1),
        "nll_bwt": (nll_final[..., :-1] - nll_learned[..., :-1]).mean(-1),
        "nll_forgetting": (nll_final[..., :-1] - best).mean(-1),
    }


def run_matrices(results: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """R and L with the zero-shot row first, from results.json (NaN where L was not recorded)."""
    T = len(results["tasks"])
    R = np.array([results.get("zero_shot") or [math.nan] * T, *results["accuracy_matrix"]], dtype=float)
    nll = results.get("nll_matrix") or [[math.nan] * T] * T
    L = np.array([results.get("nll_zero_shot") or [math.nan] * T, *nll], dtype=float)
    return R, L


def _seed(results: Mapping[str, Any]) -> int:
    return int(results["config"]["seed"])


def _data(results: Mapping[str, Any]) -> dict[str, Any]:
    stream = results["config"]["stream"]
    return {"tasks": results["tasks"], **{k: stream.get(k) for k in _DATA_KEYS}}


def pair_runs(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping, Mapping]]:
    """(A, B) runs matched by seed; PairingError unless both groups have the same seeds, once each, on the same data."""
    by_seed: list[dict[int, Mapping[str, Any]]] = [{}, {}]
    for group, runs, name in ((by_seed[0], a, "A"), (by_seed[1], b, "B")):
        for res in runs:
            if _seed(res) in group:
                raise PairingError(f"{res.get('run_dir')}: group {name} has seed {_seed(res)} twice")
            group[_seed(res)] = res
    if not by_seed[0] or set(by_seed[0]) != set(by_seed[1]):
        raise PairingError(f"the seeds differ: A has {sorted(by_seed[0])}, B has {sorted(by_seed[1])}")
    pairs = [(by_seed[0][s], by_seed[1][s]) for s in sorted(by_seed[0])]
    for ra, rb in pairs:
        if _data(ra) != _data(rb):
            diff = next(k for k in _data(ra) if _data(ra)[k] != _data(rb)[k])
            raise PairingError(f"{rb.get('run_dir')}: different data from {ra.get('run_dir')} ({diff})")
    return pairs


def item_scores(results: Mapping[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray], list[list[str]]] | None:
    """Per task j: correct[e, item] and gold NLL[e, item] over the T + 1 evaluations, and the gold answers.

    None when the run saved no predictions.
    """
    run, tasks = Path(results["run_dir"]), results["tasks"]
    afters = ["zero-shot", *(f"after {t}" for t in tasks)]
    records: list[dict[str, list[dict]]] = []
    for number, after in enumerate(afters):
        path = predictions_file(run, number, after)
        if not path.is_file():
            return None
        per_task: dict[str, list[dict]] = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            per_task.setdefault(record["task"], []).append(record)
        records.append(per_task)
    correct, nll, answers = [], [], []
    for task in tasks:
        rows = [sorted(evaluation[task], key=lambda r: r["index"]) for evaluation in records]
        correct.append(np.array([[float(r["correct"]) for r in row] for row in rows]))
        nll.append(np.array([[math.nan if r.get("gold_nll") is None else r["gold_nll"] for r in row] for row in rows]))
        answers.append([r["answer"] for r in rows[0]])
    return correct, nll, answers


def _resampled(scores: list[np.ndarray], picks: list[np.ndarray]) -> np.ndarray:
    """(B, T + 1, T) cell means when task j's items are ``picks[j]`` (B × n_j indices)."""
    with np.errstate(invalid="ignore"):
        cells = [np.nanmean(s[:, p], axis=-1).T for s, p in zip(scores, picks, strict=True)]  # (B, T + 1) each
    return np.stack(cells, axis=-1)


def _item_differences(pairs: list[tuple[Mapping, Mapping]], draws: int, rng: np.random.Generator) -> dict | None:
    """Per pair, the measures' B − A over ``draws`` item resamplings (draws × pairs arrays); None without items."""
    loaded = [(item_scores(ra), item_scores(rb)) for ra, rb in pairs]
    if any(sa is None or sb is None for sa, sb in loaded):
        return None
    out: dict[str, list[np.ndarray]] = {key: [] for key, _, _ in MEASURES}
    for (ra, rb), (sa, sb) in zip(pairs, loaded, strict=True):
        if sa[2] != sb[2]:
            raise PairingError(f"{rb['run_dir']}: its eval items differ from {ra['run_dir']}'s (same seed)")
        picks = [rng.integers(0, len(items), size=(draws, len(items))) for items in sa[2]]
        ma = measures_from_matrices(_resampled(sa[0], picks), _resampled(sa[1], picks))
        mb = measures_from_matrices(_resampled(sb[0], picks), _resampled(sb[1], picks))
        for key in out:
            out[key].append(mb[key] - ma[key])
    return {key: np.stack(values, axis=-1) for key, values in out.items()}


def _interval(values: np.ndarray) -> list[float] | None:
    finite = values[np.isfinite(values)]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] if finite.size else None


def compare(
    a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], draws: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """B − A per measure: mean over pairs, each pair's difference and the bootstrap intervals (see module doc)."""
    pairs = pair_runs(a, b)
    rng = np.random.default_rng(seed)
    per_pair = {key: [] for key, _, _ in MEASURES}
    for ra, rb in pairs:
        ma, mb = measures_from_matrices(*run_matrices(ra)), measures_from_matrices(*run_matrices(rb))
        for key in per_pair:
            per_pair[key].append(float(mb[key] - ma[key]))
    items = _item_differences(pairs, draws, rng)
    seed_picks = rng.integers(0, len(pairs), size=(draws, len(pairs))) if len(pairs) > 1 else None
    rows = []
    for key, label, scale in MEASURES:
        diffs = np.array(per_pair[key])
        row = {"measure": key, "label": label, "n_pairs": len(pairs), "mean": _scaled(np.mean(diffs), scale),
               "per_pair": [_scaled(d, scale) for d in diffs]}  # fmt: skip
        row |= dict.fromkeys(("ci_items", "ci_seeds", "ci_both"))
        if items is not None:
            row["ci_items"] = _scaled_ci(_interval(items[key].mean(-1)), scale)
        if seed_picks is not None:
            row["ci_seeds"] = _scaled_ci(_interval(diffs[seed_picks].mean(-1)), scale)
            if items is not None:  # pair j of draw i takes item draw i of that pair
                both = np.take_along_axis(items[key], seed_picks, axis=-1).mean(-1)
                row["ci_both"] = _scaled_ci(_interval(both), scale)
        rows.append(row)
    return {"seeds": [_seed(ra) for ra, _ in pairs], "a": [ra.get("run_dir") for ra, _ in pairs],
            "b": [rb.get("run_dir") for _, rb in pairs], "draws": draws, "measures": rows}  # fmt: skip


def _scaled(value: float, scale: float) -> float | None:
    return float(value) * scale if math.isfinite(value) else None


def _scaled_ci(ci: list[float] | None, scale: float) -> list[float] | None:
    return None if ci is None else [ci[0] * scale, ci[1] * scale]


def within_noise(row: Mapping[str, Any]) -> bool | None:
    """Whether the widest interval available (both > seeds > items) contains 0; None without one."""
    ci = row.get("ci_both") or row.get("ci_seeds") or row.get("ci_items")
    return None if ci is None else ci[0] <= 0 <= ci[1]


def _ci_text(ci: list[float] | None) -> str:
    return "—" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def format_comparison(result: Mapping[str, Any], fmt: str) -> str:
    """The comparison as markdown (also the table format's text) or json."""
    if fmt == "json":
        return json.dumps(result, indent=2) + "\n"
    if fmt not in ("markdown", "table"):
        raise ValueError("--compare prints as table, markdown or json")
    lines = [f"B − A over {len(result['seeds'])} pair(s) (seeds {', '.join(map(str, result['seeds']))}); "
             f"95 % bootstrap intervals, {result['draws']} draws", "",
             "| measure | B − A | per pair | CI items | CI seeds | CI both | within noise |",
             "|---|---:|---|---|---|---|---|"]  # fmt: skip
    for row in result["measures"]:
        mean = "—" if row["mean"] is None else f"{row['mean']:+.2f}"
        pairs = ", ".join("—" if d is None else f"{d:+.2f}" for d in row["per_pair"])
        noise = {True: "yes", False: "no", None: "—"}[within_noise(row)]
        lines.append(f"| {row['label']} | {mean} | {pairs} | {_ci_text(row['ci_items'])} | "
                     f"{_ci_text(row['ci_seeds'])} | {_ci_text(row['ci_both'])} | {noise} |")  # fmt: skip
    lines += ["", f"A: {', '.join(map(str, result['a']))}", f"B: {', '.join(map(str, result['b']))}"]
    return "\n".join(lines) + "\n"
