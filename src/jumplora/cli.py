"""`jumplora` command line: `run` a continual-learning stream, `report` on runs, list `strategies`.

The options of ``run`` are generated from the fields of ``RunConfig`` (their defaults, help texts and
flags), so a setting added to the configuration is on the command line with no further edit.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

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
    rich_markup_mode=None,  # click's plain help wraps at any width and never cuts a flag name
)
console = Console(stderr=True)
log = logging.getLogger("jumplora")

# Exit codes: 0 done, 2 bad input (nothing written), 3 numerical fault (last good checkpoint kept).
EXIT_BAD_INPUT = 2
EXIT_NUMERICAL = 3


def _fail(message: str) -> typing.NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=EXIT_BAD_INPUT)


# -- options generated from RunConfig ---------------------------------------------------------------------
def _option(flat_name: str) -> inspect.Parameter:
    """The CLI parameter of one RunConfig field: lists as comma-separated text, 0 → None where documented."""
    from jumplora.config import field_of

    f = field_of(flat_name)
    meta = f.metadata
    flag = meta.get("flag") or "--" + flat_name.replace("_", "-")
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    kind = _base_type(f.type)
    if kind is bool and "/" not in flag:
        flag = f"{flag}/--no-{flag[2:]}"
    if meta.get("csv"):
        kind, default = Optional[str], ",".join(default) if default else None  # noqa: UP045 - typer needs Optional
    elif flat_name == "strategy_args":
        kind, default = Optional[list[str]], None  # noqa: UP045
    elif meta.get("zero_is_none"):
        kind, default = int, default or 0
    elif default is None:
        kind = Optional[kind]  # noqa: UP045
    help_text = meta.get("help", "")
    if meta.get("choices"):
        help_text += f" [{' | '.join(meta['choices'])}]"
    annotation = Annotated[kind, typer.Option(*flag.split(" "), help=help_text, show_default=True)]
    return inspect.Parameter(flat_name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _base_type(hint: Any) -> type:
    """``int | None`` → int, ``list[str] | None`` → list; from the dataclass's (string) annotation."""
    hint = eval(hint, vars(typing), {}) if isinstance(hint, str) else hint  # annotations are strings (PEP 563)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _config_from_cli(ctx: typer.Context, values: dict[str, Any], config_file: Path | None) -> Any:
    """A RunConfig from the options; with ``--config``, the file first and explicit options over it."""
    from jumplora.config import ConfigError, RunConfig, field_of

    flat = {}
    for name, value in values.items():
        source = ctx.get_parameter_source(name)  # typer may vendor click: compare by name
        if config_file is not None and getattr(source, "name", None) != "COMMANDLINE":
            continue
        meta = field_of(name).metadata
        if meta.get("csv"):
            value = [v.strip() for v in value.split(",") if v.strip()] if value else None
        elif name == "strategy_args":
            value = _key_values(value or [])
        elif meta.get("zero_is_none"):
            value = value or None
        flat[name] = value
    try:
        if config_file is None:
            return RunConfig.from_flat(source="options", **flat)
        return RunConfig.from_dict(_merge(_read_config_file(config_file), _nest(flat)), source=str(config_file))
    except ConfigError as err:
        _fail(str(err))


def _key_values(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--strategy-arg {item[:60]!r}: expected NAME=VALUE, e.g. --strategy-arg lam=1e6")
        out[key.strip()] = value.strip()
    return out


def _merge(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The file's settings with the command line's over them; a new strategy drops the file's arguments."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            if key == "strategy" and "name" in value and "args" not in value:
                out[key].pop("args", None)
            out[key].update(value)
        else:
            out[key] = value
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    from jumplora.config import flat_fields

    index, nested = flat_fields(), {}
    for name, value in flat.items():
        part, field_name = index[name]
        (nested.setdefault(part, {}) if part else nested)[field_name] = value
    return nested


def _read_config_file(path: Path) -> dict[str, Any]:
    """A saved config.json (or a YAML file of the same shape); a run's results.json works too."""
    from jumplora.data.safe import DataError, decode_utf8, loads_json, loads_yaml, read_bytes

    try:
        text = decode_utf8(read_bytes(path, "run configuration"), path, "run configuration")
        yaml = path.suffix.lower() in (".yaml", ".yml")
        data = loads_yaml(text, f"{path}") if yaml else loads_json(text, f"{path}")
    except DataError as err:
        _fail(str(err))
    if isinstance(data, dict) and "config" in data and "accuracy_matrix" in data:
        data = data["config"]
    if not isinstance(data, dict):
        _fail(f"{path}: a run configuration must be a mapping of settings")
    return data


def _run(
    ctx: typer.Context,
    config_file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--config", help="Run a saved config.json or YAML; options given here override it."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="Torch CPU threads (default: all cores).")] = None,  # noqa: UP045
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only; no progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging, library warnings included.")] = False,
    plugin: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="Import a module or .py file first (e.g. one registering a strategy); repeatable."),
    ] = None,
    **values: Any,
) -> None:
    """Train a model on a task stream and write the accuracy matrix, CL metrics and plots."""
    _configure_logging(quiet, verbose)
    if config_file is not None:  # types first: nothing of a bad file runs, plugin code included
        _check_config_types(config_file)
    for name in plugin or []:
        _import_plugin(name)
    if threads is not None and threads < 1:
        _fail(f"--threads must be >= 1, got {threads}")
    config = _config_from_cli(ctx, values, config_file)
    if threads:
        import torch

        torch.set_num_threads(threads)
    results = execute(config, resume=resume, overwrite=overwrite, quiet=quiet)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print_results(results)


def _import_plugin(name: str) -> None:
    """A user's module (``pkg.my_strategy``) or file (``my_strategy.py``), imported for its registrations."""
    import importlib
    import importlib.util

    try:
        if name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(name).stem, name)
            if spec is None or not Path(name).is_file():
                _fail(f"--plugin {name}: file not found")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)
    except typer.Exit:
        raise
    except ImportError as err:
        _fail(f"--plugin {name}: cannot import it ({err})")
    except Exception as err:  # the plugin's own code failed (SyntaxError, a name taken, …): its message
        _fail(f"--plugin {name}: importing it raised {type(err).__name__}: {str(err)[:200]}")


def _check_config_types(path: Path) -> None:
    """The --config file's values against the RunConfig field types (before any plugin code runs)."""
    from jumplora.config import ConfigError, check_types

    try:
        check_types(_read_config_file(path), str(path))
    except ConfigError as err:
        _fail(str(err))


def _register_run() -> None:
    from jumplora.config import flat_fields

    params = list(inspect.signature(_run, eval_str=True).parameters.values())[:-1]
    params += [_option(name) for name in flat_fields()]
    _run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    app.command("run")(_run)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _configure_logging(quiet: bool, verbose: bool) -> None:
    """jumplora's lines at INFO (DEBUG with -v, WARNING with -q), timestamped, on rank 0 only; other
    libraries at WARNING whatever -v says (their DEBUG, e.g. matplotlib's font search, is noise)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    main_process = os.environ.get("RANK", "0") in ("", "0")  # set by torchrun / accelerate launch
    libraries = logging.ERROR if quiet else logging.WARNING  # -q: jumplora's own warnings only
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S", level=libraries,
                        stream=sys.stderr, force=True)  # fmt: skip
    if quiet or not verbose:  # torch's loggers have their own handler, and importing torch sets their levels
        import torch  # noqa: F401

        logging.getLogger("torch").setLevel(logging.ERROR if quiet else logging.WARNING)
        # CUDA-only kernels torchao cannot load on a CPU, and a torch deprecation torchao triggers at import
        # (peft imports torchao when installed): noise in every run unless -v
        logging.getLogger("torchao").setLevel(logging.ERROR)
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
        # DeepSpeed (when installed, some library imports it) prints its accelerator guess on stdout through its
        # own logger, whose level it sets at import: a filter survives that
        logging.getLogger("DeepSpeed").addFilter(_errors_only)
    logging.getLogger("jumplora").setLevel(level if main_process else logging.ERROR)
    if not main_process:  # the same library warnings would print once per process
        warnings.filterwarnings("ignore")
    if not verbose:  # library deprecation notices are not the user's business in a CLI run
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        if quiet:
            warnings.filterwarnings("ignore", category=UserWarning)
        import transformers

        transformers.logging.set_verbosity_error()
    if quiet or not main_process or not sys.stderr.isatty():  # progress bars fill redirected logs with \r lines
        import huggingface_hub
        import transformers

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """--out must be (or become) a writable directory, and not hold a run unless resumed/replaced."""
    from jumplora.run.directory import RunDirectoryError
    from jumplora.run.directory import check_out_dir as check

    try:
        check(out, resume=resume, overwrite=overwrite)
    except RunDirectoryError as err:
        _fail(str(err))


def execute(config: Any, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """Validate everything, then run; bad input exits with code 2 before anything is written.

    A NaN/inf loss, threshold or diverged update exits with code 3; the last finished task's
    checkpoint stays.
    """
    from jumplora.run.directory import RunDirectoryError
    from jumplora.run.trainer import ContinualTrainer
    from jumplora.train.numerics import NumericalError

    out = Path(config.out)
    check_out_dir(out, resume=resume, overwrite=overwrite)
    try:
        trainer = ContinualTrainer(config, quiet=quiet, resume=resume, overwrite=overwrite)
        return trainer.run()  # checks --out, then the checkpoint against config.json, then loads
    except NumericalError as err:
        console.print(f"[bold red]numerical fault:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=EXIT_NUMERICAL) from err
    except (ValueError, FileNotFoundError, RunDirectoryError) as err:
        _fail(str(err))
    except OSError as err:  # disk full, a folder gone: the last committed checkpoint stays valid
        _fail(_os_error_line(err))


def _os_error_line(err: OSError) -> str:
    """An OS error during a run, in one line: the file, the reason, and that --resume continues."""
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}; the last checkpoint is kept: fix the cause, then --resume"


def print_results(results: dict) -> None:
    from jumplora.metrics.report import matrix_table
    from jumplora.results import METRIC_KEYS

    out = Console(width=None if sys.stdout.isatty() else 200)
    title = f"Accuracy (%) — {results['label']} on {results['stream']}"
    out.print(matrix_table(results, title=title, width=out.width))
    metrics = results.get("metrics") or {}
    shown = "  ".join(
        f"OP {100 * metrics[k]:.2f}" if k == "op" else f"{k.upper()} {100 * metrics[k]:+.2f}"
        for k in METRIC_KEYS
        if k != "learning_accuracy" and metrics.get(k) is not None
    )
    dens = [t["density"] for t in results.get("per_task", []) if t.get("density") is not None]
    if dens:
        shown += f"  density {100 * sum(dens) / len(dens):.2f}%"
    out.print(f"{shown}  wall {results['wall_time_s']:.0f}s")


@app.command()
def strategies(
    plugin: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="Import a module or .py file first, to list the strategies it registers; repeatable."),
    ] = None,
) -> None:
    """List the CL strategies with their hyper-parameters (set them with --strategy-arg NAME=VALUE)."""
    from jumplora.cl import strategy_help

    for name in plugin or []:
        _import_plugin(name)

    print(strategy_help())


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (or folders holding them).")],
    fmt: Annotated[
        str, typer.Option("--format", help="table | markdown | latex (booktabs, best in bold) | csv | json.")
    ] = "table",
    markdown: Annotated[bool, typer.Option(help="Same as --format markdown.")] = False,
    matrix: Annotated[bool, typer.Option(help="Print each run's accuracy matrix R instead of the summary.")] = False,
    drift: Annotated[
        bool, typer.Option(help="Print what each run's answers to earlier tasks became (runs with --save-predictions).")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Also draw comparison bars and each run's heat map, overlap, curves here.")
    ] = None,
    nll: Annotated[
        bool, typer.Option(help="With --matrix: the gold-answer NLL matrix L (± standard error) instead of R.")
    ] = False,
    compare: Annotated[
        bool,
        typer.Option(
            help="Two settings A B (run folders or quoted globs, paired by seed): B − A with "
            "bootstrap intervals over items and seeds."
        ),
    ] = False,
) -> None:
    """Compare finished runs: mean ± std over seeds of each setting (or each run's R with --matrix)."""
    _configure_logging(quiet=False, verbose=False)
    from jumplora.metrics.report import FORMATS, aggregate, format_matrices, format_rows

    fmt = "markdown" if markdown else fmt
    if fmt not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if compare:
        _print_comparison(runs, fmt)
        return
    if plot is not None and plot.exists() and not plot.is_dir():
        _fail(f"--plot {plot}: exists and is not a folder")
    results = _complete_runs(runs)
    if drift:
        _print_drift(results, fmt)
        return
    rows = aggregate(results)
    _note_environment_differences(rows, show_std_note=not matrix and fmt in ("table", "markdown", "latex"))
    out = Console(width=None if sys.stdout.isatty() else 200)
    if matrix and nll:
        from jumplora.metrics.report import format_nll_matrices

        try:
            shown = format_nll_matrices(results, fmt)
        except ValueError as err:
            _fail(str(err))
    else:
        shown = format_matrices(results, fmt, width=out.width) if matrix else format_rows(rows, fmt)
    if isinstance(shown, str):
        sys.stdout.write(shown)
    else:
        for table in shown if isinstance(shown, list) else [shown]:
            out.print(table)
    if plot is not None:
        _report_plots(results, rows, plot)


def _complete_runs(paths: list[Path]) -> list[dict]:
    """Every complete run the arguments name, read as --resume reads it (a damaged run is one error line);
    incomplete runs are skipped with a note."""
    from jumplora.metrics.report import load_runs

    try:
        results, skipped = load_runs(_run_dirs(paths))
    except ValueError as err:
        _fail(str(err))
    for run_dir, reason in skipped:
        console.print(f"[yellow]skipped[/] {escape(str(run_dir))}: {escape(reason)}", highlight=False)
    if not results:
        _fail("no complete runs to report")
    return results


def _note_environment_differences(rows: list[dict], show_std_note: bool) -> None:
    """Say (on stderr) which pooled settings mix runs made on different software or hardware."""
    for row in rows:
        if row.get("environment_differs"):
            what = ", ".join(row["environment_differs"])
            console.print(f"note: {escape(row['label'])} pools {row['n']} runs that differ in: {escape(what)}",
                          highlight=False, soft_wrap=True)  # fmt: skip
    if show_std_note:
        console.print("± is the sample standard deviation over the n runs of a setting (none shown for n = 1)",
                      highlight=False, soft_wrap=True)  # fmt: skip


def _run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories from arguments: a run, a folder holding runs, or a (quoted) glob pattern."""
    import glob

    from jumplora.run.directory import find_runs, holds_results

    dirs: list[Path] = []
    for path in paths:
        if holds_results(path):
            dirs.append(path)
        elif path.is_dir():
            dirs.extend(find_runs(path))
        elif glob.has_magic(str(path)) and (matches := sorted(glob.glob(str(path)))):
            dirs.extend(_run_dirs([Path(m) for m in matches]))
        else:
            _fail(f"{path}: not a run directory (no results.json)")
    return dirs


def _print_comparison(groups: list[Path], fmt: str) -> None:
    """``report A B --compare``: B − A paired by seed, one error line when the runs do not pair."""
    from jumplora.metrics.compare import PairingError, compare, format_comparison
    from jumplora.metrics.report import load_results

    if len(groups) != 2:
        _fail(f"--compare takes two settings A and B (run folders or quoted globs), got {len(groups)} arguments")
    try:
        a, b = ([load_results(d) for d in _run_dirs([group])] for group in groups)
        sys.stdout.write(format_comparison(compare(a, b), fmt))
    except (PairingError, ValueError) as err:
        _fail(str(err))


def _print_drift(results: list[dict], fmt: str) -> None:
    """Per run: for each evaluation and earlier task, the share of each kind of answer. A run without
    saved predictions is skipped with a note; CSV is one tidy table (fractions) over every run."""
    import json

    from jumplora.metrics.drift import KINDS, NoPredictions, answer_drift, prediction_keys

    if fmt == "latex":
        _fail("--drift prints as table, markdown, csv or json")
    tidy: list[list[str]] = []
    shown = 0
    for res in results:
        run_dir = Path(res["run_dir"])
        keys = prediction_keys(res)
        try:
            tables = {key: answer_drift(run_dir, key) for key in keys}
        except NoPredictions as err:
            console.print(f"[yellow]skipped[/] {escape(str(run_dir))}: {escape(str(err))}", highlight=False,
                          soft_wrap=True)  # fmt: skip
            continue
        except ValueError as err:  # a damaged file is an error, never a skipped run
            _fail(str(err))
        shown += 1
        if fmt == "json":
            print(json.dumps({"run": str(run_dir), **tables}))
            continue
        for key, rows in tables.items():
            answers = "ranked" if key == "rank_prediction" else "generated"
            if fmt == "csv":
                tidy += [[str(run_dir), answers, r["after"], r["task"], str(r["n"]), *(f"{r[k]:.6g}" for k in KINDS)]
                         for r in rows]  # fmt: skip
                continue
            header = ["after", "task", "n", *(f"{k} %" for k in KINDS)]
            cells = [[r["after"], r["task"], str(r["n"]), *(f"{100 * r[k]:.1f}" for k in KINDS)] for r in rows]
            how = f"{answers} " if len(keys) > 1 or key == "rank_prediction" else ""
            _print_cells(f"{run_dir} — {how}answers to earlier tasks", header, cells, fmt)
    if not shown:
        _fail("no run to report has saved predictions (run with --save-predictions)")
    if fmt == "csv":
        _print_cells("", ["run", "answers", "after", "task", "n", *KINDS], tidy, fmt)


def _print_cells(title: str, header: list[str], cells: list[list[str]], fmt: str) -> None:
    if fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerows([header, *cells])
    elif fmt == "markdown":
        print(f"**{title}**\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        print("\n".join("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells) + "\n")
    else:
        table = Table(title=escape(title))
        for name in header:
            table.add_column(name, justify="left" if name in ("after", "task") else "right")
        for row in cells:
            table.add_row(*(escape(c) for c in row))
        Console(width=None if sys.stdout.isatty() else 200).print(table)


def _report_plots(results: list[dict], rows: list[dict], out_dir: Path) -> None:
    from jumplora.metrics.plots import plot_comparison, plot_run_figures
    from jumplora.metrics.report import run_label
    from jumplora.run.directory import read_train_log

    made = plot_comparison(rows, out_dir, metrics=("op", "bwt", "fwt", "forgetting"))
    names = [Path(r["run_dir"]).name for r in results]
    for i, (res, name) in enumerate(zip(results, names, strict=True)):
        unique = name if names.count(name) == 1 else f"{i:03d}_{name}"
        log = read_train_log(res["run_dir"])
        made += plot_run_figures(res, log, out_dir, unique, title=run_label(res))
    console.print(f"wrote {len(made)} plots to {escape(str(out_dir))}", highlight=False)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    out: Annotated[Path, typer.Argument(help="Output folder for the merged model, card and per-task updates.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only: no warnings, bars or summary.")] = False,
) -> None:
    """Write a finished run's final model as a standard HF folder, with a model card and per-task updates."""
    from jumplora.export import export_run

    _configure_logging(quiet, verbose=False)

    try:
        written = export_run(run_dir, out, overwrite=overwrite)
    except (ValueError, OSError) as err:
        _fail(str(err))
    if not quiet:
        Console().print(f"exported {escape(str(run_dir))} to {escape(str(written))}", highlight=False)


_register_run()


models_app = typer.Typer(help="Models known by short name: list them, fetch one.", no_args_is_help=True)


@models_app.command("list")
def models_list() -> None:
    """Known short names for --model, whether each is ready locally, and where."""
    _configure_logging(quiet=False, verbose=False)  # before peft imports torchao
    from jumplora.models import ModelLoadError, list_models

    table = Table("name", "cached", "path", "description")
    try:
        known = list_models()
    except ModelLoadError as err:
        _fail(str(err))
    for m in known:
        table.add_row(str(m["name"]), "yes" if m["cached"] else "no", str(m["path"]), str(m["description"]))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="A short name from `jumplora models list`.")]) -> None:
    """Fetch and convert a known model once (later runs use the cached folder)."""
    from jumplora.models import ModelLoadError, pull_model

    _configure_logging(quiet=False, verbose=False)
    try:
        path = pull_model(name)
    except ModelLoadError as err:
        _fail(str(err))
    print(path)


app.add_typer(models_app, name="models")


def _print_version(value: bool) -> None:
    if value:
        from jumplora import __version__

        print(f"jumplora {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Continual learning of language models with sparse JumpLoRA adapters."""


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
