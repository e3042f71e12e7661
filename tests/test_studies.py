"""The committed studies (studies/): every run loads through the one reader at results schema 2, the
migration that brought them there (bench/migrate_runs.py) is idempotent and refuses what it cannot read,
mechanism.py's collect migrates what it copies, and importing the metrics the engine uses pulls no rich."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jumplora.metrics.report import find_runs, load_results
from jumplora.results import RESULTS_FIELDS, SCHEMA_VERSION, schema_problem

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import migrate_runs  # noqa: E402

STUDIES = ROOT / "studies"

# A generation-1 run as the first study wrote it (flat config, a reference runner named as the strategy).
FLAT_CONFIG = {
    "out": "/work/main/bench/runs/o1-multitask-s0", "order": 1, "stream_file": None, "tasks": None,
    "data_dir": None, "max_train": 192, "max_eval": 100, "eval_split": "test", "option_space": "stream",
    "model": None, "family": None, "target_modules": None, "max_length": 128, "rank_options": False,
    "trust_remote_code": False, "strategy": "ella", "jumplora": True, "ella_lambda": 1e6, "olora_lambda": 0.5,
    "olora_l2": 0.0, "r": 8, "lora_alpha": 32.0, "lr": 0.001, "seed": 1, "extra": {},
}  # fmt: skip
FLAT_RESULTS = {
    "complete": True, "config": FLAT_CONFIG, "label": "ella+jumplora", "tasks": ["dbpedia", "amazon"],
    "tasks_done": 2, "zero_shot": [0.4, 0.2], "independent": None, "accuracy_matrix": [[0.9, 0.3], [0.8, 0.7]],
    "metrics": {"op": 0.75}, "wall_time_s": 12.5, "dropped_eval_items": {}, "plots": [], "per_task": [],
    "overlap_matrix": [],
}  # fmt: skip


def test_every_committed_run_loads_through_the_one_schema() -> None:
    runs = find_runs(STUDIES)
    assert len(runs) >= 234 and not list((ROOT / "bench").rglob("results.json"))  # bench/ holds scripts only
    complete = 0
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        assert schema_problem(results) == "" and results["schema"] == SCHEMA_VERSION, run
        if results["complete"] is not True:
            # Stopped runs (bf16 study) hold fewer rows than tasks, which the run reader refuses as it did before.
            with pytest.raises(ValueError, match=r"accuracy_matrix|incomplete"):
                load_results(run)
            continue
        loaded = load_results(run)  # run_reader's checks, then schema 2: no fallback anywhere
        assert set(RESULTS_FIELDS) <= set(loaded), run
        complete += 1
    assert complete >= 231
    assert migrate_runs.main(["--check", str(STUDIES)]) == 0  # nothing left to migrate


def test_generation_1_migrates_once_into_the_nested_config() -> None:
    migrated = migrate_runs.migrate_results(copy.deepcopy(FLAT_RESULTS), "r")
    assert schema_problem(migrated) == "" and list(migrated) == list(RESULTS_FIELDS)
    config = migrated["config"]
    assert config["runner"] == "continual" and config["seed"] == 1 and config["out"] == FLAT_CONFIG["out"]
    assert config["strategy"] == {"name": "ella", "args": {"lam": 1e6}}  # O-LoRA's λs belonged to no one
    assert config["adapter"] == {"sparse": True, "r": 8, "lora_alpha": 32.0}
    assert config["model"] == {"name": None, "family": None, "targets": None, "max_length": 128,
                               "rank_options": False, "trust_remote_code": False}  # fmt: skip
    assert migrated["stream"] == "order1" and migrated["environment"] is None and migrated["nll_matrix"] is None
    assert migrate_runs.migrate_results(migrated, "r") is migrated  # idempotent
    reference = {**FLAT_RESULTS, "config": {**FLAT_CONFIG, "strategy": "multitask"}, "reference": "multitask"}
    migrated = migrate_runs.migrate_results(reference, "r")
    assert migrated["runner"] == migrated["config"]["runner"] == "multitask" and "reference" not in migrated


def _write_run(folder: Path, results: dict, config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_migration_is_all_or_nothing_and_refuses_what_it_cannot_read(tmp_path: Path, capsys) -> None:
    good = _write_run(tmp_path / "good", FLAT_RESULTS, FLAT_CONFIG)
    bad = _write_run(tmp_path / "bad", {**FLAT_RESULTS, "config": {**FLAT_CONFIG, "ella_mu": 3}})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.json")}
    assert migrate_runs.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "bad/results.json: config.ella_mu" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.json")} == before  # nothing written
    for results, field in (({**FLAT_RESULTS, "reference": "independent"}, "reference"),
                           ({**FLAT_RESULTS, "schema": 3}, "schema"), ([1, 2], "not a run")):  # fmt: skip
        (bad / "results.json").write_text(json.dumps(results))
        assert migrate_runs.main([str(bad)]) == 2 and field in capsys.readouterr().err
    (bad / "results.json").write_text(json.dumps(FLAT_RESULTS))
    assert migrate_runs.main([str(tmp_path)]) == 0
    assert json.loads((good / "config.json").read_text()) == load_results(good)["config"]  # migrated with it
    migrated = (good / "results.json").read_bytes()
    assert migrate_runs.main([str(tmp_path)]) == 0 and (good / "results.json").read_bytes() == migrated


def test_a_reader_refuses_an_unmigrated_run(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "old", FLAT_RESULTS)
    with pytest.raises(ValueError, match=r"old.results\.json: .*migrate_runs"):
        load_results(run)


def test_mechanism_collect_migrates_what_it_copies_and_only_reads_the_source(monkeypatch, tmp_path: Path) -> None:
    import mechanism

    nested = migrate_runs.migrate_results(copy.deepcopy(FLAT_RESULTS), "r")
    old = {k: v for k, v in nested.items() if k not in ("schema", "environment", "precision")}  # as c20eb6f writes
    source = tmp_path / "grid"
    run = _write_run(source / "bench" / "runs_mechanism" / "dense-s0", old, old["config"])
    (run / "train_log.jsonl").write_text("{}\n")
    (run / "plots").mkdir()
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    monkeypatch.setattr(mechanism, "RUNS", tmp_path / "studies" / "runs_mechanism")
    assert mechanism.collect(mechanism.source_runs(source), commit=False) == ["dense-s0"]
    copied = mechanism.RUNS / "dense-s0"
    assert sorted(p.name for p in copied.iterdir()) == ["config.json", "results.json", "train_log.jsonl"]
    assert load_results(copied)["schema"] == SCHEMA_VERSION
    assert json.loads((copied / "config.json").read_text()) == old["config"]
    assert mechanism.collect(mechanism.source_runs(source), commit=False) == []  # already here, migrated
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before
    (run / "results.json").write_text(json.dumps({**old, "stray": 1}))
    with pytest.raises(migrate_runs.MigrationError, match="dense-s0"):
        mechanism.collect(mechanism.source_runs(source), commit=False)


def test_the_metrics_the_engine_imports_pull_no_rich() -> None:
    code = ("import sys, jumplora.metrics, jumplora.metrics.overlap, jumplora.metrics.cl, jumplora.results; "
            "assert 'rich' not in sys.modules, 'rich'; assert 'jumplora.metrics.report' not in sys.modules; "
            "from jumplora.metrics import aggregate; assert 'rich' in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
