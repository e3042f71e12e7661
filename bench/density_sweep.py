"""Density-control sweep: task length (≈10 → 200 optimizer steps) × mode, on dev splits; resumable.

Each run is `jumplora run --order 1 --strategy inclora` on the packaged MiniLM with ``--eval-split dev``;
a run whose ``results.json`` says ``complete`` is skipped, so the script can be stopped and restarted.
Outputs: ``bench/runs/density_sweep/<name>/`` and the summary table ``docs/density_sweep.md``.

    python bench/density_sweep.py --jobs 2            # run what is missing, then write the table
    python bench/density_sweep.py --only S-dual,L-dual
    python bench/density_sweep.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "runs" / "density_sweep"
TABLE = ROOT / "docs" / "density_sweep.md"

# name -> (max_train, batch_size): optimizer steps per task = max_train / batch_size
LENGTHS = {"S": (160, 16), "M": (200, 4), "L": (400, 4)}
MODES = {
    "dense": ["--dense"],
    "none": ["--jumplora", "--density-control", "none"],
    "dual": ["--jumplora", "--density-control", "dual"],
    "l0": ["--jumplora", "--density-control", "l0"],
}
# Most informative first: if the budget runs out, the tail is what is missing.
PRIORITY = ["S-dual", "S-none", "L-dual", "L-none", "S-dense", "L-dense", "S-l0", "M-dual", "M-none",
            "M-dense", "L-l0", "M-l0"]  # fmt: skip


def command(name: str) -> list[str]:
    length, mode = name.split("-")
    max_train, batch = LENGTHS[length]
    return [
        sys.executable, "-m", "jumplora.cli", "run", "--order", "1", "--strategy", "inclora",
        "--eval-split", "dev", "--max-train", str(max_train), "--batch-size", str(batch), "--max-eval", "100",
        "--threads", "1", "--quiet", "--overwrite", "--out", str(OUT / name), *MODES[mode],
    ]  # fmt: skip


def finished(name: str) -> bool:
    path = OUT / name / "results.json"
    return path.exists() and json.loads(path.read_text()).get("complete", False)


def run(name: str) -> None:
    if finished(name):
        return
    (OUT / name).mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{name}.log", "w") as log:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # this checkout's jumplora, not an installed one
        rc = subprocess.run(command(name), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    print(f"{name}: exit {rc}", flush=True)


def task_targets(name: str) -> dict[str, float | None]:
    """Each task's target density (last train_log record of the task), None for dense runs."""
    targets: dict[str, float | None] = {}
    log = OUT / name / "train_log.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        record = json.loads(line)
        targets[record["task"]] = record.get("target_density")
    return targets


def _op_bwt(matrix: list[list[float]]) -> tuple[float, float]:
    """OP and BWT over the tasks done so far (rows of R = tasks trained, columns = tasks evaluated)."""
    k = len(matrix)
    op = sum(matrix[-1][:k]) / k
    bwt = sum(matrix[-1][i] - matrix[i][i] for i in range(k - 1)) / (k - 1) if k > 1 else 0.0
    return op, bwt


def row(name: str) -> str | None:
    path = OUT / name / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if not results.get("accuracy_matrix"):
        return None
    length, mode = name.split("-")
    max_train, batch = LENGTHS[length]
    targets = task_targets(name)
    cells = []
    for task in results["per_task"]:
        target = targets.get(task["task"])
        if mode == "dense" or target is None:
            cells.append("1")
        else:
            cells.append(f"{task['density']:.3f}/{target:.3f} ({task['density'] / target:.1f}×)")
    op, bwt = _op_bwt(results["accuracy_matrix"])
    done = "" if results.get("complete") else f" (partial: {results['tasks_done']}/{len(results['tasks'])} tasks)"
    return (f"| {max_train // batch} | {mode}{done} | {100 * op:.1f} | {100 * bwt:.1f} | "
            f"{' · '.join(cells)} | {results['wall_time_s']:.0f} |")  # fmt: skip


def write_table() -> None:
    lines = [
        "# Density-control sweep (dev splits)",
        "",
        "`python bench/density_sweep.py`: order 1 (4 tasks), IncLoRA, packaged all-MiniLM-L6-v2, seed 0,",
        "`--eval-split dev --max-eval 100 --threads 1`, ramp 0.2 → 0.8. Steps/task = max-train / batch size",
        "(S 160/16, M 200/4, L 400/4). Density cells: final density / target (ratio) per task, in stream order.",
        "",
        "| steps/task | mode | dev OP | dev BWT | final density / target per task | wall s |",
        "|---|---|---|---|---|---|",
    ]
    names = sorted(PRIORITY, key=lambda n: ("SML".index(n[0]), list(MODES).index(n.split("-")[1])))
    lines += [r for r in map(row, names) if r is not None]
    missing = [n for n in PRIORITY if row(n) is None]
    if missing:
        lines += ["", f"Not run (CPU budget): {', '.join(missing)}."]
    notes = TABLE.read_text().partition("\n## Notes")[1:] if TABLE.exists() else ("", "")
    TABLE.write_text("\n".join(lines) + "\n" + "".join(notes))  # hand-written notes survive a re-run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default=None, help="Comma-separated run names (default: all, by priority).")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        names = args.only.split(",") if args.only else PRIORITY
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, names))
    write_table()


if __name__ == "__main__":
    main()
