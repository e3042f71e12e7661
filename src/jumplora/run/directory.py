"""The run directory: the one module that knows where a run's files are, and reads and writes them.

Layout of ``out/`` (every name below is written in this module only; tests/test_architecture.py
checks that no other module outside ``jumplora/run/`` builds a path inside a run directory)::

    config.json            the configuration (a resumed run must match it)
    results.json           R so far, metrics, analytics; ``"complete": true`` only at the very end
    train_log.jsonl        one line per logged optimizer step
    plots/*.png            heatmap, curves, density, overlap, training curves (at the end)
    predictions/NN-after-TASK.jsonl   each evaluation's answers (``--save-predictions``)
    tracking/              the trackers' files (``--report-to``)
    .jumplora.lock         the run lock (``jumplora.lock``)
    checkpoint/state.json  the commit point: progress (task pointer, rows of R, analytics, step
                           counter), the data fingerprint, the files below with their sha256, and
                           a checksum of its own content
    checkpoint/update_NNN.safetensors    task NNN's merged sparse update (see ``adapters.updates``)
    checkpoint/support_NNN.safetensors   task NNN's support (for the overlap analytics)
    checkpoint/strategy_NNN.safetensors  strategy state after NNN tasks (ELLA's W_past, O-LoRA's past A's)
    checkpoint/adapter_NNN.safetensors   a shared adapter not merged yet (SeqLoRA) after NNN tasks
    checkpoint/partial_NNN_SSSSSS.safetensors  optional mid-task checkpoint of task NNN at step SSSSSS

Only updates are stored, never a copy of the base model: resuming reloads the base model and replays
the updates in order, which reproduces the merged weights bit for bit. Every file is written to a
temporary name and renamed; files whose content changes from task to task carry the task count in
their name, and ``state.json`` (written last) names the ones that belong together with their hashes, so
a crash at any moment leaves the previous consistent checkpoint, and an edited file is refused.

Writers (the runners) go through :class:`RunDirectory`. Readers of a run (export, report, drift, plots)
go through :func:`read_run`, which applies the checks of a resume with the same code and the same error
lines: results.json's schema; state.json's checksum and schema; config.json equal to the config the
checkpoint recorded; results.json agreeing with the checkpoint; every file the checkpoint names a
plain file inside ``checkpoint/`` whose sha256 matches. A reader that trusted results.json could be made
to print, export or plot something the run never computed. Nothing here is ever unpickled, and this
module holds values only: the runners decide what they mean.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load

from jumplora.io import append_jsonl, atomic_save_tensors, atomic_write_json, atomic_write_text, read_jsonl
from jumplora.io import remove_temporaries as _remove_temporaries
from jumplora.run.validate import (
    FORMAT_VERSION,
    first_difference,
    results_problem,
    state_checksum,
    validate_state,
)

# -- the layout: every name inside a run directory -------------------------------------------------------
_CONFIG = "config.json"
_RESULTS = "results.json"
_TRAIN_LOG = "train_log.jsonl"
_CHECKPOINT = "checkpoint"
_STATE = "state.json"
_PLOTS = "plots"
_TRACKING = "tracking"
_PREDICTIONS = "predictions"
_LOCK = ".jumplora.lock"
_RUN_FOLDERS = (_CHECKPOINT, _PLOTS, _TRACKING, _PREDICTIONS)  # folders a run writes into
# Files in checkpoint/ that a newer commit replaces (deleted once no state.json names them).
_VERSIONED_PREFIXES = ("strategy_", "adapter_", "partial_")


class RunDirectoryError(ValueError):
    """The output directory cannot be used as asked (exists, does not match on resume, or was edited)."""


def holds_results(path: str | Path) -> bool:
    """Whether ``path`` is a run directory with a results.json (finished or not)."""
    return (Path(path) / _RESULTS).exists()


def find_runs(root: str | Path) -> list[Path]:
    """All directories under ``root`` (inclusive) that contain a results.json, sorted."""
    return sorted({f.parent for f in Path(root).rglob(_RESULTS)})


def has_checkpoint(out: str | Path) -> bool:
    """Whether the run in ``out`` has committed a checkpoint (``--resume`` has something to continue)."""
    return _state_path(out).is_file()


def predictions_file(out: str | Path, number: int, after: str) -> Path:
    """``out/predictions/NN-after-TASK.jsonl``: evaluation ``number`` of the run (0 is zero-shot)."""
    return Path(out) / _PREDICTIONS / f"{number:02d}-{after.replace(' ', '-')}.jsonl"


def tracking_dir(out: str | Path) -> Path:
    """The folder the trackers (``--report-to``) write into."""
    return Path(out) / _TRACKING


def plots_dir(out: str | Path) -> Path:
    """The folder of the run's figures (``metrics.plots.write_run_plots``)."""
    return Path(out) / _PLOTS


def lock_file(out: str | Path) -> Path:
    """The run lock's file (held by ``jumplora.lock.RunLock``)."""
    return Path(out) / _LOCK


def read_train_log(out: str | Path) -> list[dict[str, Any]]:
    """train_log.jsonl's records (empty when the run logged nothing)."""
    return read_jsonl(Path(out) / _TRAIN_LOG)


def _state_path(out: str | Path) -> Path:
    return Path(out) / _CHECKPOINT / _STATE


@dataclass
class Progress:
    """What survives between tasks: the rows of R and per-task analytics so far."""

    next_task: int = 0
    zero_shot: list[float] | None = None
    rows: list[list[float]] = field(default_factory=list)
    per_task: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0
    wall_time_s: float = 0.0
    # The second metric of generative runs (option ranking beside exact match); empty otherwise.
    rank_zero_shot: list[float] | None = None
    rank_rows: list[list[float]] = field(default_factory=list)
    # The gold-answer NLL (L) and its standard error, rows like R's; empty in checkpoints made before L.
    nll_zero_shot: list[float] | None = None
    nll_se_zero_shot: list[float] | None = None
    nll_rows: list[list[float]] = field(default_factory=list)
    nll_se_rows: list[list[float]] = field(default_factory=list)


@dataclass
class Restored:
    """A checkpoint read back: plain values and tensors, checked against the run and their hashes."""

    progress: Progress
    updates: list[dict[str, torch.Tensor] | None]
    supports: list[dict[str, torch.Tensor]]
    strategy_state: dict[str, torch.Tensor] | None
    adapter: dict[str, torch.Tensor] | None
    partial: tuple[dict[str, Any], dict[str, torch.Tensor]] | None


class RunDirectory:
    """One run's folder. ``config`` is the run's config dict; ``num_tasks`` and ``fingerprint`` (data
    file → size:sha256) pin what a checkpoint may hold."""

    def __init__(
        self, out: Path, config: dict[str, Any], num_tasks: int, fingerprint: dict[str, str],
        free_keys: frozenset[str] = frozenset(),
    ) -> None:  # fmt: skip
        self.out = Path(out)
        self.config = config
        self.free_keys = free_keys  # top-level config keys a resumed run may change (output-only options)
        self.num_tasks = num_tasks
        self.fingerprint = fingerprint
        self.ckpt = self.out / _CHECKPOINT
        self._state: dict[str, Any] | None = None  # the committed state.json

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """A fresh run: clear what an earlier run left (results first: never a stale 'complete')."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / _RESULTS).unlink(missing_ok=True)
        for folder in (self.out / name for name in _RUN_FOLDERS):
            if folder.is_dir():
                shutil.rmtree(folder)
        (self.out / _TRAIN_LOG).unlink(missing_ok=True)
        _remove_temporaries(self.out)
        atomic_write_json(self.out / _CONFIG, self.config)
        self._state = None

    def has_checkpoint(self) -> bool:
        return has_checkpoint(self.out)

    # -- reading --------------------------------------------------------------------------------------
    def load(self, steps_per_task: list[int]) -> Restored | None:
        """The last committed checkpoint, validated, or None when there is none.

        ``steps_per_task``: optimizer steps of each task, to check a mid-task checkpoint's position.
        """
        if not self.has_checkpoint():
            return None
        state = _checked_state(self.out, self.num_tasks, steps_per_task)
        self._check_fingerprint(state)
        check_same_config(self.out, state["config"], self.config, self.free_keys)
        tensors = {name: _checked_tensors(self.out, state, name) for name in state["hashes"]}
        progress = Progress(**{k: state[k] for k in asdict(Progress()) if k in state})
        partial = None
        if state["partial"] is not None and state["partial"]["task"] == progress.next_task:
            partial = (state["partial"], tensors[state["partial"]["file"]])
        restored = Restored(
            progress=progress,
            updates=[tensors[name] if name else None for name in state["updates"]],
            supports=[tensors[name] for name in state["supports"]],
            strategy_state=tensors.get(state["strategy"]) if state["strategy"] else None,
            adapter=tensors.get(state["adapter"]) if state["adapter"] else None,
            partial=partial,
        )
        self._state = state
        return restored

    def _check_fingerprint(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.fingerprint:
            changed = sorted(k for k in set(state["fingerprint"]) | set(self.fingerprint)
                             if state["fingerprint"].get(k) != self.fingerprint.get(k))  # fmt: skip
            raise RunDirectoryError(
                f"{_state_path(self.out)}: the data changed since the checkpoint ({len(changed)} file(s), e.g. "
                f"{changed[0][-80:]}); start a new run (--overwrite) instead of resuming"
            )

    # -- writing ----------------------------------------------------------------------------------------
    def append_log(self, record: dict[str, Any]) -> None:
        """One logged optimizer step, appended to train_log.jsonl."""
        append_jsonl(self.out / _TRAIN_LOG, record)

    def trim_log(self, next_task: int, done_steps: int) -> None:
        """Drop the log lines written after the checkpoint (they will be written again)."""
        log = self.out / _TRAIN_LOG
        kept = [
            r
            for r in read_jsonl(log)
            if r.get("task_index", 0) < next_task
            or (r.get("task_index") == next_task and r.get("step", 0) <= done_steps)
        ]
        atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))
        _remove_temporaries(self.out)
        _remove_temporaries(self.ckpt)

    def commit(
        self,
        progress: Progress,
        *,
        update: dict[str, torch.Tensor] | None = None,
        support: dict[str, torch.Tensor] | None = None,
        strategy_state: dict[str, torch.Tensor] | None = None,
        adapter: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Checkpoint after the zero-shot evaluation (``next_task`` 0) and after each task."""
        self.ckpt.mkdir(parents=True, exist_ok=True)
        done = progress.next_task
        previous = self._state or {"updates": [], "supports": [], "hashes": {}}
        files = {"updates": list(previous["updates"])[: max(done - 1, 0)],
                 "supports": list(previous["supports"])[: max(done - 1, 0)]}  # fmt: skip
        hashes = {n: previous["hashes"][n] for n in [*files["updates"], *files["supports"]] if n}
        if done > 0:
            files["updates"].append(self._write(f"update_{done - 1:03d}.safetensors", update, hashes))
            files["supports"].append(self._write(f"support_{done - 1:03d}.safetensors", support, hashes))
        strategy_name = self._write(f"strategy_{done:03d}.safetensors", strategy_state, hashes)
        adapter_name = self._write(f"adapter_{done:03d}.safetensors", adapter, hashes)
        state = {
            "format": FORMAT_VERSION,
            **asdict(progress),
            **files,
            "strategy": strategy_name,
            "adapter": adapter_name,
            "partial": None,
            "hashes": hashes,
            "fingerprint": self.fingerprint,
            # What "the same run" means: config.json as written at the start, under the checksum.
            "config": self._state["config"] if self._state else self.config,
        }
        self._commit(state)

    def commit_partial(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Mid-task checkpoint: the task-boundary state plus the JSON ``meta`` and ``tensors``."""
        if self._state is None:
            return
        hashes = dict(self._state["hashes"])
        old = (self._state["partial"] or {}).get("file")
        hashes.pop(old, None)
        name = self._write(f"partial_{meta['task']:03d}_{meta['step']:06d}.safetensors", tensors, hashes)
        self._commit({**self._state, "partial": {**meta, "file": name}, "hashes": hashes})

    def _write(self, name: str, tensors: dict[str, torch.Tensor] | None, hashes: dict[str, str]) -> str | None:
        if tensors is None:
            return None
        atomic_save_tensors(self.ckpt / name, tensors)
        hashes[name] = file_sha256(self.ckpt / name)
        return name

    def _commit(self, state: dict[str, Any]) -> None:
        state = {**state, "checksum": state_checksum(state)}
        atomic_write_json(self.ckpt / _STATE, state)  # the commit point
        self._state = state
        keep = {state["strategy"], state["adapter"], (state["partial"] or {}).get("file")}
        for path in self.ckpt.iterdir():
            if path.name.startswith(_VERSIONED_PREFIXES) and path.name not in keep:
                path.unlink(missing_ok=True)
        _remove_temporaries(self.ckpt)

    def write_predictions(self, number: int, after: str, predictions: dict[str, list[dict[str, Any]]]) -> Path:
        """One file per evaluation, numbered in run order and rewritten whole (a resumed run repeats none)."""
        path = predictions_file(self.out, number, after)
        path.parent.mkdir(exist_ok=True)
        lines = (json.dumps({"after": after, "task": task, **r}) for task, rs in predictions.items() for r in rs)
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        return path

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_json(self.out / _RESULTS, results)

    def finish(self, results: dict[str, Any]) -> None:
        self.write_results(results)
        _remove_temporaries(self.out)


# -- the output folder ---------------------------------------------------------------------------------
def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """--out must be (or become) a writable directory, and not hold a run unless resumed/replaced.

    ``resume``/``overwrite`` act on a jumplora run only: a non-empty folder that is not one (no valid
    config.json) is refused, never cleared. Raises RunDirectoryError; the CLI and the API share it.
    """
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out}: exists and is not a directory")
    existing = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    if not existing.is_dir():
        raise RunDirectoryError(f"--out {out}: {existing} is not a directory")
    try:  # a real probe: read-only mounts, immutable folders and ACLs all show here
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise RunDirectoryError(f"--out {out}: cannot write in {existing} ({err.strerror or err})") from err
    if not (out.is_dir() and any(p.name != _LOCK for p in out.iterdir())):
        return
    if not (resume or overwrite):
        raise RunDirectoryError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    why_not = not_a_run(out)
    if why_not:
        flag = "--resume" if resume else "--overwrite"
        raise RunDirectoryError(f"{out}: holds files but not a jumplora run ({why_not}); {flag} acts on runs only, "
                                "so nothing was touched: choose another --out")  # fmt: skip
    for sub in (out / name for name in _RUN_FOLDERS):
        if sub.is_symlink() or (sub.exists() and not sub.is_dir()):
            raise RunDirectoryError(f"{sub}: the run writes a folder here, but this is a file or a symlink; "
                                    "nothing was touched: move it away")  # fmt: skip
    if resume and not has_checkpoint(out) and (out / _RESULTS).exists():
        raise RunDirectoryError(f"{out} has results but no checkpoint to resume from")


def not_a_run(out: Path) -> str:
    """Why the non-empty folder ``out`` is not a jumplora run directory ('' when it is one)."""
    from jumplora.config import PART_TYPES, ConfigError, check_types

    path = Path(out) / _CONFIG
    if not path.is_file() or path.is_symlink():
        return "no config.json"
    try:
        config = _read_json(path, "the run's configuration")
        check_types(config, str(path))
    except (RunDirectoryError, ConfigError) as err:
        return str(err)[:160]
    missing = [part for part in PART_TYPES if part not in config]
    return f"config.json has no {missing[0]!r} section" if missing else ""


# -- the checkpoint, read as --resume reads it ----------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    """A JSON file of the run, size-capped, depth-limited and strict; RunDirectoryError naming it."""
    from jumplora.data.safe import DataError, decode_utf8, loads_json, read_bytes

    try:
        return loads_json(decode_utf8(read_bytes(path, what), path, what), str(path))
    except DataError as err:
        raise RunDirectoryError(f"{path}: cannot read {what} ({str(err).removeprefix(f'{path}: ')[:160]})") from err


def read_state(out: str | Path) -> dict[str, Any]:
    """``out/checkpoint/state.json`` with its checksum verified (the schema is the caller's to check)."""
    path = _state_path(out)
    state = _read_json(path, "the checkpoint")
    if not isinstance(state, dict) or state.get("checksum") != state_checksum(state):
        raise RunDirectoryError(f"{path}: its checksum does not match its content (edited or damaged)")
    if state.get("format") != FORMAT_VERSION:
        raise RunDirectoryError(
            f"{path}: unknown checkpoint format {str(state.get('format'))[:20]} (this version reads "
            f"{FORMAT_VERSION}); start a new run (--overwrite)"
        )
    return state


def _checked_state(out: Path, num_tasks: int, steps_per_task: list[int]) -> dict[str, Any]:
    """state.json: checksum and format (:func:`read_state`), then every key, type and range."""
    state = read_state(out)
    try:
        validate_state(state, num_tasks, steps_per_task)
    except (KeyError, TypeError, ValueError) as err:
        raise RunDirectoryError(f"{_state_path(out)}: {err}") from err
    return state


def check_same_config(out: Path, recorded: Any, config: dict[str, Any] | None, free_keys: frozenset[str]) -> None:
    """One definition of "the same run": config.json equals the config the checkpoint recorded, and
    ``config`` (the run asked for now; None to check the files only) equals it but for ``free_keys``."""
    path = Path(out) / _CONFIG
    if not isinstance(recorded, dict):
        raise RunDirectoryError(f"{_state_path(out)}: field config must be an object")
    edited = first_difference(recorded, _read_json(path, "the run's configuration"))
    if edited:
        raise RunDirectoryError(f"{path}: edited since the checkpoint was written ({edited}); it no longer "
                                "says what ran: restore it, or start a new run (--overwrite)")  # fmt: skip
    if config is not None:
        changed = first_difference(recorded, config, skip=free_keys)
        if changed:
            raise RunDirectoryError(f"{path}: --resume with a different configuration (first difference "
                                    f"{changed}); use another --out or --overwrite")  # fmt: skip


def _checked_file(out: Path, name: Any) -> Path:
    """``checkpoint/name`` when it is a plain file name of a regular, non-symlinked file there."""
    folder = Path(out) / _CHECKPOINT
    path = folder / str(name)
    plain = isinstance(name, str) and name == Path(name).name and not name.startswith(".")
    if not plain or path.is_symlink() or (path.exists() and not path.is_file()):
        raise RunDirectoryError(f"{folder / _STATE}: file {str(name)[:60]!r} is not a plain file of {folder}")
    if not path.exists():
        raise RunDirectoryError(f"{folder / _STATE}: names {name}, which is missing from {folder}")
    return path


def _checked_tensors(out: Path, state: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """A tensor file state.json names, read once: its sha256 checked, then the same bytes parsed."""
    path = _checked_file(out, name)
    return read_hashed_tensors(path, state["hashes"][name], lambda err: _unreadable(path, err))


def _check_hashes(out: Path, state: dict[str, Any]) -> None:
    """Every file state.json names, in the order ``--resume`` reads them, against its sha256."""
    for name, expected in state["hashes"].items():
        path = _checked_file(out, name)
        try:
            digest = file_sha256(path)
        except OSError as err:
            raise RunDirectoryError(_unreadable(path, err)) from err
        if digest != expected:
            raise RunDirectoryError(_hash_mismatch(path))


def _unreadable(path: Path, err: OSError) -> str:
    return f"{path}: cannot read it ({err.strerror or err})"


def _hash_mismatch(path: Path) -> str:
    return f"{path}: content does not match the hash in state.json (edited or damaged)"


def read_hashed_tensors(path: Path, expected: str, unreadable: Callable[[OSError], str]) -> dict[str, torch.Tensor]:
    """One read of a tensor file: its sha256 checked against ``expected``, then the same bytes parsed.
    ``unreadable(err)`` is the error line when the file cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunDirectoryError(unreadable(err)) from err
    if hashlib.sha256(data).hexdigest() != expected:
        raise RunDirectoryError(_hash_mismatch(path))
    try:
        return safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types
        raise RunDirectoryError(f"{path}: not a readable safetensors file ({type(err).__name__})") from err


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- a finished (or running) run, read for export, report, drift and plots ---------------------------------
@dataclass
class RunRecord:
    """A validated run: its folder, results, and (when it has one) the verified checkpoint state."""

    path: Path
    results: dict[str, Any]
    state: dict[str, Any] | None

    @property
    def results_path(self) -> Path:
        """The run's results.json (for messages naming it)."""
        return self.path / _RESULTS

    @property
    def state_path(self) -> Path:
        """The run's checkpoint/state.json (for messages naming it)."""
        return _state_path(self.path)

    @property
    def updates(self) -> list[str | None]:
        """Each task's update file name (None where a shared adapter's update is folded into a later one)."""
        return list(self.state["updates"]) if self.state else []


def read_run(run_dir: str | Path, *, need_checkpoint: bool = False, complete: bool = True) -> RunRecord:
    """``run_dir`` (or its results.json) validated as ``--resume`` validates it; RunDirectoryError otherwise.

    results.json is read size-capped, strict and depth-limited and its schema checked key by key; when the
    run has a checkpoint, :func:`verify_checkpoint` holds it to what a resume would accept."""
    given = Path(run_dir)
    run = given.parent if given.name == _RESULTS else given
    path = run / _RESULTS
    results = _read_json(path, "the run's results")
    problem = results_problem(results)
    if problem:
        raise RunDirectoryError(f"{path}: {problem}")
    if complete and results.get("complete") is not True:
        raise RunDirectoryError(f'{path}: the run is incomplete ("complete" is not true); finish it first')
    if need_checkpoint and not has_checkpoint(run):
        raise RunDirectoryError(f"{_state_path(run)}: missing; the run kept no checkpoint")
    state = verify_checkpoint(run, results) if has_checkpoint(run) else None
    return RunRecord(run, results, state)


def verify_checkpoint(run: Path, results: dict[str, Any]) -> dict[str, Any]:
    """state.json (checksum, schema, files, hashes) and its agreement with config.json and results.json:
    the checks of ``RunDirectory.load``, in its order and with its error lines."""
    from jumplora.config import RESUME_FREE_KEYS

    num_tasks = len(results["tasks"])
    state = _checked_state(run, num_tasks, [2**62] * num_tasks)
    check_same_config(run, state["config"], None, frozenset())
    config = first_difference(state["config"], results["config"], skip=RESUME_FREE_KEYS)
    for key, name in (("rows", "accuracy_matrix"), ("zero_shot", "zero_shot"), ("per_task", "per_task")):
        differs = f"config.{config}" if config else first_difference({name: state[key]}, {name: results.get(name)})
        if differs:
            raise RunDirectoryError(f"{run / _RESULTS}: does not match the checkpoint ({differs}); "
                                    "edited or from another run")  # fmt: skip
    _check_hashes(run, state)
    return state


def load_checked_tensors(record: RunRecord, name: str) -> dict[str, Any]:
    """A tensor file the verified state names, read once: its sha256 checked, then the same bytes parsed."""
    if record.state is None or name not in record.state["hashes"]:
        raise RunDirectoryError(f"{record.state_path}: names no file {str(name)[:40]}")
    return _checked_tensors(record.path, record.state, name)
