"""The run directory in one process: commit → load gives back the values, and an edited checkpoint is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jumplora.run.directory import Progress, RunDirectory, RunDirectoryError

CONFIG = {"out": "x", "seed": 0}
FINGERPRINT = {"data/cb/train.json": "12:abc"}


def committed(tmp_path: Path, tasks_done: int = 2, num_tasks: int = 3) -> RunDirectory:
    """A run directory with the zero-shot commit and ``tasks_done`` task commits (plus a mid-task one)."""
    rundir = RunDirectory(tmp_path / "run", CONFIG, num_tasks, FINGERPRINT)
    rundir.start()
    progress = Progress(zero_shot=[0.1] * num_tasks)
    rundir.commit(progress, strategy_state={"w_past.q": torch.zeros(2, 2)})
    for task in range(tasks_done):
        progress.rows.append([0.5 + 0.1 * task] * num_tasks)
        progress.per_task.append({"task": f"t{task}", "density": 0.1})
        progress.next_task, progress.global_step = task + 1, 4 * (task + 1)
        mask = torch.tensor([[True, False], [False, True]])
        update = {"q::mask": mask, "q::values": torch.tensor([1.0, 2.0]) * (task + 1)}
        rundir.commit(progress, update=update, support={"q": mask}, strategy_state={"w_past.q": torch.ones(2, 2)})
    meta = {"task": tasks_done, "step": 2, "epoch": 0, "micro": 1, "global_step": 10}
    rundir.commit_partial(meta, {"x": torch.ones(1)})
    return rundir


def reopen(rundir: RunDirectory, fingerprint: dict[str, str] = FINGERPRINT) -> RunDirectory:
    return RunDirectory(rundir.out, CONFIG, rundir.num_tasks, fingerprint)


def test_commit_then_load_gives_the_values_back(tmp_path):
    restored = reopen(committed(tmp_path)).load(steps_per_task=[4, 4, 4])
    assert restored.progress.next_task == 2 and restored.progress.rows == [[0.5] * 3, [0.6] * 3]
    assert restored.progress.global_step == 8 and restored.progress.zero_shot == [0.1] * 3
    assert torch.equal(restored.updates[1]["q::values"], torch.tensor([2.0, 4.0]))
    assert torch.equal(restored.strategy_state["w_past.q"], torch.ones(2, 2))
    assert restored.adapter is None and restored.partial[0]["step"] == 2
    assert torch.equal(restored.partial[1]["x"], torch.ones(1))


def edit_state(rundir: RunDirectory, change) -> None:
    """Edit state.json as a user would (the checksum left as it was, or recomputed by ``change``)."""
    path = rundir.ckpt / "state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def recompute(change):
    """An edit that also recomputes the state's checksum, so only the schema check can catch it."""
    from jumplora.run.validate import state_checksum as _checksum

    def edit(state):
        change(state)
        state["checksum"] = _checksum(state)

    return edit


EDITS = {
    "fake accuracies (checksum kept)": (lambda s: s["rows"][0].__setitem__(0, 0.99), "checksum does not match"),
    "next_task past the stream": (recompute(lambda s: s.__setitem__("next_task", 5)), "field next_task"),
    "next_task negative": (recompute(lambda s: s.__setitem__("next_task", -1)), "field next_task"),
    "rows not next_task long": (recompute(lambda s: s["rows"].pop()), "field rows"),
    "row too short": (recompute(lambda s: s["rows"][0].pop()), "field rows[0]"),
    "accuracy out of range": (recompute(lambda s: s["rows"][0].__setitem__(0, 7)), "field rows[0]"),
    "missing key": (recompute(lambda s: s.pop("global_step")), "global_step"),
    "wrong type": (recompute(lambda s: s.__setitem__("next_task", "2")), "field next_task"),
    "partial step past the data": (recompute(lambda s: s["partial"].__setitem__("step", 99)), "field partial.step"),
    "file without hash": (recompute(lambda s: s["hashes"].pop(s["updates"][0])), "has no hash"),
    "unknown format": (recompute(lambda s: s.__setitem__("format", 1)), "unknown checkpoint format"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_state_is_refused(tmp_path, case):
    rundir = committed(tmp_path)
    change, needle = EDITS[case]
    edit_state(rundir, change)
    with pytest.raises(RunDirectoryError, match=re.escape(needle)):
        reopen(rundir).load(steps_per_task=[4, 4, 4])


@pytest.mark.parametrize("how", ["zeroed values", "empty tensor set", "truncated"])
def test_an_edited_tensor_file_is_refused(tmp_path, how):
    rundir = committed(tmp_path)
    path = rundir.ckpt / "update_000.safetensors"
    if how == "zeroed values":
        tensors = load_file(str(path))
        save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(path))
    elif how == "empty tensor set":
        save_file({}, str(path))
    else:
        path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(RunDirectoryError, match=r"update_000\.safetensors: content does not match the hash"):
        reopen(rundir).load(steps_per_task=[4, 4, 4])


def test_changed_data_refuses_resume(tmp_path):
    rundir = committed(tmp_path)
    with pytest.raises(RunDirectoryError, match="the data changed since the checkpoint"):
        reopen(rundir, {"data/cb/train.json": "13:def"}).load(steps_per_task=[4, 4, 4])


def test_unreadable_state_is_one_clear_error(tmp_path):
    rundir = committed(tmp_path)
    (rundir.ckpt / "state.json").write_text("[" * 100_000)
    with pytest.raises(RunDirectoryError, match="cannot read the checkpoint"):
        reopen(rundir).load(steps_per_task=[4, 4, 4])


def test_superseded_files_are_removed(tmp_path):
    rundir = committed(tmp_path)
    names = sorted(p.name for p in rundir.ckpt.iterdir())
    assert names == [
        "partial_002_000002.safetensors", "state.json", "strategy_002.safetensors", "support_000.safetensors",
        "support_001.safetensors", "update_000.safetensors", "update_001.safetensors",
    ]  # fmt: skip
