"""One definition of "the same run" (issue 29): config.json is recorded under the checkpoint's checksum,
and --resume and the Python API both refuse a run whose configuration differs, naming the field."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_process import run_cli

from jumplora.config import RunConfig
from jumplora.data import resolve_data_dir
from jumplora.run.directory import RunDirectoryError


def tiny(out: Path, model: str, **overrides) -> RunConfig:
    settings = dict(out=str(out), tasks=["cb", "rte"], model=model, data_dir=str(resolve_data_dir()), max_train=8,
                    max_eval=8, max_length=32, batch_size=8, cpu=True, plots=False, strategy="ella",
                    strategy_args={"lam": 1e6})  # fmt: skip
    return RunConfig.from_flat(**{**settings, **overrides})


def files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model) -> Path:
    from jumplora import ContinualTrainer

    out = tmp_path_factory.mktemp("api") / "run"
    results = ContinualTrainer(tiny(out, tiny_model), quiet=True).run()
    assert results["complete"]
    return out


def test_api_default_never_reuses_an_old_run(finished, tiny_model):
    from jumplora import ContinualTrainer

    before = files(finished)
    with pytest.raises(RunDirectoryError, match="already holds a run; pass --resume"):
        ContinualTrainer(tiny(finished, tiny_model, strategy_args={"lam": 1e3}), quiet=True).run()
    assert files(finished) == before


def test_api_resume_with_another_config_names_the_field(finished, tiny_model):
    from jumplora import ContinualTrainer

    before = files(finished)
    trainer = ContinualTrainer(tiny(finished, tiny_model, strategy_args={"lam": 1e3}), quiet=True, resume=True)
    with pytest.raises(RunDirectoryError, match=r"first difference strategy\.args\.lam: 1000000\.0 → 1000\.0"):
        trainer.run()
    assert files(finished) == before


def test_api_resume_same_config_and_overwrite(finished, tiny_model, tmp_path):
    from jumplora import ContinualTrainer

    old = json.loads((finished / "results.json").read_text())
    # Output-only options may change on resume; the finished run is given back as it is.
    again = ContinualTrainer(tiny(finished, tiny_model, log_every=3), quiet=True, resume=True).run()
    assert again["accuracy_matrix"] == old["accuracy_matrix"]
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished), str(copy)], check=True)
    changed = ContinualTrainer(tiny(copy, tiny_model, strategy_args={"lam": 1e3}), quiet=True, overwrite=True).run()
    assert changed["config"]["strategy"]["args"]["lam"] == 1e3
    assert json.loads((copy / "checkpoint" / "state.json").read_text())["config"]["strategy"]["args"]["lam"] == 1e3


def test_api_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_model):
    from jumplora import ContinualTrainer

    out = tmp_path / "mine"
    (out / "plots").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / ".draft.tmp").write_text("draft")
    before = files(out)
    with pytest.raises(RunDirectoryError, match="not a jumplora run"):
        ContinualTrainer(tiny(out, tiny_model), quiet=True, overwrite=True).run()
    assert files(out) == before


def test_report_reads_a_resumed_run_through_the_validated_loader(finished):
    """After a resume that changed an output-only option (log_every), report still accepts the run."""
    from typer.testing import CliRunner

    from jumplora.cli import app

    assert json.loads((finished / "results.json").read_text())["config"]["log_every"] == 3  # resumed above
    result = CliRunner().invoke(app, ["report", str(finished), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["n"] == 1


@pytest.mark.slow
def test_kill_then_edit_config_json_then_resume_is_refused(tmp_path, tiny_model):
    """Killed after task 1's commit; config.json edited (lr, r); --resume is refused, nothing changes."""
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--tasks", "cb,rte", "--model", tiny_model, "--data-dir",
            str(resolve_data_dir()), "--max-train", "8", "--max-eval", "8", "--max-length", "32", "--batch-size",
            "8", "--cpu", "--quiet", "--threads", "1", "--no-plots"]  # fmt: skip
    plugin = ["--plugin", str(Path(__file__).with_name("fault_plugin.py"))]  # the kill point's injector
    killed = run_cli([*args, *plugin], extra_env={"JUMPLORA_TEST_KILL_AT": "commit:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    config["optim"]["lr"], config["adapter"]["r"] = 0.005, 4
    (out / "config.json").write_text(json.dumps(config))
    before = files(out)
    for extra in ([], ["--config", str(out / "config.json")]):
        proc = run_cli([*args, "--resume", *extra])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
        assert "config.json: edited since the checkpoint was written (adapter.r: 8 → 4)" in errors[0], errors[0]
        assert files(out) == before
