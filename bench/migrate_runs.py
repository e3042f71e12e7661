"""Bring committed runs' results.json (and config.json) to results schema 2, once, in place.

    python bench/migrate_runs.py studies/            # every run under studies/
    python bench/migrate_runs.py --check studies/    # exit 1 if any run still needs migrating

Four generations were committed before schema 2 (``jumplora.results``):

1. a flat config (``strategy: "ella"``, ``jumplora: true``, ``ella_lambda``...), no runner or stream
   field; reference runs named their runner as the strategy and in a ``reference`` field;
2. the nested config, no ``task_options``;
3. plus ``task_options`` (and ``precision`` in the later ones);
4. plus the gold-answer NLL matrix L.

A flat config is moved into the nested sections under today's names (nothing is added that the run did
not record, except a reference run's strategy, which today's writer records as the default ``inclora``);
the strategy's own λs go to ``strategy.args`` (only the strategy that used them). Every schema-2 field a
run did not record is written as null. A run at schema 2 is left as it is, so running the script again
changes nothing. A run it cannot read unambiguously (an unknown config key, a non-empty ``extra``, a
``reference`` field that disagrees with its strategy, a newer schema) is refused with one ``error:``
line, and nothing is written unless every run given migrates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jumplora.results import RESULTS_FIELDS, SCHEMA_VERSION, schema_problem

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"

#: Flat config key of generation 1 → (section or None for top level, name in schema 2).
FLAT_KEYS: dict[str, tuple[str | None, str]] = {
    **{k: (None, k) for k in ("out", "seed", "mixed_precision", "cpu", "log_every", "checkpoint_every", "plots",
                              "save_predictions", "report_to")},
    **{k: ("stream", k) for k in ("order", "stream_file", "tasks", "data_dir", "max_train", "max_eval", "eval_split",
                                  "option_space")},
    "model": ("model", "name"), "family": ("model", "family"), "target_modules": ("model", "targets"),
    **{k: ("model", k) for k in ("max_length", "rank_options", "trust_remote_code")},
    "jumplora": ("adapter", "sparse"),
    **{k: ("adapter", k) for k in ("r", "lora_alpha", "lora_dropout", "threshold_granularity", "threshold_param",
                                   "bandwidth", "threshold_reduction", "sparsify_start", "sparsify_end",
                                   "target_density", "density_control", "l0_lambda", "dual_lr", "dual_gain",
                                   "controller_theta_lr")},
    **{k: ("optim", k) for k in ("lr", "theta_lr", "weight_decay", "batch_size", "eval_batch_size", "epochs",
                                 "grad_accum", "warmup_ratio", "max_grad_norm")},
}  # fmt: skip
#: Flat strategy hyper-parameters → (the strategy that read them, its argument name today).
FLAT_STRATEGY_ARGS: dict[str, tuple[str, str]] = {
    "ella_lambda": ("ella", "lam"),
    "olora_lambda": ("olora", "lam_orth"),
    "olora_l2": ("olora", "lam_l2"),
}
#: Generation 1 wrote a reference runner as the strategy; today's writer records the default strategy.
REFERENCE_RUNNERS = ("multitask", "independent")
REFERENCE_STRATEGY = "inclora"
SECTIONS = ("stream", "model", "adapter", "optim", "strategy")


class MigrationError(ValueError):
    """A run this script cannot migrate unambiguously (the message names the file and the field)."""


def nested_config(flat: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A generation-1 flat config in schema 2's nested sections (only what the run recorded)."""
    strategy = str(flat.get("strategy"))
    runner = strategy if strategy in REFERENCE_RUNNERS else "continual"
    top: dict[str, Any] = {"runner": runner}
    sections: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    args: dict[str, Any] = {}
    for key, value in flat.items():
        if key in FLAT_KEYS:
            section, name = FLAT_KEYS[key]
            (top if section is None else sections[section])[name] = value
        elif key in FLAT_STRATEGY_ARGS:
            owner, name = FLAT_STRATEGY_ARGS[key]
            if owner == strategy:
                args[name] = value
        elif key == "extra" and value:
            raise MigrationError(f"{where}: config.extra holds {sorted(value)[:3]}; migrate it by hand")
        elif key not in ("strategy", "extra"):
            raise MigrationError(f"{where}: config.{key} is not a known flat option; migrate it by hand")
    sections["strategy"] = {"name": REFERENCE_STRATEGY if runner != "continual" else strategy, "args": args}
    return {**top, **sections}


def flat_stream_name(config: Mapping[str, Any]) -> str:
    """The stream's name as generation 1's readers derived it: the stream file, the task list or the order."""
    if config.get("stream_file"):
        return Path(str(config["stream_file"])).stem
    if config.get("tasks"):
        return ",".join(map(str, config["tasks"]))
    return f"order{config['order']}"


def migrate_results(results: Any, where: str) -> dict[str, Any]:
    """``results`` at schema 2 (unchanged when it already is); MigrationError when it cannot be."""
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        raise MigrationError(f"{where}: not a run's results (expected an object with a config object)")
    if "schema" in results:
        problem = schema_problem(results)
        if problem:
            raise MigrationError(f"{where}: {problem}")
        return results
    old = dict(results)
    config = old["config"]
    if not isinstance(config.get("strategy"), Mapping):  # generation 1
        config = nested_config(config, where)
        reference = old.pop("reference", None)
        if reference is not None and reference != config["runner"]:
            raise MigrationError(f"{where}: field reference is {reference!r} but the strategy names "
                                 f"{config['runner']!r}")  # fmt: skip
        old.setdefault("runner", config["runner"])
        old.setdefault("stream", flat_stream_name(config["stream"]))
    unknown = sorted(set(old) - set(RESULTS_FIELDS))
    if unknown:
        raise MigrationError(f"{where}: field {unknown[0]!r} is not part of schema {SCHEMA_VERSION}")
    migrated = {key: old.get(key) for key in RESULTS_FIELDS}
    migrated.update(schema=SCHEMA_VERSION, config=config)
    problem = schema_problem(migrated)
    if problem:
        raise MigrationError(f"{where}: {problem}")
    return migrated


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MigrationError(f"{path}: cannot read it as JSON ({err})") from err


def migrate_run(run_dir: Path) -> dict[Path, str]:
    """The files of ``run_dir`` that change, with their new text (empty when it is at schema 2)."""
    path = run_dir / RESULTS_FILE
    results = read_json(path)
    migrated = migrate_results(results, str(path))
    changes = {} if migrated is results else {path: dump(migrated)}
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():  # the options the run was started with: the same config, so the same shape
        recorded = read_json(config_path)
        if recorded not in (results["config"], migrated["config"]):
            raise MigrationError(f"{config_path}: differs from {path}'s config; migrate it by hand")
        if recorded != migrated["config"]:
            changes[config_path] = dump(migrated["config"])
    return changes


def dump(data: Any) -> str:
    """The runs' own formatting (json.dumps, indent 2, trailing newline), so migrated diffs stay small."""
    return json.dumps(data, indent=2) + "\n"


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Every folder under ``roots`` (inclusive) holding a results.json, sorted."""
    return sorted({p.parent for root in roots for p in root.rglob(RESULTS_FILE)})


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.migrating")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="run folders or folders of runs")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a run needs migrating")
    args = parser.parse_args(argv)
    missing = [root for root in args.roots if not root.exists()]
    try:
        if missing:
            raise MigrationError(f"{missing[0]}: no such folder")
        runs = find_run_dirs(args.roots)
        changes = {run: migrate_run(run) for run in runs}  # everything checked before anything is written
    except MigrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pending = {run: files for run, files in changes.items() if files}
    if args.check:
        for run in pending:
            print(f"needs migrating: {run}")
        return 1 if pending else 0
    for files in pending.values():
        for path, text in files.items():
            write_atomically(path, text)
    done = len(runs) - len(pending)
    print(f"{len(runs)} runs: {len(pending)} migrated to schema {SCHEMA_VERSION}, {done} already at it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
