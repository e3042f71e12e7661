"""Write docs/RESULTS.md and docs/results/*.png from the runs under studies/ (see bench/grid.py).

    python bench/make_results.py

Numbers are read from each run's results.json as measured; nothing is typed in by hand except the
discussion, which the script leaves in docs/RESULTS_discussion.md and includes verbatim.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from grid import (  # noqa: E402
    LONG_BUDGET,
    RUNS,
    RUNS_DRIFT,
    RUNS_SMOL,
    RUNS_V2,
    SMOL_BASE,
    SMOL_BUDGET,
    SMOL_ELLA_PAST_TEST_SEEDS,
    SMOL_ORDERS_SEEDS,
    SMOL_PROBES,
    SMOL_STRATEGIES,
    SMOL_TUNED,
    STANDARD_BUDGET,
    TUNE_BUDGET,
    TUNED,
    V2_BUDGET,
    smollm2_ella_jl_past,
    smollm2_ella_past_runs,
    smollm2_long_runs,
    smollm2_run_name,
    smollm2_runs,
    smollm2_tuning_runs,
    study_name,
    tuning_runs,
    v2_ella_past_runs,
)

from jumplora.io import read_jsonl  # noqa: E402
from jumplora.metrics.drift import KINDS, answer_drift, final_drift, prediction_keys  # noqa: E402
from jumplora.metrics.plots import plot_comparison, plot_run_figures  # noqa: E402
from jumplora.metrics.report import IncompleteRunError, load_results  # noqa: E402

DOCS = ROOT / "docs"
FIGS = DOCS / "results"


def load(name: str, root: Path = RUNS) -> dict | None:
    """A complete run's results through the one reader (validated, schema 2); None if not run or unfinished."""
    if not (root / name / "results.json").exists():
        return None
    try:
        return load_results(root / name)
    except IncompleteRunError:
        return None


def pct(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    mean, std = 100 * float(np.mean(vals)), 100 * float(np.std(vals))
    return f"{mean:.1f} ± {std:.1f}" if len(vals) > 1 else f"{mean:.1f}"


def run_summary(res: dict) -> dict:
    per_task = res.get("per_task") or []
    jac = [j for t in per_task for j in (t.get("jaccard_with_earlier") or [])]
    jac_past = [t["jaccard_with_past"] for t in per_task if t.get("jaccard_with_past") is not None]
    metrics = res.get("metrics") or {}
    return {
        "op": metrics.get("op"),
        "bwt": metrics.get("bwt"),
        "fwt": metrics.get("fwt"),
        "forgetting": metrics.get("forgetting"),
        "density": float(np.mean([t["density"] for t in per_task])) if per_task else None,
        "jaccard": float(np.mean(jac)) if jac else None,
        "jaccard_past": float(np.mean(jac_past)) if jac_past else None,
        "wall": res.get("wall_time_s"),
    }


def group_runs(prefix: str, seeds: tuple[int, ...], root: Path = RUNS) -> list[dict]:
    summaries = []
    for seed in seeds:
        res = load(f"{prefix}-s{seed}", root)
        if res is not None:
            summaries.append(run_summary(res))
    return summaries


def table_for(
    orders: list[int],
    seeds: tuple[int, ...],
    label: str,
    suffix: str = "",
    root: Path = RUNS,
    run_name: Callable[[str, bool, int, int], str] | None = None,
) -> tuple[str, list[dict]]:
    run_name = run_name or (lambda strategy, jump, order, seed: study_name(strategy, jump, order, seed, suffix))
    methods = [(s, jl) for s in ("seqlora", "inclora", "ella", "olora") for jl in (False, True)]
    lines = [
        f"### {label}",
        "",
        "| method | runs | OP | BWT | FWT | forgetting | density | Jaccard tasks | Jaccard W_past | wall (s, median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bars = []
    present = [o for o in orders if any(load(run_name("inclora", False, o, seed), root) for seed in seeds)]
    if not present:
        return f"### {label}\n\nNot run yet (`python bench/grid.py final` continues the grid).\n", []
    lines[0] = f"### {label} — orders present: {', '.join(map(str, present))}"
    for strategy, jl in [*methods, ("multitask", False)]:
        runs = [load(run_name(strategy, jl, order, seed), root) for order in orders for seed in seeds]
        rows = [run_summary(res) for res in runs if res is not None]
        if not rows:
            continue
        name = f"{strategy}{' + JumpLoRA' if jl else ''}"
        if strategy == "multitask":
            name = "multitask (upper bound)"
        col = {k: [r[k] for r in rows] for k in rows[0]}
        wall = np.median([w for w in col["wall"] if w is not None])
        dense = not jl
        lines.append(
            f"| {name} | {len(rows)} | {pct(col['op'])} | {pct(col['bwt'])} | {pct(col['fwt'])} | "
            f"{pct(col['forgetting'])} | {'100 (dense)' if dense else pct(col['density'])} | "
            f"{pct(col['jaccard']) if not dense else '—'} | {pct(col['jaccard_past']) if not dense else '—'} | "
            f"{wall:.0f} |"
        )
        bars.append({"label": name, "op": col["op"], "bwt": col["bwt"]})
    return "\n".join(lines) + "\n", bars


def zero_shot_line(orders: list[int], seeds: tuple[int, ...]) -> str:
    vals = []
    for order in orders:
        for seed in seeds:
            res = load(f"o{order}-inclora-s{seed}")
            if res is not None:
                vals.append(float(np.mean(res["zero_shot"])))
    return f"Zero-shot (untrained MiniLM, stream option space): mean accuracy {pct(vals)} %.\n"


def tuning_table() -> str:
    lines = ["| run | OP (dev) | BWT (dev) | density |", "|---|---|---|---|"]
    for name in tuning_runs():
        res = load(name)
        if res is None:
            lines.append(f"| {name} | not run | | |")
            continue
        s = run_summary(res)
        dens = "—" if not _sparse(res["config"]) else f"{100 * s['density']:.1f}"
        lines.append(f"| {name} | {100 * s['op']:.1f} | {100 * s['bwt']:+.1f} | {dens} |")
    return "\n".join(lines) + "\n"


def _sparse(config: dict) -> bool:
    """Whether a run used JumpLoRA."""
    return bool(config["adapter"].get("sparse"))


def density_rows(root: Path) -> str:
    """Every sparse run: its final density per task against the target (the budget unless set)."""
    lines = ["| run | per task: final density / target (ratio) | in 0.5×–2× |", "|---|---|---|"]
    for path in sorted(root.glob("*/results.json")):
        res = load(path.parent.name, root)
        if res is None or not _sparse(res["config"]):
            continue
        targets = _targets(path.parent)
        cells, ok = [], True
        for task, target in zip(res["per_task"], targets, strict=False):
            ratio = task["density"] / target if target else float("nan")
            ok = ok and 0.5 <= ratio <= 2.0
            cells.append(f"{100 * task['density']:.1f}/{100 * target:.1f} ({ratio:.2f}×)")
        lines.append(f"| {path.parent.name} | {' · '.join(cells)} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines) + "\n"


def _targets(run: Path) -> list[float]:
    """Each task's density target, as the controller logged it (last record of the task)."""
    last: dict[int, float] = {}
    for record in read_jsonl(run / "train_log.jsonl"):
        if record.get("target_density") is not None:
            last[record["task_index"]] = record["target_density"]
    return [last[i] for i in sorted(last)]


def main_command_table() -> str:
    lines = ["| `jumplora run --order 1 --strategy inclora …` | OP | BWT | FWT | forgetting | density | wall (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, flag in (
        ("main-inclora-jl", "--jumplora"),
        ("main-inclora", "--dense"),
        ("main-inclora-none", "--jumplora --density-control none"),
    ):
        res = load(name, RUNS_V2)
        if res is None:
            lines.append(f"| `{flag}` | not run yet | | | | | |")
            continue
        s = run_summary(res)
        dens = f"{100 * s['density']:.1f}" if _sparse(res["config"]) else "100 (dense)"
        lines.append(f"| `{flag}` | {100 * s['op']:.1f} | {100 * s['bwt']:+.1f} | {100 * s['fwt']:+.1f} | "
                     f"{100 * s['forgetting']:.1f} | {dens} | {s['wall']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def v2_ella_past_rows() -> list[str]:
    """MiniLM's ELLA + JumpLoRA with W_past merged (runs_v2's own) or dense, on the same order and seed."""
    lines = ["| order, seed | past=merged OP / BWT | past=dense OP / BWT | ΔOP | ΔBWT |", "|---|---|---|---|---|"]
    deltas = []
    for name, opts in v2_ella_past_runs().items():
        merged, dense = load(study_name("ella", True, opts["order"], opts["seed"]), RUNS_V2), load(name, RUNS_V2)
        if merged is None or dense is None:
            continue
        m, d = merged["metrics"], dense["metrics"]
        deltas.append((d["op"] - m["op"], d["bwt"] - m["bwt"]))
        lines.append(
            f"| {opts['order']}, {opts['seed']} | {100 * m['op']:.1f} / {100 * m['bwt']:+.1f} | "
            f"{100 * d['op']:.1f} / {100 * d['bwt']:+.1f} | {100 * deltas[-1][0]:+.1f} | {100 * deltas[-1][1]:+.1f} |"
        )
    if not deltas:
        return ["Not run yet (`python bench/grid.py v2-ella-past`)."]
    return [*lines, "", _paired_summary("ELLA + JumpLoRA", np.array(deltas).T * 100, ahead="past=dense")]


def v2_section() -> list[str]:
    std_table, _ = table_for([1, 2, 3], (0, 1, 2), "Standard CL, orders 1–3 (3 seeds on order 1)", root=RUNS_V2)
    o1_table, _ = table_for([1], (0, 1, 2), "Order 1 only (3 seeds)", root=RUNS_V2)
    long_table, _ = table_for([4], (0, 1, 2), "Long CL, order 4 (15 tasks)", root=RUNS_V2)
    sweep = DOCS / "density_sweep.md"
    return [
        "## Current defaults: density control (`--density-control dual`, the paper's ramp 0.2 → 0.8)",
        "",
        "`python bench/grid.py v2 && python bench/make_results.py`. Every default as shipped: θ matched to the",
        "LoRA budget after the first optimizer step, then held at it by the dual controller; no hand-tuned",
        f"ramp. Budget per task {V2_BUDGET}, batch 16; ELLA λ = 1e6, O-LoRA λ1 = 1 (tuned in the first study).",
        "",
        "### The README's main command, sparse and dense (order 1, all defaults: 256 train / 200 test, seed 0)",
        "",
        main_command_table(),
        std_table,
        o1_table,
        long_table,
        "### ELLA + JumpLoRA: W_past from the merged or the ungated updates",
        "",
        "`python bench/grid.py v2-ella-past`: the same runs as the tables' ELLA + JumpLoRA (W_past summing the",
        "merged, sparse updates, the strategy's default when they ran) again with `--strategy-arg past=dense`.",
        "",
        *v2_ella_past_rows(),
        "",
        "### Final density against its target, every sparse run",
        "",
        density_rows(RUNS_V2),
        (DOCS / "RESULTS_v2_discussion.md").read_text() if (DOCS / "RESULTS_v2_discussion.md").exists() else "",
        "### How the default was chosen (dev splits)",
        "",
        sweep.read_text().split("\n", 1)[1] if sweep.exists() else "Not run yet.",
        "",
        "# First study: the paper's rule without density control (late ramp 0.8 → 1.0 hand-tuned)",
        "",
    ]


# -- SmolLM2-135M-Instruct, the generative study (issue 11) ------------------------------------------------
PAPER_T5_LARGE = "IncLoRA 62.6 → 71.6 OP with JumpLoRA, BWT −22.9 → −11.9 (T5-large, standard orders, the paper)"


def _diagonal(res: dict, key: str = "accuracy_matrix") -> str:
    """Accuracy on each task right after training it, and at the end (R[i,i] → R[T,i])."""
    matrix = res.get(key) or []
    if not matrix:
        return "—"
    last = matrix[-1]
    if len(matrix) != len(last):  # one row (multitask): each task's accuracy after joint training
        return " · ".join(f"{100 * acc:.0f}" for acc in last)
    return " · ".join(f"{100 * matrix[i][i]:.0f}→{100 * last[i]:.0f}" for i in range(len(matrix)))


def _rank(res: dict, metric: str) -> float | None:
    return (res.get("rank_metrics") or {}).get(metric)


def _smol_cells(res: dict) -> dict[str, str]:
    """The cells the SmolLM2 tables share, formatted: OP, BWT, forgetting, R's diagonal, density, Jaccard W_past."""
    s, sparse = run_summary(res), _sparse(res["config"])
    return {
        "op": f"{100 * s['op']:.1f}",
        "bwt": "—" if s["bwt"] is None else f"{100 * s['bwt']:+.1f}",
        "forgetting": "—" if s["forgetting"] is None else f"{100 * s['forgetting']:.1f}",
        "diagonal": _diagonal(res),
        "density": f"{100 * s['density']:.1f}" if sparse else "100 (dense)",
        "jaccard_past": f"{100 * s['jaccard_past']:.1f}" if sparse and s["jaccard_past"] is not None else "—",
        "wall": f"{s['wall']:.0f}",
    }


def smollm2_rows(names: list[str]) -> list[str]:
    """One row per run: exact match OP / BWT / forgetting, R's diagonal, ranking OP / BWT, density, wall."""
    lines = [
        "| run | OP (EM) | BWT | forgetting | task i after training i → after the last task | rank OP | rank BWT "
        "| density | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        res = load(name, RUNS_SMOL)
        if res is None:
            continue
        c = _smol_cells(res)
        r_op, r_bwt = _rank(res, "op"), _rank(res, "bwt")
        lines.append(
            f"| {name} | {c['op']} | {c['bwt']} | {c['forgetting']} | {c['diagonal']} | "
            f"{'—' if r_op is None else f'{100 * r_op:.1f}'} | {'—' if r_bwt is None else f'{100 * r_bwt:+.1f}'} | "
            f"{c['density']} | {c['wall']} |"
        )
    return lines


def smollm2_tuning_section() -> list[str]:
    """ELLA and O-LoRA λ on dev at the study budget, next to dense IncLoRA on the same tasks."""
    names = ["probe-lr1e-3-e3", *smollm2_tuning_runs()]
    rows = smollm2_rows(names)
    missing = [n for n in names if load(n, RUNS_SMOL) is None]
    tuned = json.loads(SMOL_TUNED.read_text()) if SMOL_TUNED.exists() else None
    tuned = {k: v for k, v in tuned.items() if not k.startswith("_")} if tuned else None
    return [
        "## Strategy λ on dev (dbpedia, amazon, agnews; the study budget; seed 0)",
        "",
        "`python bench/grid.py smollm2-tune`; `probe-lr1e-3-e3` is dense IncLoRA on the same tasks and budget.",
        "",
        *(rows if len(rows) > 3 else ["Not run yet."]),
        "",
        f"Not run yet: {', '.join(missing)}." if missing else "",
        f"Chosen by dev OP, then BWT (studies/tuned_smollm2.json, which the grid reads): `{json.dumps(tuned)}`."
        if tuned
        else "Until chosen, the grid uses MiniLM's λ (ELLA 1e6, O-LoRA 1.0).",
        "",
    ]


def ella_past_section() -> list[str]:
    """ELLA + JumpLoRA with W_past merged (sparse) or dense, beside its references on the same tasks (dev, test)."""
    ablation = smollm2_ella_past_runs()

    def ella_jl(split: str, seed: int, label: str) -> list[tuple[str, Path]]:
        return [
            (f"{label}: ELLA + JumpLoRA, past={opts['strategy_args']['past']}", RUNS_SMOL / name)
            for name, opts in ablation.items()
            if opts.get("eval_split", "test") == split and opts["seed"] == seed
        ]

    rows = [
        ("dev: IncLoRA", RUNS_SMOL / "probe-lr1e-3-e3"),
        ("dev: IncLoRA + JumpLoRA", RUNS / "density_sweep" / "smol-L-dual"),
        ("dev: ELLA", RUNS_SMOL / "tune-ella-lam1e+06"),
        *ella_jl("dev", 0, "dev"),
    ]
    for seed in SMOL_ELLA_PAST_TEST_SEEDS:
        rows += [
            (f"test s{seed}: IncLoRA", RUNS_SMOL / f"o1-inclora-s{seed}"),
            (f"test s{seed}: IncLoRA + JumpLoRA", RUNS_SMOL / f"o1-inclora-jl-s{seed}"),
            (f"test s{seed}: ELLA", RUNS_SMOL / f"o1-ella-s{seed}"),
            *ella_jl("test", seed, f"test s{seed}"),
        ]
    lines = [
        "| method | run | OP (EM) | BWT | forgetting | task i after training i → after the last task | density "
        "| Jaccard W_past |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, run in rows:
        res = load(run.name, run.parent)
        if res is None:
            lines.append(f"| {label} | {run.name} | not run yet | | | | | |")
            continue
        c = _smol_cells(res)
        lines.append(
            f"| {label} | {run.name} | {c['op']} | {c['bwt']} | {c['forgetting']} | {c['diagonal']} | "
            f"{c['density']} | {c['jaccard_past']} |"
        )
    return [
        "## ELLA + JumpLoRA: W_past from the merged (sparse) or the ungated (dense) updates",
        "",
        "`python bench/grid.py smollm2-ella-past`: the strategy argument `past=dense` sums each task's",
        "ungated s·B·A into W_past; `merged` sums what was merged. Dev (seed 0): the tuning's tasks and",
        "budget, λ 1e6; IncLoRA + JumpLoRA is the density sweep's `dual` run (docs/density_sweep.md). Dev",
        f"picks the grid's W_past as it picks λ: **past={smollm2_ella_jl_past()}** (OP, then BWT). Test: order 1",
        "at the study budget, beside the grid's runs on the same data. Jaccard W_past: the new task's kept",
        "entries against the union of the earlier merged supports.",
        "",
        *lines,
        "",
    ]


def drift_section() -> list[str]:
    """What answers to earlier tasks became after the last task, for every run that saved its answers."""
    runs = [("MiniLM", d) for d in sorted(RUNS_DRIFT.glob("*/"))] + [
        ("SmolLM2", d) for d in sorted(RUNS_SMOL.glob("o*/"))
    ]
    lines = [
        "| model | run | answers | " + " | ".join(k.replace("_", " ") for k in KINDS) + " |",
        "|---|---|---|" + "---|" * len(KINDS),
    ]
    for model, run in runs:
        res = load(run.name, run.parent)
        if res is None or res["runner"] != "continual" or not (run / "predictions").is_dir():
            continue  # only a stream of tasks has earlier tasks whose answers can drift
        keys = prediction_keys(res)
        for key in keys:
            shares = final_drift(answer_drift(run, key))
            how = "generated" if key == "prediction" and len(keys) > 1 else "ranked options"
            lines.append(
                f"| {model} | {run.name} | {how} | " + " | ".join(f"{100 * shares[k]:.1f}" for k in KINDS) + " |"
            )
    return [
        "## What forgotten answers become (after the last task, earlier tasks' items, %)",
        "",
        "`jumplora report RUN --drift` on runs made with `--save-predictions` (metrics/drift.py): each answer",
        "is correct, another of its task's own options, one of the newest task's labels, another task's",
        "label, or no option at all. MiniLM: `python bench/grid.py drift` (order 1, seed 0, runs_v2's settings).",
        "",
        *(lines if len(lines) > 2 else ["No run with saved answers yet."]),
        "",
    ]


class Pair(NamedTuple):
    """A grid strategy dense and with JumpLoRA on the same order and seed: results and run folder names."""

    strategy: str
    order: int
    seed: int
    dense: dict
    jump: dict
    names: tuple[str, str]


def smollm2_pairs() -> list[Pair]:
    """Every pair of the grid with both runs done."""
    pairs = []
    for strategy in SMOL_STRATEGIES:
        for order, seed in SMOL_ORDERS_SEEDS:
            names = tuple(smollm2_run_name(strategy, jl, order, seed) for jl in (False, True))
            dense, jump = (load(name, RUNS_SMOL) for name in names)
            if dense is not None and jump is not None:
                pairs.append(Pair(strategy, order, seed, dense, jump, names))
    return pairs


def smollm2_paired() -> list[str]:
    """Each strategy + JumpLoRA minus the same strategy dense, on the same order and seed (EM and ranking)."""
    lines = [
        "| strategy | order, seed | dense OP / BWT | + JumpLoRA OP / BWT | ΔOP | ΔBWT | rank ΔOP | rank ΔBWT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    deltas: dict[str, list[tuple[float, float]]] = {}
    for strategy, order, seed, dense, jump, _ in smollm2_pairs():
        d, j = dense["metrics"], jump["metrics"]
        dr, jr = dense.get("rank_metrics") or {}, jump.get("rank_metrics") or {}
        deltas.setdefault(strategy, []).append((j["op"] - d["op"], j["bwt"] - d["bwt"]))
        rank_op, rank_bwt = jr["op"] - dr["op"], jr["bwt"] - dr["bwt"]
        lines.append(
            f"| {strategy} | {order}, {seed} | {100 * d['op']:.1f} / {100 * d['bwt']:+.1f} | "
            f"{100 * j['op']:.1f} / {100 * j['bwt']:+.1f} | {100 * (j['op'] - d['op']):+.1f} | "
            f"{100 * (j['bwt'] - d['bwt']):+.1f} | {100 * rank_op:+.1f} | {100 * rank_bwt:+.1f} |"
        )
    if not deltas:
        return ["No complete dense / JumpLoRA pair yet."]
    summaries = [_paired_summary(strategy, np.array(d).T * 100) for strategy, d in deltas.items()]
    return [*lines, "", *summaries, "", *smollm2_paired_by_task(), "", *smollm2_final_answers("amazon")]


def smollm2_paired_by_task() -> list[str]:
    """Where the pairs' OP differences come from: each task's accuracy, JumpLoRA minus dense, over all pairs."""
    by_task: dict[str, list[tuple[float, float]]] = {}
    for pair in smollm2_pairs():
        d, j = pair.dense["accuracy_matrix"], pair.jump["accuracy_matrix"]
        for i, task in enumerate(pair.dense["tasks"]):
            by_task.setdefault(task, []).append((100 * (j[i][i] - d[i][i]), 100 * (j[-1][i] - d[-1][i])))
    lines = [
        "Each task's accuracy, JumpLoRA minus dense, over every pair above (a task's share of ΔOP is its Δ / 4):",
        "",
        "| task | pairs | Δ right after training it | Δ after the last task | JumpLoRA ahead / behind (last) |",
        "|---|---|---|---|---|",
    ]
    for task, rows in by_task.items():
        learned, final = np.array(rows).T
        se = final.std(ddof=1) / np.sqrt(len(final)) if len(final) > 1 else float("nan")
        lines.append(
            f"| {task} | {len(final)} | {learned.mean():+.1f} | {final.mean():+.1f} (standard error {se:.1f}) | "
            f"{int((final > 0).sum())} / {int((final < 0).sum())} |"
        )
    return lines


def smollm2_final_answers(task: str) -> list[str]:
    """How often each of ``task``'s options is answered after the last task, dense against JumpLoRA, summed
    over the pairs that saved their answers (``--save-predictions``)."""
    counts: dict[str, Counter] = {"dense": Counter(), "JumpLoRA": Counter()}
    pairs, truth = 0, Counter()
    for pair in smollm2_pairs():
        runs = dict(zip(counts, pair.names, strict=True))
        files = {kind: sorted((RUNS_SMOL / name / "predictions").glob("*.jsonl")) for kind, name in runs.items()}
        if task not in pair.dense["tasks"] or not all(files.values()):
            continue
        pairs += 1
        answers = {kind: [row for row in read_jsonl(found[-1]) if row["task"] == task] for kind, found in files.items()}
        for kind, rows in answers.items():
            counts[kind].update(row["prediction"] for row in rows)
        truth.update(row["answer"] for row in answers["dense"])  # the same items on both sides
    if not pairs:
        return []
    options = sorted(set(truth) | set(counts["dense"]) | set(counts["JumpLoRA"]), key=lambda o: -truth[o])
    return [
        f"{task}'s answers after the last task (generated; {pairs} pairs with saved answers, "
        f"{sum(truth.values())} items per side):",
        "",
        "| answer | correct answer | dense | + JumpLoRA |",
        "|---|---|---|---|",
        *(f"| {o} | {truth[o]} | {counts['dense'][o]} | {counts['JumpLoRA'][o]} |" for o in options),
    ]


def _paired_summary(strategy: str, deltas: np.ndarray, ahead: str = "JumpLoRA") -> str:
    """One line per strategy: how often `ahead` is, and the mean gain with its standard error."""
    op, bwt = deltas

    def mean(x: np.ndarray) -> str:
        return f"{x.mean():+.1f}" + (f" (standard error {x.std(ddof=1) / np.sqrt(len(x)):.1f})" if len(x) > 1 else "")

    return (
        f"- {strategy}: {ahead} ahead on OP in {int((op > 0).sum())} of {len(op)} pairs, on BWT in "
        f"{int((bwt > 0).sum())}; mean ΔOP {mean(op)}, mean ΔBWT {mean(bwt)}."
    )


def smollm2_figures(bars: list[dict]) -> list[str]:
    """As MiniLM's: R as heat maps (order 1 seed 0, IncLoRA ± JumpLoRA), the sparse runs' overlap of kept
    entries and training curves (IncLoRA and ELLA + JumpLoRA), OP / BWT bars over every run."""
    made = []
    for variant in ("inclora", "inclora-jl"):
        res = load(f"o1-{variant}-s0", RUNS_SMOL)
        if res is not None:
            title = f"SmolLM2, order 1, {variant}, seed 0 (exact match)"
            made += plot_run_figures(res, [], FIGS, f"smollm2_o1_{variant}", title=title, kinds=("heatmap",))
    for strategy in ("inclora", "ella"):
        name = smollm2_run_name(strategy, True, 1, 0)
        res = load(name, RUNS_SMOL)
        if res is not None:
            log = read_jsonl(RUNS_SMOL / name / "train_log.jsonl")
            made += plot_run_figures(res, log, FIGS, f"smollm2_o1_{strategy}-jl", kinds=("overlap", "training"))
    if bars:
        made += run_bar_charts(bars, "_smollm2")
    return [f"![{Path(p).stem}]({Path(p).relative_to(DOCS)})" for p in made]


def _settings(options: dict) -> str:
    """`lr 0.001, max_train 160` rather than a Python dict in the prose."""
    return ", ".join(
        f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}" for key, value in options.items()
    )


def smollm2_long_section() -> list[str]:
    """Long order 4 (15 tasks) at the study budget: the runs present, else what running it takes."""
    names = list(smollm2_long_runs())
    rows = smollm2_rows(names)
    done = len(rows) - 2
    return [
        "## Long order 4 (test splits)",
        "",
        "`python bench/grid.py smollm2-long` (on a GPU: `bash bench/gpu.sh generative`); 15 tasks at the study",
        "budget, seed 0. A run is ≈ 3-4 h on one CPU thread (the cost estimate in the discussion below).",
        "",
        *(rows if done else [f"Not run yet ({len(names)} runs: {', '.join(names)})."]),
        "",
    ]


def smollm2_section() -> list[str]:
    probes = smollm2_rows(list(SMOL_PROBES))
    probes_missing = [n for n in SMOL_PROBES if load(n, RUNS_SMOL) is None]
    grid = smollm2_rows(list(smollm2_runs()))
    missing = [n for n in smollm2_runs() if load(n, RUNS_SMOL) is None]
    discussion = DOCS / "RESULTS_smollm2_discussion.md"
    summary, bars = table_for(
        [1, 2, 3],
        (0, 1, 2),
        "Every strategy, exact match (mean ± std over the runs present)",
        root=RUNS_SMOL,
        run_name=smollm2_run_name,
    )
    return [
        "# SmolLM2-135M-Instruct: the paper's setting (generative, exact match)",
        "",
        "The model answers in free text and is scored by exact match, as T5-large is in the paper. Prompt: the",
        "paper's `Task Instruction: … / Options: a | b | … / Text: … / Answer:` as the user turn of the model's",
        "chat template; the answer is the assistant's reply (greedy, at most the longest option's tokens, cut at",
        "eos or newline). Second metric: the option with the highest likelihood among the stream's options",
        f"(`rank`). Settings: `{json.dumps(SMOL_BASE)}`, adapters on q_proj, v_proj, AdamW, warm-up 6 %.",
        "",
        "## Budget search: when does dense IncLoRA forget? (dev splits of dbpedia, amazon, agnews; seed 0)",
        "",
        "`python bench/grid.py smollm2-probe`; 160 training and 48 dev items per task, batch 8, so `e1` is 20",
        "optimizer steps per task and `e3` (3 epochs) 60. The diagonal column reads accuracy on task i right",
        "after training it → after the last task.",
        "",
        *(probes if len(probes) > 2 else ["Not run yet."]),
        "",
        f"Not run (CPU time): {', '.join(probes_missing)}." if probes_missing else "",
        "",
        *smollm2_tuning_section(),
        *ella_past_section(),
        "## Orders 1-3 (test splits)",
        "",
        f"`python bench/grid.py smollm2`; per task {_settings(SMOL_BUDGET)} (60 optimizer steps), seed N in run name's",
        "`-sN`, every default otherwise (JumpLoRA: `dual` density control to the LoRA budget).",
        "",
        *(grid if len(grid) > 2 else ["Not run yet."]),
        "",
        f"{len(grid) - 2} of {len(smollm2_runs())} runs done. Not run yet: {', '.join(missing)}." if missing else "",
        "",
        f"Paper, for comparison: {PAPER_T5_LARGE}.",
        "",
        summary,
        "### JumpLoRA against dense: each strategy on the same order and seed",
        "",
        *smollm2_paired(),
        "",
        *smollm2_long_section(),
        *smollm2_figures(bars),
        "",
        *drift_section(),
        discussion.read_text() if discussion.exists() else "",
        "",
    ]


def figures() -> list[str]:
    FIGS.mkdir(parents=True, exist_ok=True)
    made = []
    for variant in ("inclora", "inclora-jl", "ella", "ella-jl"):
        res = load(f"o4-{variant}-s0")
        if res is not None:
            title = f"order 4, {variant}, seed 0"
            made += plot_run_figures(res, [], FIGS, f"o4_{variant}", title=title, kinds=("heatmap",))
    for variant in ("inclora-jl", "ella-jl"):
        res = load(f"o4-{variant}-s0")
        if res is not None:
            log = read_jsonl(RUNS / f"o4-{variant}-s0" / "train_log.jsonl")
            made += plot_run_figures(res, log, FIGS, f"o4_{variant}", kinds=("overlap", "training"))
    return [str(Path(p).relative_to(DOCS)) for p in made]


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    return (float(np.mean(vals)), float(np.std(vals))) if vals else (None, None)


def bar_rows(bars: list[dict]) -> list[dict]:
    """table_for's per-method OP/BWT lists → plot_comparison rows (mean and std over runs)."""
    rows = []
    for b in bars:
        row = {"label": b["label"]}
        for metric in ("op", "bwt"):
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(b[metric])
        rows.append(row)
    return rows


def run_bar_charts(bars: list[dict], suffix: str) -> list[Path]:
    """OP and BWT bar charts of table_for's per-method lists, whose spread pools orders and seeds (runs)."""
    return plot_comparison(bar_rows(bars), FIGS, ("op", "bwt"), suffix=suffix, over="runs")


def bar_figures(bars_std: list[dict], bars_long: list[dict]) -> list[str]:
    made = []
    for stream, bars in (("standard", bars_std), ("long", bars_long)):
        made += run_bar_charts(bars, f"_{stream}")
    return [str(Path(p).relative_to(DOCS)) for p in made]


def main() -> None:
    tuned = json.loads(TUNED.read_text()) if TUNED.exists() else {}
    std_table, bars_std = table_for(
        [1, 2, 3], (0, 1, 2), "Standard CL (orders 1–3, 3 seeds on order 1, 1 on orders 2–3)"
    )
    o1_table, _ = table_for([1], (0, 1, 2), "Order 1 only (3 seeds)")
    long_table, bars_long = table_for([4], (0, 1, 2), "Long CL (order 4, 15 tasks, 3 seeds)")
    task_space = []
    for jl in (False, True):
        rows = group_runs(f"o1-inclora{'-jl' if jl else ''}-taskspace", (0, 1, 2))
        if rows:
            task_space.append(
                f"| inclora{' + JumpLoRA' if jl else ''} (task option space) | {len(rows)} | "
                f"{pct([r['op'] for r in rows])} | {pct([r['bwt'] for r in rows])} |"
            )
    figs = figures() + bar_figures(bars_std, bars_long)
    discussion = DOCS / "RESULTS_discussion.md"
    text = [
        "# Results: JumpLoRA on the 15-task CL benchmark, CPU studies",
        "",
        "Why and when the sparse update forgets less (controls at the same density or norm, the density frontier,",
        "function-space interference): [MECHANISM.md](MECHANISM.md). When to use JumpLoRA, in short: the README's",
        "\"When JumpLoRA helps\".",
        "",
        *smollm2_section(),
        "# all-MiniLM-L6-v2 (encoder, option ranking by cosine)",
        "",
        *v2_section(),
        "Generated by `python bench/grid.py tune && python bench/grid.py final && python bench/make_results.py`",
        "(numbers as measured; accuracies in %, mean ± population std over seeds).",
        "",
        "## Setting",
        "",
        "- Model: the packaged all-MiniLM-L6-v2 (22M parameters), encoder family (option ranking by cosine,",
        "  temperature 0.05), adapters on `query,value`, r = 8, α = 32, max 128 tokens.",
        "- Option space: the union of the stream's options (an old input can be answered with a newer task's",
        "  label), plus the task's own options for order 1 as a comparison.",
        f"- Budgets per task, the same for every method: standard orders {STANDARD_BUDGET}, long order",
        f"  {LONG_BUDGET}; batch 16, AdamW, warm-up 6 % then constant LR. Tuning: {TUNE_BUDGET} on dev splits.",
        f"- Hyper-parameters after tuning: `{json.dumps(tuned)}`.",
        "",
        "## Hyper-parameter search (dev splits of dbpedia, amazon, agnews; seed 0)",
        "",
        tuning_table(),
        "## Final numbers (test splits)",
        "",
        zero_shot_line([1, 2, 3], (0, 1, 2)),
        std_table,
        o1_table,
        "Task option space, order 1 (the failure mode of generative models cannot happen here):",
        "",
        "| method | runs | OP | BWT |",
        "|---|---|---|---|",
        *(task_space or ["| not run yet | | | |"]),
        "",
        long_table,
        "## Figures",
        "",
        *[f"![{Path(f).stem}]({f})" for f in figs],
        "",
        discussion.read_text() if discussion.exists() else "",
    ]
    (DOCS / "RESULTS.md").write_text("\n".join(text))
    print(f"wrote {DOCS / 'RESULTS.md'} with {len(figs)} figures")


if __name__ == "__main__":
    main()
