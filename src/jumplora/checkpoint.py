"""The run directory: outputs, and the checkpoints that make a run resumable.

Layout of ``out/``::

    config.json            the configuration (a resumed run must match it)
    results.json           R so far, metrics, analytics; ``"complete": true`` only at the very end
    train_log.jsonl        one line per logged optimizer step
    plots/*.png            heatmap, curves, density, overlap, training curves (at the end)
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
Nothing here is ever unpickled, and this module holds values only: the engine decides what they mean.
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

from jumplora.io import atomic_save_tensors, atomic_write_json, atomic_write_text, read_jsonl
from jumplora.io import remove_temporaries as _remove_temporaries

PREDICTIONS = "predictions"  # folder of per-evaluation answers (``save_predictions``)

FORMAT_VERSION = 4  # 4: state.json records the run's config (config.json must match it)
# Files in checkpoint/ that a newer commit replaces (deleted once no state.json names them).
_VERSIONED_PREFIXES = ("strategy_", "adapter_", "partial_")


class RunDirectoryError(ValueError):
    """The output directory cannot be used as asked (exists, does not match on resume, or was edited)."""


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
        self.ckpt = self.out / "checkpoint"
        self._state: dict[str, Any] | None = None  # the committed state.json

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """A fresh run: clear what an earlier run left (results first: never a stale 'complete')."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").unlink(missing_ok=True)
        for folder in (self.ckpt, self.out / "plots", self.out / "tracking", self.out / PREDICTIONS):
            if folder.is_dir():
                shutil.rmtree(folder)
        (self.out / "train_log.jsonl").unlink(missing_ok=True)
        _remove_temporaries(self.out)
        atomic_write_json(self.out / "config.json", self.config)
        self._state = None

    def has_checkpoint(self) -> bool:
        return (self.ckpt / "state.json").is_file()

    # -- reading --------------------------------------------------------------------------------------
    def load(self, steps_per_task: list[int]) -> Restored | None:
        """The last committed checkpoint, validated, or None when there is none.

        ``steps_per_task``: optimizer steps of each task, to check a mid-task checkpoint's position.
        """
        if not self.has_checkpoint():
            return None
        state = self._read_state(steps_per_task)
        check_same_config(self.out, state["config"], self.config, self.free_keys)
        tensors = {name: self._load_checked(name, state["hashes"]) for name in state["hashes"]}
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

    def _read_state(self, steps_per_task: list[int]) -> dict[str, Any]:
        path = self.ckpt / "state.json"
        state = read_state(self.out)
        try:
            _validate_state(state, self.num_tasks, steps_per_task)
        except (KeyError, TypeError, ValueError) as err:
            raise RunDirectoryError(f"{path}: {err}") from err
        if state["fingerprint"] != self.fingerprint:
            changed = sorted(k for k in set(state["fingerprint"]) | set(self.fingerprint)
                             if state["fingerprint"].get(k) != self.fingerprint.get(k))  # fmt: skip
            raise RunDirectoryError(
                f"{path}: the data changed since the checkpoint ({len(changed)} file(s), e.g. {changed[0][-80:]}); "
                "start a new run (--overwrite) instead of resuming"
            )
        return state

    def _load_checked(self, name: str, hashes: dict[str, str]) -> dict[str, torch.Tensor]:
        state = self.ckpt / "state.json"
        return read_hashed_tensors(
            self.ckpt / name, hashes[name], lambda err: f"{state}: names {name}, which is missing from {self.ckpt}"
        )

    def trim_log(self, next_task: int, done_steps: int) -> None:
        """Drop the log lines written after the checkpoint (they will be written again)."""
        log = self.out / "train_log.jsonl"
        kept = [
            r
            for r in read_jsonl(log)
            if r.get("task_index", 0) < next_task
            or (r.get("task_index") == next_task and r.get("step", 0) <= done_steps)
        ]
        atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))
        _remove_temporaries(self.out)
        _remove_temporaries(self.ckpt)

    # -- writing ----------------------------------------------------------------------------------------
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
        state = {**state, "checksum": _checksum(state)}
        atomic_write_json(self.ckpt / "state.json", state)  # the commit point
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
        atomic_write_json(self.out / "results.json", results)

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

    from jumplora.lock import LOCK_NAME

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
    if not (out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())):
        return
    if not (resume or overwrite):
        raise RunDirectoryError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    why_not = not_a_run(out)
    if why_not:
        flag = "--resume" if resume else "--overwrite"
        raise RunDirectoryError(f"{out}: holds files but not a jumplora run ({why_not}); {flag} acts on runs only, "
                                "so nothing was touched: choose another --out")  # fmt: skip
    for name in ("checkpoint", "plots", "tracking", PREDICTIONS):  # folders a run writes into
        sub = out / name
        if sub.is_symlink() or (sub.exists() and not sub.is_dir()):
            raise RunDirectoryError(f"{sub}: the run writes a folder here, but this is a file or a symlink; "
                                    "nothing was touched: move it away")  # fmt: skip
    if resume and not (out / "checkpoint" / "state.json").is_file() and (out / "results.json").exists():
        raise RunDirectoryError(f"{out} has results but no checkpoint to resume from")


def not_a_run(out: Path) -> str:
    """Why the non-empty folder ``out`` is not a jumplora run directory ('' when it is one)."""
    from jumplora.config import PART_TYPES, ConfigError, check_types

    path = Path(out) / "config.json"
    if not path.is_file() or path.is_symlink():
        return "no config.json"
    try:
        config = _read_json(path, "the run's configuration")
        check_types(config, str(path))
    except (RunDirectoryError, ConfigError) as err:
        return str(err)[:160]
    missing = [part for part in PART_TYPES if part not in config]
    return f"config.json has no {missing[0]!r} section" if missing else ""


# -- helpers ----------------------------------------------------------------------------------------------
def predictions_file(out: Path, number: int, after: str) -> Path:
    """``out/predictions/NN-after-TASK.jsonl``: evaluation ``number`` of the run (0 is zero-shot)."""
    return Path(out) / PREDICTIONS / f"{number:02d}-{after.replace(' ', '-')}.jsonl"


def _read_json(path: Path, what: str) -> Any:
    """A JSON file of the run, size-capped, depth-limited and strict; RunDirectoryError naming it."""
    from jumplora.data.safe import DataError, decode_utf8, loads_json, read_bytes

    try:
        return loads_json(decode_utf8(read_bytes(path, what), path, what), str(path))
    except DataError as err:
        raise RunDirectoryError(f"{path}: cannot read {what} ({str(err).removeprefix(f'{path}: ')[:160]})") from err


def read_state(out: Path) -> dict[str, Any]:
    """``out/checkpoint/state.json`` with its checksum verified (the schema is the caller's to check)."""
    path = Path(out) / "checkpoint" / "state.json"
    state = _read_json(path, "the checkpoint")
    if not isinstance(state, dict) or state.get("checksum") != _checksum(state):
        raise RunDirectoryError(f"{path}: its checksum does not match its content (edited or damaged)")
    if state.get("format") != FORMAT_VERSION:
        raise RunDirectoryError(
            f"{path}: unknown checkpoint format {str(state.get('format'))[:20]} (this version reads "
            f"{FORMAT_VERSION}); start a new run (--overwrite)"
        )
    return state


def check_same_config(out: Path, recorded: Any, config: dict[str, Any] | None, free_keys: frozenset[str]) -> None:
    """One definition of "the same run": config.json equals the config the checkpoint recorded, and
    ``config`` (the run asked for now; None to check the files only) equals it but for ``free_keys``."""
    path = Path(out) / "config.json"
    if not isinstance(recorded, dict):
        raise RunDirectoryError(f"{out / 'checkpoint' / 'state.json'}: field config must be an object")
    edited = first_difference(recorded, _read_json(path, "the run's configuration"))
    if edited:
        raise RunDirectoryError(f"{path}: edited since the checkpoint was written ({edited}); it no longer "
                                "says what ran: restore it, or start a new run (--overwrite)")  # fmt: skip
    if config is not None:
        changed = first_difference(recorded, config, skip=free_keys)
        if changed:
            raise RunDirectoryError(f"{path}: --resume with a different configuration (first difference "
                                    f"{changed}); use another --out or --overwrite")  # fmt: skip


def first_difference(saved: Any, now: Any, path: str = "", skip: frozenset[str] = frozenset()) -> str | None:
    """``field: saved → now`` for the first (dotted) field where two configs differ; None when equal.

    Top-level keys in ``skip`` are ignored; 1 equals 1.0 (a float field may be written either way)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in [*saved, *(k for k in now if k not in saved)]:
            if not path and key in skip:
                continue
            where = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in now:
                return f"{where}: {'absent' if key not in saved else 'set'} → {'absent' if key not in now else 'set'}"
            found = first_difference(saved[key], now[key], where)
            if found:
                return found
        return None
    if isinstance(saved, list | tuple) and isinstance(now, list | tuple) and len(saved) == len(now):
        found = (first_difference(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(saved, now, strict=True)))
        return next((f for f in found if f), None)
    if saved == now and isinstance(saved, bool) == isinstance(now, bool) and type(saved) is not list:
        return None
    return f"{path}: {_brief(saved)} → {_brief(now)}"


def _brief(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _checksum(state: dict[str, Any]) -> str:
    """sha256 of the state's content (all but the checksum itself), in canonical JSON."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_hashed_tensors(path: Path, expected: str, unreadable: Callable[[OSError], str]) -> dict[str, torch.Tensor]:
    """One read of a tensor file: its sha256 checked against ``expected``, then the same bytes parsed.
    ``unreadable(err)`` is the error line when the file cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunDirectoryError(unreadable(err)) from err
    if hashlib.sha256(data).hexdigest() != expected:
        raise RunDirectoryError(f"{path}: content does not match the hash in state.json (edited or damaged)")
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


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _validate_state(state: Any, num_tasks: int, steps_per_task: list[int]) -> None:
    """Every key, type and range of state.json; raises ValueError naming the field."""
    _expect(isinstance(state, dict), "the checkpoint is not a JSON object")
    _expect(state.get("format") == FORMAT_VERSION, f"unknown checkpoint format {str(state.get('format'))[:20]}")
    n = state["next_task"]
    _expect(type(n) is int and 0 <= n <= num_tasks, f"field next_task must be in [0, {num_tasks}], got {str(n)[:20]}")
    rows, zero_shot = state["rows"], state["zero_shot"]
    _expect(isinstance(zero_shot, list) and len(zero_shot) == num_tasks and all(map(_is_acc, zero_shot)),
            f"field zero_shot must hold {num_tasks} accuracies")  # fmt: skip
    _expect(isinstance(rows, list) and len(rows) == n, f"field rows must hold next_task={n} rows")
    for i, row in enumerate(rows):
        _expect(isinstance(row, list) and len(row) == num_tasks and all(map(_is_acc, row)),
                f"field rows[{i}] must hold {num_tasks} accuracies in [0, 1]")  # fmt: skip
    if state["rank_rows"]:
        _expect(len(state["rank_rows"]) == n and all(isinstance(r, list) and len(r) == num_tasks and
                                                      all(map(_is_acc, r)) for r in state["rank_rows"]),
                f"field rank_rows must hold next_task={n} rows of {num_tasks} accuracies")  # fmt: skip
    for key in ("per_task", "updates", "supports"):
        _expect(isinstance(state[key], list) and len(state[key]) == n, f"field {key} must have next_task={n} entries")
    _expect(type(state["global_step"]) is int and state["global_step"] >= 0, "field global_step must be an int >= 0")
    _expect(isinstance(state["wall_time_s"], (int, float)), "field wall_time_s must be a number")
    _expect(isinstance(state["fingerprint"], dict), "field fingerprint must be an object")
    _expect(isinstance(state["config"], dict), "field config must be an object")
    hashes = state["hashes"]
    _expect(isinstance(hashes, dict), "field hashes must be an object")
    named = [*state["updates"], *state["supports"], state["strategy"], state["adapter"]]
    if state["partial"] is not None:
        named.append(_validate_partial(state["partial"], n, steps_per_task))
    for name in named:
        _expect(name is None or (isinstance(name, str) and name in hashes and "/" not in name),
                f"file {str(name)[:40]} has no hash in field hashes")  # fmt: skip
    _expect(all(name is not None for name in state["supports"]), "field supports has an empty entry")


def _validate_partial(partial: Any, next_task: int, steps_per_task: list[int]) -> str:
    _expect(isinstance(partial, dict), "field partial must be an object")
    task, step = partial["task"], partial["step"]
    _expect(type(task) is int and task == next_task, f"field partial.task must be next_task={next_task}")
    limit = steps_per_task[task] if task < len(steps_per_task) else 0
    _expect(type(step) is int and 0 < step < limit, f"field partial.step must be in (0, {limit}), got {str(step)[:20]}")
    for key in ("epoch", "micro", "global_step"):
        _expect(type(partial[key]) is int and partial[key] >= 0, f"field partial.{key} must be an int >= 0")
    return partial["file"]


def _is_acc(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
