"""The run directory has one reader: ``--resume``, ``export`` and ``report`` refuse an edited run with the
same one-line error, because they check it with the same code (issue 26)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from jumplora.cli import app
from jumplora.run.validate import state_checksum

runner = CliRunner()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model: str) -> Path:
    """A finished sparse tiny run (cb, rte) with its checkpoint."""
    from jumplora import ContinualTrainer
    from jumplora.config import RunConfig
    from jumplora.data import resolve_data_dir

    out = tmp_path_factory.mktemp("finished") / "run"
    config = RunConfig.from_flat(
        out=str(out), tasks=["cb", "rte"], model=tiny_model, data_dir=str(resolve_data_dir()), max_train=8,
        max_eval=8, max_length=32, batch_size=8, cpu=True, jumplora=True, plots=False,
    )  # fmt: skip
    ContinualTrainer(config, quiet=True).run()
    return out


def zero_update(run: Path) -> None:
    path = run / "checkpoint" / "update_000.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(path)).items()}, str(path))


def edit_json(name: str, change: Callable[[dict], None], checksum: bool = False) -> Callable[[Path], None]:
    """Edit a JSON file of the run; with ``checksum`` recompute state.json's, so only its schema check is left."""

    def edit(run: Path) -> None:
        path = run / name
        data = json.loads(path.read_text())
        change(data)
        if checksum:
            data["checksum"] = state_checksum(data)
        path.write_text(json.dumps(data))

    return edit


#: An edit of the checkpoint or config.json → what the one error line says, whoever reads the run.
EDITS = {
    "an update's values": (zero_update, "update_000.safetensors: content does not match the hash in state.json"),
    "a support file removed": (lambda run: (run / "checkpoint" / "support_001.safetensors").unlink(),
                               "names support_001.safetensors, which is missing"),
    "state.json (checksum kept)": (edit_json("checkpoint/state.json", lambda s: s.update(global_step=999)),
                                   "state.json: its checksum does not match its content"),
    "state.json (checksum recomputed)": (edit_json("checkpoint/state.json", lambda s: s["rows"].pop(), True),
                                         "state.json: field rows must hold next_task=2 rows"),
    "config.json": (edit_json("config.json", lambda c: c["adapter"].update(r=4)),
                    "config.json: edited since the checkpoint was written (adapter.r: 8 → 4)"),
}  # fmt: skip


def error_line(args: list[str]) -> str:
    """The CLI's one ``error:`` line (exit code 2 and a single line, or the test fails)."""
    result = runner.invoke(app, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, (args[0], result.exit_code, result.stderr[-2000:])
    return errors[0]


@pytest.mark.parametrize("edit", list(EDITS))
def test_resume_export_and_report_refuse_an_edited_run_with_one_line(edit, finished_run, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    asked = tmp_path / "asked.json"  # the configuration the run was made with, as --resume asks for it
    shutil.copy(run / "config.json", asked)
    change, needle = EDITS[edit]
    change(run)
    resume = error_line(["run", "--config", str(asked), "--out", str(run), "--resume", "--quiet"])
    export = error_line(["export", str(run), str(tmp_path / "exported"), "--quiet"])
    report = error_line(["report", str(run)])
    assert needle in resume, resume
    assert export == resume and report == resume
    assert not (tmp_path / "exported").exists()


def test_export_and_report_refuse_edited_results_with_one_line(finished_run, tmp_path) -> None:
    """results.json is not read by --resume (it rewrites it from the checkpoint); the readers hold it to the
    checkpoint instead."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    edit_json("results.json", lambda r: r["accuracy_matrix"][1].__setitem__(0, 0.99))(run)
    export = error_line(["export", str(run), str(tmp_path / "exported"), "--quiet"])
    report = error_line(["report", str(run)])
    assert "results.json: does not match the checkpoint (accuracy_matrix[1][0]" in export, export
    assert report == export


def test_an_unedited_run_reads_back(finished_run, tmp_path) -> None:
    """The control: the same commands on the untouched copy succeed (what the cases above refuse is the edit)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    assert runner.invoke(app, ["export", str(run), str(tmp_path / "exported"), "--quiet"]).exit_code == 0
