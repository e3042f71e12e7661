"""`jumplora` command line: `run` a continual-learning stream, `report` on finished runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help=(
        "Continual learning of language models with sparse JumpLoRA adapters.\n\n"
        "  jumplora run --order 1 --strategy inclora --jumplora --out runs/demo\n"
        "  jumplora report runs/*"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

STRATEGY_HELP = (
    "seqlora (one adapter for all tasks) | inclora (new adapter per task, old ones merged) | "
    "ella (penalise overlap with past updates) | olora (orthogonal A's) | "
    "multitask (all tasks jointly: upper bound) | independent (each task from scratch)"
)


# Exit codes: 0 done, 2 bad input (nothing written), 3 numerical fault (last good checkpoint kept).
EXIT_BAD_INPUT = 2
EXIT_NUMERICAL = 3


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=EXIT_BAD_INPUT)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
def run(
    out: Annotated[
        Path, typer.Option(help="Run directory (results.json, train_log.jsonl, plots/, checkpoint/).")
    ] = Path("runs/default"),
    order: Annotated[int, typer.Option(help="Benchmark order: 1-3 standard (4 tasks), 4-6 long (15 tasks).")] = 1,
    stream: Annotated[Path | None, typer.Option(help="Custom stream file (YAML/JSON) instead of --order.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated benchmark tasks instead of --order.")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Benchmark folder (default: $JUMPLORA_DATA, else ../shared/cl_benchmark)."),
    ] = None,
    strategy: Annotated[str, typer.Option(help=STRATEGY_HELP)] = "inclora",
    jumplora: Annotated[
        bool, typer.Option("--jumplora/--dense", help="Sparse JumpLoRA adapters, or dense LoRA.")
    ] = False,
    model: Annotated[
        str | None, typer.Option(help="Local model folder (default: the packaged all-MiniLM-L6-v2).")
    ] = None,
    family: Annotated[str | None, typer.Option(help="encoder | seq2seq | causal (default: from the config).")] = None,
    targets: Annotated[str | None, typer.Option(help="Comma-separated target modules (default: per model).")] = None,
    max_train: Annotated[int, typer.Option(help="Training examples per task (0 = all).")] = 256,
    max_eval: Annotated[int, typer.Option(help="Evaluation examples per task (0 = all).")] = 200,
    eval_split: Annotated[str, typer.Option(help="dev (for tuning) or test (final numbers).")] = "test",
    option_space: Annotated[
        str,
        typer.Option(help="Encoder candidates: 'stream' (all options of the stream) or 'task' (its own)."),
    ] = "stream",
    epochs: Annotated[int, typer.Option(help="Epochs per task.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Per-device training batch size.")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW, warm-up then constant).")] = 1e-3,
    theta_lr: Annotated[float | None, typer.Option(help="Learning rate of the thresholds (default: --lr).")] = None,
    warmup_ratio: Annotated[float, typer.Option(help="Fraction of a task's steps spent warming up.")] = 0.06,
    rank: Annotated[int, typer.Option("--r", help="LoRA rank.")] = 8,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / r).")] = 32.0,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the adapter input.")] = 0.0,
    granularity: Annotated[str, typer.Option(help="Thresholds: global | per_block | per_module.")] = "global",
    threshold_param: Annotated[str, typer.Option(help="Learn log θ ('log') or θ ('direct').")] = "log",
    bandwidth: Annotated[float, typer.Option(help="Width ε of the θ straight-through kernel.")] = 1e-3,
    sparsify_start: Annotated[float, typer.Option(help="Fraction of a task's steps where γ starts rising.")] = 0.2,
    sparsify_end: Annotated[float, typer.Option(help="Fraction of a task's steps where γ reaches 1.")] = 0.8,
    target_density: Annotated[
        float | None, typer.Option(help="Keep this fraction at the θ init (default: the LoRA budget).")
    ] = None,
    ella_lambda: Annotated[float, typer.Option(help="ELLA λ.")] = 3e4,
    olora_lambda: Annotated[float, typer.Option(help="O-LoRA orthogonality weight λ1.")] = 0.5,
    olora_l2: Annotated[float, typer.Option(help="O-LoRA L2 weight λ2.")] = 0.0,
    max_length: Annotated[int, typer.Option(help="Maximum prompt length in tokens.")] = 128,
    eval_batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed for data caps, initialisation and shuffling.")] = 0,
    mixed_precision: Annotated[str, typer.Option(help="no | fp16 | bf16 (through Accelerate).")] = "no",
    cpu: Annotated[bool, typer.Option(help="Force the CPU even when a GPU is present.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    checkpoint_every: Annotated[
        int, typer.Option(help="Also checkpoint every N optimizer steps within a task (0 = task ends only).")
    ] = 0,
    log_every: Annotated[int, typer.Option(help="Log every N optimizer steps to train_log.jsonl.")] = 10,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow custom model code from the model folder.")] = False,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (default: all cores).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Train a model on a task stream and write the accuracy matrix, CL metrics and plots."""
    import torch

    from jumplora.config import RunConfig

    if threads:
        torch.set_num_threads(threads)
    try:
        config = RunConfig(
            out=str(out),
            order=order,
            stream_file=str(stream) if stream else None,
            tasks=_csv(tasks),
            data_dir=str(data_dir) if data_dir else None,
            max_train=max_train or None,
            max_eval=max_eval or None,
            eval_split=eval_split,
            option_space=option_space,
            model=model,
            family=family,
            target_modules=_csv(targets),
            max_length=max_length,
            trust_remote_code=trust_remote_code,
            strategy=strategy,
            jumplora=jumplora,
            ella_lambda=ella_lambda,
            olora_lambda=olora_lambda,
            olora_l2=olora_l2,
            r=rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            threshold_granularity=granularity,
            threshold_param=threshold_param,
            bandwidth=bandwidth,
            sparsify_start=sparsify_start,
            sparsify_end=sparsify_end,
            target_density=target_density,
            lr=lr,
            theta_lr=theta_lr,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            epochs=epochs,
            grad_accum=grad_accum,
            warmup_ratio=warmup_ratio,
            seed=seed,
            mixed_precision=mixed_precision,
            cpu=cpu,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
        )
    except ValueError as err:
        _fail(str(err))
    results = execute(config, resume=resume, overwrite=overwrite, quiet=quiet)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print_results(results)


def execute(config, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """Validate everything, then run; bad input exits with code 2 before anything is written.

    A NaN/inf loss or threshold exits with code 3; the checkpoint of the last finished task stays.
    """
    from jumplora.checkpoint import RunDirectory, RunDirectoryError
    from jumplora.engine import ContinualTrainer, NumericalError

    out = Path(config.out)
    rundir = RunDirectory(out, config)
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        _fail(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if resume and not rundir.has_checkpoint() and (out / "results.json").exists():
        _fail(f"{out} has results but no checkpoint to resume from")
    try:
        if resume and rundir.has_checkpoint():
            rundir.check_matches()
        trainer = ContinualTrainer(config, quiet=quiet)
        trainer.prepare()
        return trainer.run(fresh=overwrite and not resume)
    except NumericalError as err:
        console.print(f"[bold red]numerical fault:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=EXIT_NUMERICAL) from err
    except (ValueError, FileNotFoundError, RunDirectoryError) as err:
        _fail(str(err))


def print_results(results: dict) -> None:
    out = Console()
    names = results["tasks"]
    table = Table(title=f"Accuracy (%) — {results['label']}", show_lines=False)
    table.add_column("after \\ on")
    for name in names:
        table.add_column(name, justify="right")
    if results.get("zero_shot"):
        table.add_row("zero-shot", *(f"{100 * v:.1f}" for v in results["zero_shot"]))
    row_names = names if len(results["accuracy_matrix"]) == len(names) else [results.get("reference", "final")]
    for name, row in zip(row_names, results["accuracy_matrix"], strict=False):
        table.add_row(name, *(f"{100 * v:.1f}" for v in row))
    out.print(table)
    metrics = results.get("metrics") or {}
    shown = "  ".join(
        f"{k.upper()} {100 * v:+.2f}" if k != "op" else f"OP {100 * v:.2f}"
        for k, v in metrics.items()
        if v is not None and k in ("op", "bwt", "fwt", "forgetting")
    )
    dens = [t["density"] for t in results.get("per_task", []) if t.get("density") is not None]
    if dens:
        shown += f"  density {100 * sum(dens) / len(dens):.2f}%"
    out.print(f"{shown}  wall {results['wall_time_s']:.0f}s")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (or folders holding them).")],
    markdown: Annotated[bool, typer.Option(help="Print a Markdown table instead.")] = False,
) -> None:
    """Compare finished runs: mean ± std over seeds of each setting."""
    from jumplora.metrics.report import aggregate, find_runs, load_runs, render_table, to_markdown

    dirs: list[Path] = []
    for path in runs:
        if (path / "results.json").exists():
            dirs.append(path)
        elif path.is_dir():
            dirs.extend(find_runs(path))
        else:
            _fail(f"{path}: not a run directory (no results.json)")
    results, skipped = load_runs(dirs)
    for run_dir, reason in skipped:
        console.print(f"[yellow]skipped[/] {run_dir}: {reason}", highlight=False)
    if not results:
        _fail("no complete runs to report")
    rows = aggregate(results)
    if markdown:
        print(to_markdown(rows))
    else:
        Console(width=None if sys.stdout.isatty() else 200).print(render_table(rows))


models_app = typer.Typer(help="Models known by short name: list them, fetch one.", no_args_is_help=True)


@models_app.command("list")
def models_list() -> None:
    """Known short names for --model, whether each is ready locally, and where."""
    from jumplora.models import list_models

    table = Table("name", "cached", "path", "description")
    for m in list_models():
        table.add_row(str(m["name"]), "yes" if m["cached"] else "no", str(m["path"]), str(m["description"]))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="A short name from `jumplora models list`.")]) -> None:
    """Fetch and convert a known model once (later runs use the cached folder)."""
    from jumplora.models import ModelLoadError, pull_model

    try:
        path = pull_model(name)
    except ModelLoadError as err:
        _fail(str(err))
    print(path)


app.add_typer(models_app, name="models")


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
