"""Density-control sweep: task length (10 → 200 optimizer steps) × mode, on dev splits; resumable.

Two models. The packaged MiniLM runs `jumplora run --order 1 --strategy inclora --eval-split dev` (names
``S-dual``, …). SmolLM2-135M runs dense-probe settings of bench/grid.py (dbpedia, amazon, agnews; dev;
48 items per task; names ``smol-S-dual``, …). A run whose ``results.json`` says ``complete`` is skipped,
so the script can be stopped and restarted. Outputs: ``studies/runs/density_sweep/<name>/`` and the
summary table ``docs/density_sweep.md``.

    python bench/density_sweep.py --jobs 2            # run what is missing, then write the table
    python bench/density_sweep.py --only S-dual,smol-L-dual
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
OUT = ROOT / "studies" / "runs" / "density_sweep"
TABLE = ROOT / "docs" / "density_sweep.md"

# Task length → options; optimizer steps per task = max_train × epochs / batch size.
MINILM_LENGTHS = {
    "S": ["--max-train", "160", "--batch-size", "16"],  # 10 steps
    "M": ["--max-train", "200", "--batch-size", "4"],  # 50 steps
    "L": ["--max-train", "400", "--batch-size", "4"],  # 100 steps
    "XL": ["--max-train", "800", "--batch-size", "4"],  # 200 steps
}
MINILM = ["--order", "1", "--max-eval", "100"]
SMOL_LENGTHS = {
    "S": ["--max-train", "80", "--epochs", "1"],  # 10 steps
    "L": ["--max-train", "160", "--epochs", "3"],  # 60 steps: the SmolLM2 study budget
}
SMOL = ["--model", "smollm2-135m", "--tasks", "dbpedia,amazon,agnews", "--max-eval", "48", "--batch-size", "8",
        "--eval-batch-size", "16", "--lr", "1e-3", "--r", "8", "--lora-alpha", "32"]  # fmt: skip
STEPS = {"S": 10, "M": 50, "L": 100, "XL": 200, "smol-S": 10, "smol-L": 60}
MODES = {
    "dense": ["--dense"],
    "none": ["--jumplora", "--density-control", "none"],
    "dual": ["--jumplora", "--density-control", "dual"],
    "l0": ["--jumplora", "--density-control", "l0"],
    # dual held at 1 % instead of the LoRA budget (≈ 4 %): the density `l0` ends at on its own
    "dual1pct": ["--jumplora", "--density-control", "dual", "--target-density", "0.01"],
}
# Runs identical to one done elsewhere (same options and seed): the table reads that run.
REUSED = {"smol-L-dense": ROOT / "studies" / "runs_smollm2" / "probe-lr1e-3-e3"}
# Most informative first: if the budget runs out, the tail is what is missing.
PRIORITY = ["S-dual", "S-none", "L-dual", "L-none", "S-dense", "L-dense", "S-l0", "L-l0", "XL-none", "XL-dual",
            "smol-L-dense", "smol-L-none", "smol-L-dual", "smol-S-none", "smol-S-dual", "smol-S-dense",
            "S-dual1pct", "L-dual1pct", "XL-dense", "M-dual", "M-none", "M-dense", "XL-l0", "M-l0"]  # fmt: skip


def split(name: str) -> tuple[str, str]:
    """'smol-L-dual' → ('smol-L', 'dual')."""
    length, _, mode = name.rpartition("-")
    return length, mode


def command(name: str) -> list[str]:
    length, mode = split(name)
    if length.startswith("smol-"):
        setting = SMOL + SMOL_LENGTHS[length.removeprefix("smol-")]
    else:
        setting = MINILM + MINILM_LENGTHS[length]
    return [
        sys.executable, "-m", "jumplora.cli", "run", "--strategy", "inclora", "--eval-split", "dev", "--seed", "0",
        *setting, "--threads", "1", "--quiet", "--overwrite", "--out", str(OUT / name), *MODES[mode],
    ]  # fmt: skip


def run_dir(name: str) -> Path:
    return REUSED.get(name, OUT / name)


def finished(name: str) -> bool:
    path = run_dir(name) / "results.json"
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
    log = run_dir(name) / "train_log.jsonl"
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
    path = run_dir(name) / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if not results.get("accuracy_matrix"):
        return None
    length, mode = split(name)
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
    model = "SmolLM2-135M" if length.startswith("smol-") else "MiniLM"
    reused = f" (= {run_dir(name).name})" if name in REUSED else ""
    return (f"| {model} | {STEPS[length]} | {mode}{reused}{done} | {100 * op:.1f} | {100 * bwt:.1f} | "
            f"{' · '.join(cells)} | {results['wall_time_s']:.0f} |")  # fmt: skip


def write_table() -> None:
    lines = [
        "# Density-control sweep (dev splits)",
        "",
        "`python bench/density_sweep.py`, IncLoRA, seed 0, `--eval-split dev --threads 1`, the paper's ramp",
        "0.2 → 0.8. Steps/task = max-train × epochs / batch size.",
        "- **MiniLM** (packaged all-MiniLM-L6-v2): order 1 (4 tasks), 100 dev items per task; S 160/16,",
        "  M 200/4, L 400/4, XL 800/4 (max-train / batch size).",
        "- **SmolLM2-135M-Instruct** (generative, exact match): dbpedia, amazon, agnews (yahoo's dev split is its",
        "  train split), 48 dev items per task, batch 8, lr 1e-3; S 80 × 1 epoch, L 160 × 3 epochs (the study",
        "  budget). Its dense L row is the budget probe of bench/grid.py, run with the same options.",
        "",
        "Density cells: final density / target (ratio) per task, in stream order.",
        "",
        "| model | steps/task | mode | dev OP | dev BWT | final density / target per task | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    order = list(STEPS)
    names = sorted(PRIORITY, key=lambda n: (order.index(split(n)[0]), list(MODES).index(split(n)[1])))
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
