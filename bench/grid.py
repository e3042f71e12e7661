"""The CPU study of issue 4: hyper-parameter search on dev splits, then the final grid on test splits.

    python bench/grid.py tune            # dev-split search (order-1 tasks without yahoo), ~15 min
    python bench/grid.py final           # the grid: orders 1-3 and 4, every strategy ±JumpLoRA
    python bench/grid.py v2              # the grid again with the density-controlled defaults (issue 10)
    python bench/grid.py drift           # MiniLM order 1 IncLoRA ±JumpLoRA again, answers saved
    python bench/grid.py v2-ella-past    # MiniLM ELLA + JumpLoRA with a dense W_past (orders 1-3)
    python bench/grid.py smollm2-probe   # SmolLM2-135M: the budget at which dense IncLoRA forgets (dev)
    python bench/grid.py smollm2-tune    # SmolLM2-135M: ELLA and O-LoRA λ on dev at that budget
    python bench/grid.py smollm2         # SmolLM2-135M: the generative study at that budget (issue 11)
    python bench/grid.py smollm2-ella-past  # SmolLM2-135M: ELLA + JumpLoRA, W_past merged or dense (dev, order 1)
    python bench/grid.py smollm2-long    # SmolLM2-135M: long order 4 (≈ 3-4 h a run on CPU; bench/gpu.sh generative)
    python bench/make_results.py         # docs/RESULTS.md + docs/results/*.png from studies/runs*/

Every run is a `jumplora run` subprocess with ``THREADS_PER_RUN`` torch threads (``--threads-per-run``;
1: measured in bench/speed.py --precision, one 2-thread process ran 0.2-0.4x as fast as a 1-thread one on
this shared 2-core machine, so two 1-thread runs side by side give more runs per hour; docs/PERFORMANCE.md
"bf16 on CPU"); ``--workers`` run side by side (cores ÷ threads per run: 2 here).
``--mixed-precision`` is passed to every run: ``no`` (fp32, the default here) is what every committed
study ran and what their checkpoints resume with; ``bf16`` runs a new study faster on a CPU with native
bf16 (docs/PERFORMANCE.md, "bf16 on CPU"). A run whose ``results.json`` says ``"complete": true`` is
skipped, so the grid can be stopped and continued; a run stopped mid-way resumes from its checkpoint.
Run directories keep only results.json and train_log.jsonl once done (checkpoints are deleted) so they
can be committed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The committed studies: run folders (results schema 2, bench/migrate_runs.py) and what tuning chose.
STUDIES = ROOT / "studies"
RUNS = STUDIES / "runs"
TUNED = STUDIES / "tuned.json"

STRATEGIES = ("seqlora", "inclora", "ella", "olora")
# Budgets, the same for every method (per task): examples for training / evaluation, epochs.
STANDARD_BUDGET = {"max_train": 192, "max_eval": 100, "epochs": 1}
LONG_BUDGET = {"max_train": 64, "max_eval": 20, "epochs": 1, "batch_size": 8}  # 8 steps per task
TUNE_BUDGET = {"max_train": 192, "max_eval": 100, "epochs": 1}
TUNE_TASKS = "dbpedia,amazon,agnews"  # order 1 without yahoo, whose dev split is its train split

# Defaults before tuning: what the search starts from.
BASE = {"lr": 1e-3, "batch_size": 16, "r": 8, "lora_alpha": 32}
JUMP_BASE = {"bandwidth": 1e-3, "sparsify_start": 0.2, "sparsify_end": 0.8, "threshold_param": "log"}
# Reference rows are runners, not strategies.
RUNNER_NAMES = ("multitask", "independent")


def with_args(opts: dict, **strategy_args) -> dict:
    """``opts`` with more strategy arguments (``--strategy-arg name=value``) beside the ones it has."""
    return {**opts, "strategy_args": {**opts.get("strategy_args", {}), **strategy_args}}


def tuning_runs() -> dict[str, dict]:
    """name → CLI options. Each axis is searched around the defaults (not a full product)."""
    runs: dict[str, dict] = {}
    for lr in (1e-3, 3e-3):
        runs[f"tune-inclora-lr{lr:g}"] = {"strategy": "inclora", "lr": lr}
        runs[f"tune-inclora-jl-lr{lr:g}"] = {"strategy": "inclora", "jumplora": True, "lr": lr}
    for bw in (1e-4, 1e-2):
        runs[f"tune-inclora-jl-bw{bw:g}"] = {"strategy": "inclora", "jumplora": True, "bandwidth": bw}
    # Tasks here are short (12 optimizer steps): ΔW keeps growing after the budget-matched θ init while
    # θ barely moves, so the ramp's position decides the final density. Search it.
    for start, end in ((0.5, 0.9), (0.7, 0.9), (0.8, 1.0)):
        runs[f"tune-inclora-jl-sched{start:g}-{end:g}"] = {
            "strategy": "inclora",
            "jumplora": True,
            "sparsify_start": start,
            "sparsify_end": end,
        }
    runs["tune-inclora-jl-direct"] = {"strategy": "inclora", "jumplora": True, "threshold_param": "direct"}
    for lam in (1e2, 1e4, 1e6, 1e8):  # the update scale of MiniLM differs from T5's
        runs[f"tune-ella-lam{lam:g}"] = {"strategy": "ella", "strategy_args": {"lam": lam}}
    for lam in (0.1, 1.0):
        runs[f"tune-olora-lam{lam:g}"] = {"strategy": "olora", "strategy_args": {"lam_orth": lam}}
    for name, opts in runs.items():
        opts.update({"tasks": TUNE_TASKS, "eval_split": "dev", "seed": 0, **TUNE_BUDGET})
        runs[name] = {**BASE, **(JUMP_BASE if opts.get("jumplora") else {}), **opts}
    return runs


def method(strategy: str) -> dict:
    """The options naming a method: a strategy, or a reference runner (multitask, independent)."""
    return {"runner": strategy} if strategy in RUNNER_NAMES else {"strategy": strategy}


def _opts(tuned: dict, strategy: str, jump: bool, order: int, seed: int, budget: dict, **extra) -> dict:
    opts = {**BASE, **tuned.get("common", {}), **method(strategy), "order": order, "seed": seed, **budget}
    opts.update(tuned.get(strategy, {}))
    if jump:
        opts.update({"jumplora": True, **JUMP_BASE, **tuned.get("jumplora", {})})
    return {**opts, **extra}


def final_runs(tuned: dict) -> dict[str, dict]:
    """The grid, most informative runs first so that an interrupted grid still answers the headline."""
    runs: dict[str, dict] = {}

    def add(strategy: str, jump: bool, order: int, seed: int, suffix: str = "", **extra) -> None:
        budget = LONG_BUDGET if order >= 4 else STANDARD_BUDGET
        name = f"o{order}-{strategy}{'-jl' if jump else ''}{suffix}-s{seed}"
        runs[name] = _opts(tuned, strategy, jump, order, seed, budget, **extra)

    headline = [(s, jl) for s in ("inclora", "ella") for jl in (False, True)]
    others = [(s, jl) for s in ("seqlora", "olora") for jl in (False, True)] + [("multitask", False)]
    for seed in (0, 1, 2):
        for strategy, jump in headline + others:
            add(strategy, jump, 1, seed)
    for seed in (0, 1, 2):
        for strategy, jump in headline:
            add(strategy, jump, 4, seed)
    for order in (2, 3):
        for strategy, jump in headline + others:
            add(strategy, jump, order, 0)
    for seed in (0, 1, 2):  # the task option space beside the stream one, order 1 (issue 4, Fidelity)
        for jump in (False, True):
            add("inclora", jump, 1, seed, suffix="-taskspace", option_space="task")
    for seed in (0, 1, 2):
        for strategy, jump in others:
            add(strategy, jump, 4, seed)
    return runs


# The study with the density-controlled defaults (issue 10): the paper's ramp 0.2 → 0.8 and
# `--density-control dual` to the LoRA budget, no hand-tuned late ramp. Order 4 at a budget where dense
# methods forget (192 train / 100 eval per task), 3 seeds for the headline strategies.
RUNS_V2 = STUDIES / "runs_v2"
V2_BUDGET = {"max_train": 192, "max_eval": 100, "epochs": 1}
V2_TUNED = {"ella": {"strategy_args": {"lam": 1e6}}, "olora": {"strategy_args": {"lam_orth": 1.0}}}  # tuned.json


V2_STANDARD_RUNS = ((1, 0), (1, 1), (1, 2), (2, 0), (3, 0))  # (order, seed) of the headline strategies


def study_name(strategy: str, jump: bool, order: int, seed: int, suffix: str = "") -> str:
    """A study run's directory: o1-inclora-jl-s0 (suffix: a variant, e.g. -taskspace)."""
    return f"o{order}-{strategy}{'-jl' if jump else ''}{suffix}-s{seed}"


def study_run(
    settings: dict, strategy: str, jump: bool, order: int, seed: int, tuned: dict = V2_TUNED
) -> tuple[str, dict]:
    """A run of a study at its defaults (v2 and SmolLM2): its directory name and its options."""
    opts = {**settings, **method(strategy), "order": order, "seed": seed, **tuned.get(strategy, {})}
    if jump:
        opts["jumplora"] = True
    return study_name(strategy, jump, order, seed), opts


# MiniLM's v2 order-1 IncLoRA runs again with their answers saved: what forgotten answers become, beside
# SmolLM2's (same options, same seed, so R should repeat runs_v2's).
RUNS_DRIFT = STUDIES / "runs_drift"


def drift_runs() -> dict[str, dict]:
    return dict(
        study_run({**BASE, **V2_BUDGET, "save_predictions": True}, "inclora", jump, 1, 0) for jump in (False, True)
    )


def v2_runs() -> dict[str, dict]:
    """Most informative first: a grid stopped early still answers the headline."""
    runs: dict[str, dict] = {}

    def add(strategy: str, jump: bool, order: int, seed: int) -> None:
        name, opts = study_run({**BASE, **V2_BUDGET}, strategy, jump, order, seed)
        runs[name] = opts

    # The README's main command as a user runs it (every default), and the same with --dense.
    runs["main-inclora-jl"] = {"order": 1, "strategy": "inclora", "jumplora": True}
    runs["main-inclora"] = {"order": 1, "strategy": "inclora"}
    runs["main-inclora-none"] = {"order": 1, "strategy": "inclora", "jumplora": True, "density_control": "none"}
    headline = [(s, jl) for s in ("inclora", "ella") for jl in (False, True)]
    others = [(s, jl) for s in ("seqlora", "olora") for jl in (False, True)] + [("multitask", False)]
    for order, seed in ((1, 0), (4, 0), (1, 1), (1, 2), (2, 0), (3, 0), (4, 1), (4, 2)):
        for strategy, jump in headline:
            add(strategy, jump, order, seed)
    for order in (1, 2, 3):
        for strategy, jump in others:
            add(strategy, jump, order, 0)
    return runs


def v2_ella_past_runs() -> dict[str, dict]:
    """MiniLM's ELLA + JumpLoRA again with a dense W_past, beside runs_v2's (merged) on the same orders and seeds."""
    return {
        study_name("ella", True, o, s, "-pastdense"): with_args(study_run({**BASE, **V2_BUDGET}, "ella", True, o, s)[1],
                                                                past="dense")
        for o, s in V2_STANDARD_RUNS
    }  # fmt: skip


# The generative study (issue 11): SmolLM2-135M-Instruct answers in free text, scored by exact match.
# First a budget search on dev splits (dense IncLoRA must forget measurably), then the grid at that budget.
RUNS_SMOL = STUDIES / "runs_smollm2"
SMOL_BASE = {
    "model": "smollm2-135m", "batch_size": 8, "eval_batch_size": 16, "r": 8, "lora_alpha": 32, "save_predictions": True,
}  # fmt: skip
SMOL_PROBE_TASKS = TUNE_TASKS  # dev splits; yahoo's dev split is its train split
SMOL_PROBES = {  # name → (lr, max_train, epochs): optimizer steps per task = max_train * epochs / 8
    "probe-lr3e-3-e1": (3e-3, 160, 1),
    "probe-lr1e-3-e3": (1e-3, 160, 3),
    "probe-lr3e-3-e3": (3e-3, 160, 3),
}


def smollm2_probe_runs() -> dict[str, dict]:
    """Dense IncLoRA at growing budgets: where does the generative model start to forget?"""
    return {
        name: {**SMOL_BASE, "strategy": "inclora", "tasks": SMOL_PROBE_TASKS, "eval_split": "dev", "lr": lr,
               "max_train": n, "epochs": epochs, "max_eval": 48, "seed": 0}
        for name, (lr, n, epochs) in SMOL_PROBES.items()
    }  # fmt: skip


# The study budget: the cheapest probe at which dense IncLoRA forgets measurably (60 steps per task: dev
# BWT -13.5, forgetting 16.7; at 20 steps it barely learns or forgets; docs/RESULTS.md, SmolLM2 section).
SMOL_BUDGET = {"lr": 1e-3, "max_train": 160, "epochs": 3, "max_eval": 48}


# The strategies' λ on SmolLM2's dev splits at the study budget. MiniLM's values are the centre: ELLA's
# penalty there is ≈ 10 % of the task loss on SmolLM2 (≈ 20 % on MiniLM), so one step either side is enough.
SMOL_TUNING = {"ella": ("lam", (1e5, 1e6, 1e7)), "olora": ("lam_orth", (0.1, 1.0))}
SMOL_TUNED = STUDIES / "tuned_smollm2.json"


def smollm2_tuning_runs() -> dict[str, dict]:
    """ELLA and O-LoRA λ on dev (dbpedia, amazon, agnews); dense IncLoRA there is probe-lr1e-3-e3."""
    runs = {}
    for strategy, (key, values) in SMOL_TUNING.items():
        for value in values:
            runs[f"tune-{strategy}-lam{value:g}"] = {
                **SMOL_BASE, **SMOL_BUDGET, "strategy": strategy, "strategy_args": {key: value},
                "tasks": SMOL_PROBE_TASKS, "eval_split": "dev", "seed": 0,
            }  # fmt: skip
    return runs


def choose_smollm2_tuned() -> dict | None:
    """Each strategy's λ with the best dev OP (then BWT), written to studies/tuned_smollm2.json once all ran."""
    runs = smollm2_tuning_runs()
    if not all(is_complete(RUNS_SMOL / name) for name in runs):
        return None
    chosen: dict = {"_comment": "Best dev OP, then BWT, by bench/grid.py smollm2-tune; see docs/RESULTS.md."}
    for strategy, (key, _) in SMOL_TUNING.items():
        tried = {name: opts for name, opts in runs.items() if opts["strategy"] == strategy}
        metrics = {name: json.loads((RUNS_SMOL / name / "results.json").read_text())["metrics"] for name in tried}
        best = max(tried, key=lambda name: (metrics[name]["op"], metrics[name]["bwt"]))
        chosen[strategy] = {"strategy_args": {key: tried[best]["strategy_args"][key]}}
    SMOL_TUNED.write_text(json.dumps(chosen, indent=1) + "\n")
    return chosen


def smollm2_tuned() -> dict[str, dict]:
    """λ chosen on dev (studies/tuned_smollm2.json) where it exists, else MiniLM's."""
    tuned = json.loads(SMOL_TUNED.read_text()) if SMOL_TUNED.exists() else {}
    return {strategy: tuned.get(strategy, V2_TUNED[strategy]) for strategy in V2_TUNED}


SMOL_ORDERS_SEEDS = ((1, 0), (1, 1), (1, 2), (2, 0), (3, 0))  # 3 seeds on order 1, 1 on orders 2-3
SMOL_STRATEGIES = ("inclora", "ella", "seqlora", "olora")  # each dense and + JumpLoRA, then multitask
SMOL_METHODS = [*((s, jl) for s in SMOL_STRATEGIES for jl in (False, True)), ("multitask", False)]


def smollm2_run(strategy: str, jump: bool, order: int, seed: int, ella_past: str | None = None) -> tuple[str, dict]:
    """A run of the SmolLM2 grid; ELLA + JumpLoRA takes W_past as chosen on dev, and its name says which."""
    name, opts = study_run({**SMOL_BASE, **SMOL_BUDGET}, strategy, jump, order, seed, smollm2_tuned())
    if strategy != "ella" or not jump:
        return name, opts
    past = ella_past or smollm2_ella_jl_past()
    suffix = "" if past == "merged" else f"-past{past}"
    return study_name(strategy, jump, order, seed, suffix), with_args(opts, past=past)


def smollm2_run_name(strategy: str, jump: bool, order: int, seed: int) -> str:
    return smollm2_run(strategy, jump, order, seed)[0]


def smollm2_runs() -> dict[str, dict]:
    """Order 1 first (headline strategies, then the rest), then more seeds, then orders 2-3."""
    return dict(smollm2_run(s, jl, order, seed) for order, seed in SMOL_ORDERS_SEEDS for s, jl in SMOL_METHODS)


SMOL_LONG_ORDERS = (4,)  # 15 tasks: ≈ 3-4 h a run on one CPU thread, so it waits for a GPU (bench/gpu.sh generative)


def smollm2_long_runs() -> dict[str, dict]:
    """Long order 4 at the study budget, seed 0: IncLoRA ± JumpLoRA first (the headline pair), then the rest."""
    return dict(smollm2_run(strategy, jump, order, 0) for order in SMOL_LONG_ORDERS for strategy, jump in SMOL_METHODS)


SMOL_ELLA_PAST_TEST_SEEDS = (0, 1)  # order 1, beside the grid's ELLA + JumpLoRA runs
ELLA_PASTS = ("merged", "dense")  # the ella strategy's `past` values


def smollm2_ella_past_runs() -> dict[str, dict]:
    """ELLA + JumpLoRA with W_past summing the merged (sparse) or the ungated (dense) updates: dev, then test.

    On test, ELLA + JumpLoRA with merged W_past did no better than IncLoRA + JumpLoRA and the new update never
    touched W_past's support: does a dense W_past give the penalty its reach back? Dev picks the grid's W_past
    (``smollm2_ella_jl_past``), as it picks λ; order 1's test runs of both show what the choice is worth.
    """
    tuned = smollm2_tuned()
    dev = {"tasks": SMOL_PROBE_TASKS, "eval_split": "dev", "seed": 0, "jumplora": True}
    ella = {**SMOL_BASE, **SMOL_BUDGET, **dev, "strategy": "ella", **tuned["ella"]}
    runs = {f"ellajl-past-{past}": with_args(ella, past=past) for past in ELLA_PASTS}
    for past in ELLA_PASTS:
        runs |= dict(smollm2_run("ella", True, 1, seed, past) for seed in SMOL_ELLA_PAST_TEST_SEEDS)
    return runs


@functools.cache  # read once per process: every grid and table name asks
def smollm2_ella_jl_past() -> str:
    """The dev ablation's better W_past (OP, then BWT); merged, ELLA's only reading then, until both ran."""
    scores = {}
    for past in ELLA_PASTS:
        try:
            metrics = json.loads((RUNS_SMOL / f"ellajl-past-{past}" / "results.json").read_text())["metrics"]
        except (OSError, json.JSONDecodeError, KeyError):
            return "merged"
        scores[past] = (metrics["op"], metrics["bwt"])
    return max(scores, key=scores.__getitem__)


def is_complete(out: Path) -> bool:
    try:
        return json.loads((out / "results.json").read_text()).get("complete") is True
    except (OSError, json.JSONDecodeError):
        return False


def to_args(opts: dict) -> list[str]:
    """`jumplora run` arguments for a run's options, named as RunConfig names them (``jumplora.config.flat_fields``:
    ``runner``, ``strategy_args``, ``jumplora``...): an option the CLI does not know fails here (KeyError)."""
    from jumplora.config import field_of

    args = [] if opts.get("jumplora") else ["--dense"]  # sparse is jumplora run's default
    for key, value in opts.items():
        if key == "jumplora":  # said above, also when absent
            continue
        flag, _, off = (field_of(key).metadata.get("flag") or "--" + key.replace("_", "-")).partition("/")
        if key == "strategy_args":
            args += [arg for name, v in value.items() for arg in (flag, f"{name}={v}")]
        elif value is True or (value is False and off):
            args.append(flag if value else off)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


#: Torch threads per grid run: two 1-thread runs beat one 2-thread run here (docs/PERFORMANCE.md, bf16 on CPU).
THREADS_PER_RUN = 1
#: What the committed studies ran; their checkpoints resume only with it (a changed setting is refused).
GRID_MIXED_PRECISION = "no"


def run_one(
    name: str, opts: dict, root: Path = RUNS, threads: int = THREADS_PER_RUN,
    mixed_precision: str = GRID_MIXED_PRECISION,
) -> tuple[str, float, int]:  # fmt: skip
    out = root / name
    if is_complete(out):
        return name, 0.0, 0
    # A run stopped mid-way (session end, crash) picks up from its last checkpoint instead of restarting.
    restart = "--resume" if (out / "checkpoint").is_dir() else "--overwrite"
    cmd = [
        sys.executable,
        "-m",
        "jumplora.cli",
        "run",
        "--out",
        str(out),
        restart,
        "--quiet",
        "--threads",
        str(threads),
        "--mixed-precision",
        mixed_precision,
        *to_args(opts),
    ]
    start = time.perf_counter()
    log = root / f"{name}.log"
    with open(log, "w") as handle:
        # This checkout's code, also when the grid runs from a separate worktree of a fixed commit.
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if code == 0:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        log.unlink(missing_ok=True)
    return name, time.perf_counter() - start, code


def _final_runs() -> dict[str, dict]:
    return final_runs(json.loads(TUNED.read_text()) if TUNED.exists() else {})


# phase → (its runs, the folder they go to)
PHASES = {
    "tune": (tuning_runs, RUNS),
    "final": (_final_runs, RUNS),
    "v2": (v2_runs, RUNS_V2),
    "drift": (drift_runs, RUNS_DRIFT),
    "v2-ella-past": (v2_ella_past_runs, RUNS_V2),
    "smollm2-probe": (smollm2_probe_runs, RUNS_SMOL),
    "smollm2-tune": (smollm2_tuning_runs, RUNS_SMOL),
    "smollm2": (smollm2_runs, RUNS_SMOL),
    "smollm2-ella-past": (smollm2_ella_past_runs, RUNS_SMOL),
    "smollm2-long": (smollm2_long_runs, RUNS_SMOL),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=list(PHASES))
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // THREADS_PER_RUN))
    parser.add_argument("--threads-per-run", type=int, default=THREADS_PER_RUN)
    parser.add_argument("--mixed-precision", default=GRID_MIXED_PRECISION, choices=("no", "bf16", "auto"))
    parser.add_argument("--only", default="", help="run only names containing this string")
    args = parser.parse_args()
    make_runs, root = PHASES[args.phase]
    root.mkdir(parents=True, exist_ok=True)
    runs = {k: v for k, v in make_runs().items() if args.only in k}
    start = time.perf_counter()
    print(f"{len(runs)} runs, {sum(is_complete(root / n) for n in runs)} already complete", flush=True)
    failed = []
    with ThreadPoolExecutor(args.workers) as pool:
        one = functools.partial(run_one, root=root, threads=args.threads_per_run, mixed_precision=args.mixed_precision)
        for name, secs, code in pool.map(lambda item: one(*item), runs.items()):
            status = "skip" if secs == 0 else ("ok" if code == 0 else f"FAILED ({code}, see {name}.log)")
            print(f"{name:40s} {status:10s} {secs:7.1f}s  total {time.perf_counter() - start:7.1f}s", flush=True)
            failed += [name] if code else []
    if args.phase == "smollm2-tune" and (chosen := choose_smollm2_tuned()):
        print(f"chosen on dev, written to {SMOL_TUNED.relative_to(ROOT)}: {chosen}")
    if failed:
        sys.exit(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
