"""The run directory: outputs, and the checkpoints that make a run resumable.

Layout of ``out/``::

    config.json            the configuration (a resumed run must match it)
    results.json           R so far, metrics, analytics; ``"complete": true`` only at the very end
    train_log.jsonl        one line per logged optimizer step
    plots/*.png            heatmap, curves, density, overlap, training curves (at the end)
    checkpoint/state.json  the commit point: task pointer, rows of R, analytics, step counter, and the
                           names of the files below that make up the checkpoint
    checkpoint/update_NNN.safetensors    task NNN's merged sparse update (values at the kept entries + mask)
    checkpoint/support_NNN.safetensors   task NNN's support (for the overlap analytics)
    checkpoint/strategy_NNN.safetensors  strategy state after NNN tasks (ELLA's W_past, O-LoRA's past A's)
    checkpoint/adapter_NNN.safetensors   a shared adapter not merged yet (SeqLoRA) after NNN tasks
    checkpoint/partial_NNN.safetensors   optional mid-task checkpoint of task NNN (``--checkpoint-every``):
                                         adapter, optimizer moments, RNG states; the rest is in state.json

Only updates are stored, never a copy of the base model: resuming reloads the base model and replays
the updates in order, which reproduces the merged weights bit for bit. Every file is written to a
temporary name and renamed; files whose content changes from task to task carry the task count in
their name, and ``state.json`` (written last) names the ones that belong together, so a crash at any
moment leaves the previous consistent checkpoint. Unreferenced files are deleted after each commit.
Seeds are derived per task, so a task interrupted midway (without a mid-task checkpoint) is simply
re-run from its start and gives the same numbers. Nothing here is ever unpickled: tensors are
safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import peft
import torch
from torch import nn

from jumplora import faults
from jumplora.adapters.sparsity import MergeResult
from jumplora.config import RunConfig
from jumplora.export import apply_update as _apply_update  # the update format's reader lives there
from jumplora.io import (
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    read_jsonl,
    remove_temporaries,
)

if TYPE_CHECKING:
    from jumplora.engine import ContinualTrainer

FORMAT_VERSION = 2
# Keys that may differ between the original run and its resumption.
_RESUME_FREE_KEYS = {"out", "plots", "log_every", "checkpoint_every"}
# Files in checkpoint/ that a newer commit replaces (deleted once no state.json names them).
_VERSIONED_PREFIXES = ("strategy_", "adapter_", "partial_")


class RunDirectoryError(ValueError):
    """The output directory cannot be used as asked (exists, or does not match on resume)."""


class RunDirectory:
    def __init__(self, out: Path, config: RunConfig) -> None:
        self.out = Path(out)
        self.config = config
        self.ckpt = self.out / "checkpoint"
        self._state: dict[str, Any] | None = None  # the committed state.json

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """A fresh run: clear what an earlier run left (results first: never a stale 'complete')."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").unlink(missing_ok=True)
        if self.ckpt.exists():
            shutil.rmtree(self.ckpt)
        if (self.out / "plots").is_dir():
            shutil.rmtree(self.out / "plots")
        (self.out / "train_log.jsonl").unlink(missing_ok=True)
        remove_temporaries(self.out)
        atomic_write_json(self.out / "config.json", self.config.to_dict())
        self._state = None

    def has_checkpoint(self) -> bool:
        return (self.ckpt / "state.json").is_file()

    def check_matches(self) -> None:
        saved_path = self.out / "config.json"
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunDirectoryError(f"{saved_path}: cannot read the run's configuration ({err})") from err
        now = self.config.to_dict()
        diff = sorted(k for k in set(saved) | set(now) if k not in _RESUME_FREE_KEYS and saved.get(k) != now.get(k))
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in diff)
            raise RunDirectoryError(f"{saved_path}: --resume with a different configuration ({details})")

    def read_state(self) -> dict[str, Any]:
        state_path = self.ckpt / "state.json"
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunDirectoryError(f"{state_path}: cannot read the checkpoint ({err})") from err
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            found = state.get("format") if isinstance(state, dict) else None
            raise RunDirectoryError(f"{state_path}: unknown checkpoint format {found!r}")
        for name in [*state["updates"], *state["supports"], state["strategy"], state["adapter"]]:
            if name is not None and not (self.ckpt / name).is_file():
                raise RunDirectoryError(f"{state_path}: names {name}, which is missing from {self.ckpt}")
        return state

    def restore(self, trainer: ContinualTrainer) -> nn.Module | None:
        """Load the last checkpoint into ``trainer``; returns the model after the last finished task.

        A mid-task checkpoint of the next task is left in ``trainer.pending_partial`` for ``train_task``.
        """
        if not self.has_checkpoint():
            return None
        self.check_matches()
        state = self.read_state()
        st = trainer.state
        st.next_task = state["next_task"]
        st.zero_shot = state["zero_shot"]
        st.rows = state["rows"]
        st.per_task = state["per_task"]
        st.global_step = state["global_step"]
        st.wall_time_s = state["wall_time_s"]

        model = trainer.base_model
        for name in state["updates"]:
            if name is not None:
                _apply_update(model, load_tensors(self.ckpt / name))
        trainer.supports = [load_tensors(self.ckpt / name) for name in state["supports"]]
        if trainer.strategy is not None and state["strategy"] is not None:
            trainer.strategy.load_state_tensors(load_tensors(self.ckpt / state["strategy"]))
        if state["adapter"] is not None:
            model = peft.get_peft_model(model, trainer.adapter_config())
            load_adapter_tensors(model, load_tensors(self.ckpt / state["adapter"]), self.ckpt / state["adapter"])
        partial = state.get("partial")
        trainer.pending_partial = None
        if partial is not None and partial["task"] == st.next_task:
            path = self.ckpt / partial["file"]
            if path.is_file():
                trainer.pending_partial = (partial, load_tensors(path))
        self._state = state
        if trainer.is_main:  # drop the log lines written after the checkpoint
            log = self.out / "train_log.jsonl"
            done = trainer.pending_partial[0]["step"] if trainer.pending_partial else 0
            kept = [
                r
                for r in read_jsonl(log)
                if r.get("task_index", 0) < st.next_task
                or (r.get("task_index") == st.next_task and r.get("step", 0) <= done)
            ]
            atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))
            remove_temporaries(self.out)
            remove_temporaries(self.ckpt)
        return model

    def save(
        self,
        trainer: ContinualTrainer,
        model: nn.Module,
        *,
        merged: MergeResult | None = None,
        partial_results: dict[str, Any],
    ) -> None:
        """Checkpoint after the zero-shot evaluation and after each task (main process only)."""
        if not trainer.is_main:
            return
        st = trainer.state
        self.ckpt.mkdir(parents=True, exist_ok=True)
        done = st.next_task
        previous = self._state or {"updates": [], "supports": []}
        updates = list(previous["updates"])[: max(done - 1, 0)]
        support_files = list(previous["supports"])[: max(done - 1, 0)]
        if done > 0:
            task = done - 1
            update_name = None
            if merged is not None:
                update_name = f"update_{task:03d}.safetensors"
                atomic_save_tensors(self.ckpt / update_name, _pack_update(merged))
            updates.append(update_name)
            support_name = f"support_{task:03d}.safetensors"
            atomic_save_tensors(
                self.ckpt / support_name, {k: v.contiguous() for k, v in trainer.supports[task].items()}
            )
            support_files.append(support_name)
        strategy_name = None
        if trainer.strategy is not None:
            strategy_name = f"strategy_{done:03d}.safetensors"
            atomic_save_tensors(self.ckpt / strategy_name, trainer.strategy.state_tensors())
        adapter_name = None
        if isinstance(model, peft.PeftModel):
            adapter_name = f"adapter_{done:03d}.safetensors"
            atomic_save_tensors(self.ckpt / adapter_name, adapter_tensors(model))
        faults.point("checkpoint")
        state = {
            "format": FORMAT_VERSION,
            "next_task": st.next_task,
            "zero_shot": st.zero_shot,
            "rows": st.rows,
            "per_task": st.per_task,
            "global_step": st.global_step,
            "wall_time_s": st.wall_time_s,
            "updates": updates,
            "supports": support_files,
            "strategy": strategy_name,
            "adapter": adapter_name,
            "partial": None,
        }
        self._commit(state)
        faults.point("commit")
        atomic_write_json(self.out / "results.json", partial_results)

    def save_partial(self, trainer: ContinualTrainer, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Mid-task checkpoint (``--checkpoint-every``): the task-boundary state plus ``meta``/``tensors``."""
        if not trainer.is_main or self._state is None:
            return
        name = f"partial_{meta['task']:03d}_{meta['step']:06d}.safetensors"
        atomic_save_tensors(self.ckpt / name, tensors)
        faults.point("checkpoint")
        self._commit({**self._state, "partial": {**meta, "file": name}})
        faults.point("commit")

    def _commit(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.ckpt / "state.json", state)  # the commit point
        self._state = state
        keep = {state["strategy"], state["adapter"], (state["partial"] or {}).get("file")}
        for path in self.ckpt.iterdir():
            if path.name.startswith(_VERSIONED_PREFIXES) and path.name not in keep:
                path.unlink(missing_ok=True)
        remove_temporaries(self.ckpt)

    def finish(self, trainer: ContinualTrainer, results: dict[str, Any]) -> None:
        if not trainer.is_main:
            return
        if trainer.config.plots:
            results["plots"] = _write_plots(self.out, results)
        faults.point("finish")
        atomic_write_json(self.out / "results.json", results)
        remove_temporaries(self.out)


# -- adapter and training state -----------------------------------------------------------------------
def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every JumpLoRA parameter of ``model`` (A, B, θ), by parameter name."""
    return {name: p.detach() for name, p in model.named_parameters() if "jumplora_" in name}


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    params = {name: p for name, p in model.named_parameters() if "jumplora_" in name}
    if set(params) != set(tensors):
        missing = sorted(set(params) ^ set(tensors))[:3]
        raise RunDirectoryError(f"{source}: adapter tensors do not match the model (e.g. {missing})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))


def capture_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Adapter, optimizer, scheduler and RNG states as (JSON-able dict, tensors): no pickles."""
    tensors = {f"adapter.{k}": v for k, v in adapter_tensors(model).items()}
    opt = optimizer.state_dict()
    opt_keys: dict[str, dict[str, Any]] = {}
    for idx, slots in opt["state"].items():
        opt_keys[str(idx)] = {}
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value
                opt_keys[str(idx)][key] = None
            else:
                opt_keys[str(idx)][key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for k, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{k}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_state = random.getstate()
    meta = {
        "optimizer": {"param_groups": opt["param_groups"], "state": opt_keys},
        "scheduler": scheduler.state_dict(),
        "rng": {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        },
    }
    return meta, tensors


def restore_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, meta: dict, tensors: dict
) -> None:
    """Inverse of :func:`capture_training_state` except the RNG states (see :func:`restore_rng`)."""
    adapter = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    load_adapter_tensors(model, adapter, "mid-task checkpoint")
    state: dict[int, dict[str, Any]] = {}
    for idx, slots in meta["optimizer"]["state"].items():
        state[int(idx)] = {key: tensors[f"opt.{idx}.{key}"] if value is None else value for key, value in slots.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(dict(meta["scheduler"]))


def restore_rng(meta: dict, tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["rng"]["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _pack_update(merged: MergeResult) -> dict[str, torch.Tensor]:
    """Kept entries and their mask (dense updates are stored whole: their mask is all True)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, update in merged.updates.items():
        mask = merged.supports[name]
        if mask.all():
            tensors[f"{name}::dense"] = update.contiguous()
        else:
            tensors[f"{name}::mask"] = mask.contiguous()
            tensors[f"{name}::values"] = update[mask].contiguous()
    return tensors


def _write_plots(out: Path, results: dict[str, Any]) -> list[str]:
    import numpy as np

    from jumplora.io import read_jsonl as _read
    from jumplora.metrics import (
        plot_accuracy_curves,
        plot_accuracy_heatmap,
        plot_density,
        plot_overlap,
        plot_training_curves,
    )

    plots = out / "plots"
    names = results["tasks"]
    written = []
    matrix = np.array(results["accuracy_matrix"])
    if matrix.ndim == 2 and matrix.shape[0] == matrix.shape[1] == len(names):
        written.append(plot_accuracy_heatmap(matrix, names, plots / "accuracy_heatmap.png", title=results["label"]))
        written.append(plot_accuracy_curves(matrix, names, plots / "accuracy_curves.png"))
    per_task = results.get("per_task") or []
    if per_task and len(per_task) == len(names):
        written.append(plot_density([t["density"] for t in per_task], names, plots / "density.png"))
    if results.get("overlap_matrix") and len(results["overlap_matrix"]) == len(names):
        written.append(plot_overlap(np.array(results["overlap_matrix"]), names, plots / "overlap.png"))
    log = _read(out / "train_log.jsonl")
    if log:
        written.append(plot_training_curves(log, plots / "training_curves.png"))
    return [str(Path(p).relative_to(out)) for p in written]
