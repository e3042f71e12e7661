"""The mechanism study of issue 25 on MiniLM: why and when a sparse update forgets less (dev splits).

IncLoRA, order 1, 100 optimizer steps per task (400 train items, batch 4: density_sweep.py's "L"),
100 dev items per task, fp32, one thread, answers and gold-answer NLL saved per item. Settings:

- ``dense``, ``dual`` (the default: held at the LoRA budget), ``l0``;
- controls at the final density of the ``l0`` run of the same seed (the mean over its tasks): ``random``
  and ``posthoc`` (a random / largest-|ΔW| support of the densely trained update), ``normmatch`` (the dense
  update scaled to its top-k part's norm), ``thetapath`` (``dual`` whose target falls over the ramp from the
  budget to that density) against ``dualflat`` (``dual`` held flat at it);
- the density frontier: ``dual`` at 0.25, 0.5, 1, 2, 10 and 25 % (the budget is ``dual``, 100 % ``dense``).

Seed 0 of the headline settings first, then seeds 1-2, then the frontier: a grid stopped early still
answers the main question. A run whose results.json says complete is skipped; one stopped mid-way
resumes from its checkpoint (bench/grid.py's ``run_one``).

    python bench/mechanism.py run                      # what is missing, in order
    python bench/mechanism.py list                     # every run, its status and options
    python bench/mechanism.py collect --source DIR --commit   # copy DIR's finished runs here (migrated), commit
    python bench/mechanism.py doc                      # docs/MECHANISM.md tables + the frontier figure
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # bench/ is not a package
from migrate_runs import CONFIG_FILE, RESULTS_FILE, MigrationError, dump, migrate_results, read_json

ROOT = grid.ROOT
RUNS = grid.STUDIES / "runs_mechanism"
#: Where a grid checkout keeps these runs: studies/ today, bench/ in checkouts made before the move.
SOURCE_FOLDERS = ("studies/runs_mechanism", "bench/runs_mechanism")
BASE = {
    "order": 1, "strategy": "inclora", "eval_split": "dev", "max_train": 400, "batch_size": 4, "max_eval": 100,
    "mixed_precision": "no", "save_predictions": True,
}  # fmt: skip
SEEDS = (0, 1, 2)
SETTINGS: dict[str, dict] = {
    "dense": {},
    "dual": {"jumplora": True},
    "l0": {"jumplora": True, "density_control": "l0"},
    "random": {"merge_mask": "random"},
    "posthoc": {"merge_mask": "posthoc-topk"},
    "normmatch": {"norm_match": True},
    "thetapath": {"jumplora": True, "target_path": "falling"},
    "dualflat": {"jumplora": True},
}
#: Settings whose target density is the final density of the same seed's l0 run.
MATCHED = ("random", "posthoc", "normmatch", "thetapath", "dualflat")
FRONTIER = (0.0025, 0.005, 0.01, 0.02, 0.10, 0.25)
#: What a collected run keeps: no checkpoints, no plots.
KEPT = ("results.json", "config.json", "train_log.jsonl", "predictions")
DOC = ROOT / "docs" / "MECHANISM.md"
FIGURE = ROOT / "docs" / "results" / "mechanism_frontier_minilm.png"
# (A, B, the question B − A answers), most central first.
COMPARISONS = (
    ("dense", "dual", "does the default sparse update forget less than dense?"),
    ("dense", "l0", "does l0 forget less than dense?"),
    ("dual", "l0", "l0 against the default"),
    ("dualflat", "l0", "l0 against dual held at l0's final density: is it the density alone?"),
    ("dualflat", "thetapath", "the path of θ: a target falling over the ramp against a flat one"),
    ("posthoc", "l0", "learned θ and ramp against post-hoc top-k at the same density"),
    ("random", "posthoc", "which entries: magnitude top-k against random, same density"),
    ("normmatch", "posthoc", "sparse against dense at the same norm"),
    ("dense", "normmatch", "only a smaller update? dense scaled down to the top-k norm"),
)


def frontier_setting(density: float) -> str:
    return f"dual-d{100 * density:g}pct"


def names() -> list[str]:
    """Every run, most informative first."""
    headline = [f"{setting}-s{seed}" for seed in SEEDS for setting in SETTINGS]
    frontier = [f"{frontier_setting(d)}-s{seed}" for seed in SEEDS for d in FRONTIER]
    return headline + frontier


def matched_density(seed: int, root: Path) -> float | None:
    """Mean final density over the tasks of l0's run of this seed (4 significant digits); None until it is done."""
    path = root / f"l0-s{seed}"
    if not grid.is_complete(path):
        return None
    per_task = json.loads((path / "results.json").read_text())["per_task"]
    return float(f"{sum(t['density'] for t in per_task) / len(per_task):.4g}")


def options(name: str, root: Path) -> dict | None:
    """The run's CLI options; None while it waits for the l0 run it is matched to."""
    setting, _, seed_text = name.rpartition("-s")
    seed = int(seed_text)
    opts = {**BASE, "seed": seed}
    if setting in SETTINGS:
        opts |= SETTINGS[setting]
    else:
        density = next(d for d in FRONTIER if frontier_setting(d) == setting)
        return opts | {"jumplora": True, "target_density": density}
    if setting in MATCHED:
        density = matched_density(seed, root)
        if density is None:
            return None
        opts["target_density"] = density
    return opts


def run_all(root: Path, only: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name in names():
        if only not in name:
            continue
        opts = options(name, root)
        if opts is None:
            print(f"{name:24s} waiting for l0-s{name.rpartition('-s')[2]}", flush=True)
            continue
        _, secs, code = grid.run_one(name, opts, root)
        status = "skip" if secs == 0 else ("ok" if code == 0 else f"FAILED ({code}, see {name}.log)")
        print(f"{name:24s} {status:10s} {secs:7.1f}s  total {time.perf_counter() - start:7.1f}s", flush=True)


def list_runs(root: Path) -> None:
    for name in names():
        opts = options(name, root)
        status = "complete" if grid.is_complete(root / name) else "-"
        print(f"{name:24s} {status:9s} {' '.join(grid.to_args(opts)) if opts else 'waits for l0'}")


def source_runs(checkout: Path) -> Path:
    """The grid checkout's folder of mechanism runs (it may run an older commit, with the runs under bench/)."""
    found = [checkout / folder for folder in SOURCE_FOLDERS if (checkout / folder).is_dir()]
    if not found:
        raise MigrationError(f"{checkout}: holds neither {' nor '.join(SOURCE_FOLDERS)}")
    return found[0]


def _migrated(run: Path) -> dict:
    """A source run's results at schema 2: a grid at an older commit writes an older schema."""
    path = run / RESULTS_FILE
    return migrate_results(read_json(path), str(path))


def _recorded(run: Path) -> dict | None:
    path = run / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def collect(source: Path, commit: bool) -> list[str]:
    """Copy the source grid's complete runs (KEPT files only) that are new or changed here, migrated to
    results schema 2. Every run is migrated before anything is copied: one that cannot be is refused
    (MigrationError) with nothing written; the source is only read."""
    new = {name: _migrated(source / name) for name in names() if grid.is_complete(source / name)}
    new = {name: results for name, results in new.items() if results != _recorded(RUNS / name)}
    for name, results in new.items():
        src, dst = source / name, RUNS / name
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for item in KEPT:
            if item in (RESULTS_FILE, CONFIG_FILE):
                continue
            if (src / item).is_dir():
                shutil.copytree(src / item, dst / item)
            elif (src / item).exists():
                shutil.copy2(src / item, dst / item)
        if (src / CONFIG_FILE).exists():  # the options it was started with: the same config, migrated with it
            (dst / CONFIG_FILE).write_text(dump(results["config"]))
        (dst / RESULTS_FILE).write_text(dump(results))
    copied = list(new)
    if commit and copied:
        grid_commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, check=True).stdout.strip()  # fmt: skip
        done = sum(grid.is_complete(RUNS / n) for n in names())
        message = f"Mechanism grid (grid commit {grid_commit}): {', '.join(copied)} ({done} of {len(names())})"
        subprocess.run(["git", "-C", str(ROOT), "add", str(RUNS)], check=True)
        subprocess.run(["git", "-C", str(ROOT), "commit", "-q", "-m", message], check=True)
    return copied


def _complete(root: Path) -> dict[str, dict]:
    from jumplora.metrics.report import load_results

    return {name: load_results(root / name) for name in names() if grid.is_complete(root / name)}


def _setting(name: str) -> tuple[str, int]:
    setting, _, seed = name.rpartition("-s")
    return setting, int(seed)


def comparison_lines(done: dict[str, dict]) -> list[str]:
    """One markdown table per comparison, over the seeds where both settings are complete."""
    from jumplora.metrics.compare import compare, format_comparison

    lines = []
    for a, b, question in COMPARISONS:
        seeds = [s for s in SEEDS if f"{a}-s{s}" in done and f"{b}-s{s}" in done]
        lines += [f"### {b} − {a}: {question}", ""]
        if not seeds:
            lines += ["Not run yet.", ""]
            continue
        result = compare([done[f"{a}-s{s}"] for s in seeds], [done[f"{b}-s{s}"] for s in seeds])
        lines += [line.replace(str(RUNS) + "/", "") for line in format_comparison(result, "markdown").splitlines()]
        lines.append("")
    return lines


def frontier_points(done: dict[str, dict]) -> list[dict]:
    """One point per complete run: its mean final density and the frontier's measures; a setting's seeds are
    one group (the plot's line goes through the groups' means)."""
    from jumplora.metrics.compare import measures_from_matrices, run_matrices

    points = []
    for name, res in done.items():
        setting, seed = _setting(name)
        series = "dual (target swept)" if setting.startswith("dual-d") or setting == "dual" else setting
        densities = [t["density"] for t in res["per_task"]]
        measures = {k: float(v) for k, v in measures_from_matrices(*run_matrices(res)).items()}
        points.append({"series": series, "group": setting, "seed": seed, "density": sum(densities) / len(densities),
                       **measures})  # fmt: skip
    return points


def summary_lines(done: dict[str, dict]) -> list[str]:
    lines = ["| setting | seeds | OP | BWT | L final | L BWT | final density (mean over tasks) | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    by_setting: dict[str, list[dict]] = {}
    for point, name in zip(frontier_points(done), done, strict=True):
        by_setting.setdefault(_setting(name)[0], []).append(point | {"wall": done[name]["wall_time_s"]})
    for setting, points in by_setting.items():
        keys = ("op", "bwt", "nll_final", "nll_bwt", "density", "wall")
        mean = {k: sum(p[k] for p in points) / len(points) for k in keys}
        seeds = ",".join(str(p["seed"]) for p in points)
        lines.append(f"| {setting} | {seeds} | {100 * mean['op']:.1f} | {100 * mean['bwt']:.1f} | "
                     f"{mean['nll_final']:.3f} | {mean['nll_bwt']:+.3f} | {100 * mean['density']:.2f} % | "
                     f"{mean['wall']:.0f} |")  # fmt: skip
    return lines


#: Pairs whose interference is compared: the sparse update against dense, and at the same norm.
INTERFERENCE_PAIRS = (("dense", "dual"), ("dense", "l0"), ("normmatch", "posthoc"), ("dense", "normmatch"))


def interference_lines(done: dict[str, dict]) -> list[str]:
    """Function-space interference (jumplora.metrics.interference) per setting, and paired per seed."""
    from jumplora.metrics.interference import interference

    def measure(res: dict) -> dict:
        tasks = res["per_task"]
        return interference(res["nll_matrix"], [t.get("update_norm") for t in tasks],
                            [t.get("kept_entries") for t in tasks])  # fmt: skip

    by = {name: measure(res) for name, res in done.items()}
    lines = ["| setting | seeds | ΔL per later task (nats) | per unit ‖U‖_F | per 10⁶ kept entries |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    settings: dict[str, list[str]] = {}
    for name in done:
        settings.setdefault(_setting(name)[0], []).append(name)
    for setting, runs in settings.items():
        cells = []
        for key in ("increase", "per_norm", "per_million_entries"):
            values = [by[r][key] for r in runs]
            cells.append("not recorded" if None in values else f"{sum(values) / len(values):+.4f}")
        lines.append(f"| {setting} | {','.join(str(_setting(r)[1]) for r in runs)} | {' | '.join(cells)} |")
    lines += ["", "Paired, B − A of ΔL per later task (nats; each seed, then the mean over the n pairs):", ""]
    for a, b in INTERFERENCE_PAIRS:
        seeds = [s for s in SEEDS if f"{a}-s{s}" in by and f"{b}-s{s}" in by]
        diffs = [by[f"{b}-s{s}"]["increase"] - by[f"{a}-s{s}"]["increase"] for s in seeds]
        per_seed = ", ".join(f"s{s} {d:+.3f}" for s, d in zip(seeds, diffs, strict=True))
        mean = f"mean {sum(diffs) / len(diffs):+.3f} over {len(diffs)} pair(s)" if diffs else "not run yet"
        lines.append(f"- {b} − {a}: {per_seed or '—'}; {mean}")
    return lines


#: Seed-0 runs made again from a later commit that records each task's ‖U‖_F and kept entries (the grid's
#: commit did not): the per-unit interference comes from them, where they reproduce the grid's run.
NORM_RUNS = grid.STUDIES / "runs_mechanism_norms"


def norm_rerun_lines(done: dict[str, dict]) -> list[str]:
    """Interference per unit of update from the re-runs, each checked against the grid's run of its name."""
    from jumplora.metrics.interference import interference
    from jumplora.metrics.report import load_results

    runs = sorted(p for p in NORM_RUNS.iterdir() if grid.is_complete(p)) if NORM_RUNS.is_dir() else []
    lines = ["| run | same R and L as the grid's | ΔL per later task | per unit ‖U‖_F | per 10⁶ kept entries | "
             "mean ‖U_i‖_F | mean kept entries |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for run in runs:
        res, twin = load_results(run), done.get(run.name)
        same = twin is not None and all(res[k] == twin[k] for k in ("accuracy_matrix", "nll_matrix"))
        tasks = res["per_task"]
        norms, kept = [t["update_norm"] for t in tasks], [t["kept_entries"] for t in tasks]
        got = interference(res["nll_matrix"], norms, kept)
        lines.append(f"| {run.name} | {'yes' if same else 'NO'} | {got['increase']:+.4f} | {got['per_norm']:+.4f} | "
                     f"{got['per_million_entries']:+.3f} | {sum(norms) / len(norms):.3f} | "
                     f"{sum(kept) / len(kept):,.0f} |")  # fmt: skip
    return lines if runs else ["(no re-runs yet)"]


def write_doc(root: Path) -> None:
    """docs/MECHANISM.md's generated part and the frontier figure; the hand-written notes below survive."""
    from jumplora.metrics.plots import plot_frontier

    done = _complete(root)
    lines = [
        "# Why and when a sparse update forgets less (issue 25): MiniLM",
        "",
        "Generated by `python bench/mechanism.py doc` from studies/runs_mechanism/ (bench/mechanism.py says what",
        "each setting is). IncLoRA, order 1, 100 optimizer steps per task, 100 dev items per task, fp32, one",
        f"thread. {len(done)} of {len(names())} runs complete. Means over the complete seeds; L is the mean",
        "gold-answer NLL (nats); L BWT > 0 means the old tasks' gold answers became less likely.",
        "",
        *summary_lines(done),
        "",
        "## Paired differences (B − A, same seeds and items)",
        "",
        "OP/BWT/FWT in points, L in nats. CI items: the eval items resampled (the same for A and B); CI seeds:",
        "the pairs resampled; CI both: both (the one to quote). 'within noise': the widest interval holds 0.",
        "",
        *comparison_lines(done),
        "## Function-space interference (issue 25, item 6)",
        "",
        "ΔL: how much each later task's merged update raised the earlier tasks' gold NLL (L[i][j] − L[i−1][j],",
        "j < i, averaged), raw and per unit of the update's Frobenius norm / per million kept entries (recorded",
        "by runs from this commit on; the grid's runs predate it). Parameter isolation should lower it per unit.",
        "",
        *interference_lines(done),
        "",
        "Per unit of update: seed-0 runs made again at a later commit that records ‖U_i‖_F and the kept entries",
        f"({Path(os.path.relpath(NORM_RUNS, ROOT)).as_posix()}/; the mean over later tasks i ≥ 1 of ΔL_i / ‖U_i‖_F and",
        "ΔL_i per 10⁶ entries of U_i; the norm and kept columns are means over all four tasks).",
        "",
        *norm_rerun_lines(done),
        "",
    ]
    if done:
        plot_frontier(frontier_points(done), FIGURE, "MiniLM, order 1, 100 steps/task (dev)")
        lines += ["## Density frontier", "", f"![frontier]({FIGURE.relative_to(DOC.parent).as_posix()})", ""]
    notes = DOC.read_text().partition("\n## Notes")[1:] if DOC.exists() else ("", "")
    DOC.write_text("\n".join(lines) + "".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "list", "collect", "doc"))
    parser.add_argument("--only", default="", help="run only names containing this string")
    parser.add_argument("--source", type=Path, help="collect: the grid checkout whose mechanism runs to copy")
    parser.add_argument("--commit", action="store_true", help="collect: commit the copied runs")
    args = parser.parse_args()
    if args.action == "run":
        run_all(RUNS, args.only)
    elif args.action == "list":
        list_runs(RUNS)
    elif args.action == "doc":
        write_doc(RUNS)
    else:
        if args.source is None:
            parser.error("collect needs --source")
        try:
            copied = collect(source_runs(args.source.resolve()), args.commit)
        except MigrationError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        print(f"copied {len(copied)}: {', '.join(copied)}" if copied else "nothing new")


if __name__ == "__main__":
    main()
