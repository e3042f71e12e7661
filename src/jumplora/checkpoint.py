"""The run directory: outputs, and the task-boundary checkpoints that make a run resumable.

Layout of ``out/``::

    config.json            the configuration (a resumed run must match it)
    results.json           R so far, metrics, analytics; ``"complete": true`` only at the very end
    train_log.jsonl        one line per logged optimizer step
    plots/*.png            heatmap, curves, density, overlap, training curves (at the end)
    checkpoint/state.json  the commit point: task pointer, rows of R, analytics, step counter
    checkpoint/update_NNN.safetensors   task NNN's merged sparse update (values at the kept entries + mask)
    checkpoint/strategy.safetensors     strategy state (ELLA's W_past, O-LoRA's past A's)
    checkpoint/adapter/    a shared adapter not merged yet (SeqLoRA), PEFT format (safetensors)

Only updates are stored, never a copy of the base model: resuming reloads the base model and replays
the updates in order, which reproduces the merged weights bit for bit. ``state.json`` is written last,
so a crash at any moment leaves the previous consistent checkpoint. Seeds are derived per task, so a
task interrupted midway is simply re-run from its start and gives the same numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import peft
import torch
from torch import nn

from jumplora.adapters.sparsity import MergeResult
from jumplora.config import RunConfig
from jumplora.io import atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, read_jsonl

if TYPE_CHECKING:
    from jumplora.engine import ContinualTrainer

FORMAT_VERSION = 1
# Keys that may differ between the original run and its resumption.
_RESUME_FREE_KEYS = {"out", "plots", "log_every", "checkpoint_every"}


class RunDirectoryError(ValueError):
    """The output directory cannot be used as asked (exists, or does not match on resume)."""


class RunDirectory:
    def __init__(self, out: Path, config: RunConfig) -> None:
        self.out = Path(out)
        self.config = config
        self.ckpt = self.out / "checkpoint"

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", self.config.to_dict())
        (self.out / "train_log.jsonl").unlink(missing_ok=True)
        if self.ckpt.exists():
            shutil.rmtree(self.ckpt)

    def has_checkpoint(self) -> bool:
        return (self.ckpt / "state.json").is_file()

    def check_matches(self) -> None:
        saved_path = self.out / "config.json"
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunDirectoryError(f"{saved_path}: cannot read the run's configuration ({err})") from err
        now = self.config.to_dict()
        diff = sorted(
            k for k in set(saved) | set(now) if k not in _RESUME_FREE_KEYS and saved.get(k) != now.get(k)
        )
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in diff)
            raise RunDirectoryError(f"{saved_path}: --resume with a different configuration ({details})")

    def restore(self, trainer: ContinualTrainer) -> nn.Module | None:
        """Load the last checkpoint into ``trainer``; returns the model after the last finished task."""
        if not self.has_checkpoint():
            return None
        self.check_matches()
        state_path = self.ckpt / "state.json"
        state = json.loads(state_path.read_text())
        if state.get("format") != FORMAT_VERSION:
            raise RunDirectoryError(f"{state_path}: unknown checkpoint format {state.get('format')!r}")
        st = trainer.state
        st.next_task = state["next_task"]
        st.zero_shot = state["zero_shot"]
        st.rows = state["rows"]
        st.per_task = state["per_task"]
        st.global_step = state["global_step"]
        st.wall_time_s = state["wall_time_s"]

        model = trainer.base_model
        for i in range(st.next_task):
            path = self.ckpt / f"update_{i:03d}.safetensors"
            if path.exists():
                _apply_update(model, load_tensors(path))
        trainer.supports = [
            _load_support(self.ckpt / f"support_{i:03d}.safetensors") for i in range(st.next_task)
        ]
        if trainer.strategy is not None and (self.ckpt / "strategy.safetensors").exists():
            trainer.strategy.load_state_tensors(load_tensors(self.ckpt / "strategy.safetensors"))
        if (self.ckpt / "adapter").is_dir() and state.get("shared_adapter"):
            model = peft.PeftModel.from_pretrained(model, self.ckpt / "adapter", is_trainable=True)
        # drop log lines of the task that was interrupted
        log = self.out / "train_log.jsonl"
        kept = [r for r in read_jsonl(log) if r.get("task_index", 0) < st.next_task]
        atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))
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
        if done > 0:
            task = done - 1
            if merged is not None:
                atomic_save_tensors(self.ckpt / f"update_{task:03d}.safetensors", _pack_update(merged))
            atomic_save_tensors(
                self.ckpt / f"support_{task:03d}.safetensors",
                {k: v.contiguous() for k, v in trainer.supports[task].items()},
            )
        if trainer.strategy is not None:
            atomic_save_tensors(self.ckpt / "strategy.safetensors", trainer.strategy.state_tensors())
        shared = isinstance(model, peft.PeftModel)
        if shared:
            tmp = self.ckpt / "adapter.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(tmp)
            final = self.ckpt / "adapter"
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        state = {
            "format": FORMAT_VERSION,
            "next_task": st.next_task,
            "zero_shot": st.zero_shot,
            "rows": st.rows,
            "per_task": st.per_task,
            "global_step": st.global_step,
            "wall_time_s": st.wall_time_s,
            "shared_adapter": shared,
        }
        atomic_write_json(self.ckpt / "state.json", state)  # the commit point
        atomic_write_json(self.out / "results.json", partial_results)

    def finish(self, trainer: ContinualTrainer, results: dict[str, Any]) -> None:
        if not trainer.is_main:
            return
        if trainer.config.plots:
            results["plots"] = _write_plots(self.out, results)
        atomic_write_json(self.out / "results.json", results)


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


def _apply_update(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    names = {key.split("::")[0] for key in tensors}
    for name in sorted(names):
        if name not in modules:
            raise RunDirectoryError(f"checkpoint update names module {name!r}, which the model does not have")
        weight = modules[name].weight
        if f"{name}::dense" in tensors:
            update = tensors[f"{name}::dense"]
        else:
            mask = tensors[f"{name}::mask"]
            update = torch.zeros(mask.shape, dtype=torch.float32)
            update[mask] = tensors[f"{name}::values"]
        if type(modules[name]).__name__ == "Conv1D":
            update = update.t()
        with torch.no_grad():
            weight.data += update.to(device=weight.device, dtype=weight.dtype)


def _load_support(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path) if path.exists() else {}


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
        written.append(
            plot_accuracy_heatmap(matrix, names, plots / "accuracy_heatmap.png", title=results["label"])
        )
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
