"""What every runner shares: the run directory, the training log, trackers, evaluation and results.json."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from jumplora.build import Setup
from jumplora.cl import Strategy
from jumplora.config import RESUME_FREE_KEYS
from jumplora.data import stream_fingerprint
from jumplora.environment import run_environment
from jumplora.results import RunResults
from jumplora.run.directory import RunDirectory
from jumplora.run.record import RunState, build_results
from jumplora.train.loop import TaskLoop
from jumplora.train.merge import merge_task
from jumplora.train.numerics import task_label

log = logging.getLogger("jumplora")

#: train_log.jsonl keys that are not tracker scalars: the x-axis and labels.
_NOT_SCALARS = frozenset({"step", "global_step", "task_index", "task"})


def tracker_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A train_log.jsonl record as tracker scalars under ``train/`` (θ: the mean over threshold groups)."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):  # θ per threshold group
            numbers = [v for v in value.values() if isinstance(v, (int, float))]
            value = sum(numbers) / len(numbers) if numbers else None
        if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
            values[f"train/{key}"] = float(value)
    return values


def training_line(record: dict[str, Any]) -> str:
    """One logged step for a redirected log: task, step, loss, and γ/density when sparse."""
    parts = [f"{record['task']} step {record['step']}"]
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4f}")
    if record.get("gamma"):
        parts.append(f"gamma {record['gamma']:.2f}")
    if record.get("density") is not None:
        parts.append(f"density {100 * record['density']:.2f}%")
    return "  ".join(parts)


class Runner:
    """Shared by the runners; a subclass says how the tasks follow each other (:meth:`run`)."""

    #: The registry name (``--runner``).
    name: ClassVar[str] = ""
    #: Why this runner cannot shard the base model (None: it can).
    shard_refusal: ClassVar[str | None] = None

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.config = setup.config
        self.out = Path(self.config.out)
        fingerprint = stream_fingerprint(setup.stream)
        self.rundir = RunDirectory(self.out, self.config.to_dict(), len(setup.tasks), fingerprint=fingerprint,
                                   free_keys=RESUME_FREE_KEYS)  # fmt: skip
        self.state = RunState()
        self._environment: dict[str, Any] | None = None

    def run(self, fresh: bool = False) -> RunResults:
        raise NotImplementedError

    @property
    def strategy(self) -> Strategy:
        """The strategy the tasks train with (the configured one; reference rows use none)."""
        return self.setup.strategy

    # -- training ----------------------------------------------------------------------------------------
    def train_task(
        self, model: nn.Module, task_index: int, features: list[dict], *, name: str | None = None,
        partial: tuple[dict, dict] | None = None, on_checkpoint: Any = None,
    ) -> nn.Module:  # fmt: skip
        """Train the adapter of ``model`` on ``features``; returns the (unwrapped) PEFT model.

        ``name`` labels the log (default: the task's name); ``partial``: a mid-task checkpoint (meta,
        tensors) to continue from; ``on_checkpoint(meta, tensors)`` every ``checkpoint_every`` steps."""
        s = self.setup
        loop = TaskLoop(
            model, task_index, features, config=self.config, accelerator=s.accelerator, family=s.loaded.family,
            strategy=self.strategy, ctx=s.context(model, task_index), counter=self.state, name=name,
            shard=s.runtime.shard, on_log=self._log, progress=s.runtime.progress,
        )  # fmt: skip
        if partial is not None:
            loop.restore(*partial)
        return loop.run(on_checkpoint)

    def merge(self, peft_model: nn.Module, task_index: int) -> Any:
        """Merge the task's update into the base weights (divergence-checked)."""
        label = task_label(self.setup.tasks[task_index].task.name, task_index)
        return merge_task(peft_model, self.config.adapter, seed=self.config.task_seed(task_index),
                          sharded=self.setup.runtime.shard != "none", label=label)  # fmt: skip

    # -- logging and tracking ------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.rundir.append_log(record)
        if not sys.stderr.isatty():  # no progress bar to watch: a line per logged step instead
            log.info("%s", training_line(record))
        if self.config.report_to:
            self.setup.accelerator.log(tracker_scalars(record), step=record["global_step"])

    def _track_evaluation(self, accuracies: list[float], metrics: dict[str, float | None] | None = None) -> None:
        """Trackers get each task's accuracy after every evaluation and, at the end, OP/BWT/FWT."""
        if not self.config.report_to:
            return
        names = [d.task.name for d in self.setup.tasks]
        values = {f"eval/acc/{name}": acc for name, acc in zip(names, accuracies, strict=False) if acc is not None}
        values.update({f"eval/{k}": v for k, v in (metrics or {}).items() if v is not None})
        self.setup.accelerator.log(values, step=self.state.global_step)

    def environment(self) -> dict[str, Any]:
        """results.json's ``environment`` (measured once; its warnings are logged then, on rank 0)."""
        if self._environment is None:
            loaded = self.setup.loaded
            self._environment = run_environment(self.setup.accelerator, self.config, loaded and loaded.model)
            for warning in self._environment["warnings"] if self.setup.is_main else []:
                log.warning("warning: %s", warning)
        return self._environment

    def _start_trackers(self) -> None:
        self.environment()
        if self.config.report_to:
            flat = {k: v for k, v in self.config.flat().items() if isinstance(v, (int, float, str, bool))}
            self.setup.accelerator.init_trackers("jumplora", config=flat)

    # -- evaluation and results ----------------------------------------------------------------------------
    def _evaluate(self, model: nn.Module, number: int, after: str) -> dict[str, list[float]]:
        """Every task's scores; with ``save_predictions``, each item's answers go to predictions/."""
        kept: dict[str, list[dict]] | None = {} if self.config.save_predictions else None
        desc = "zero-shot eval" if after == "zero-shot" else f"eval {after}"
        scores = self.setup.evaluator.evaluate_all(model, self.setup.tasks, desc, kept)
        if kept is not None and self.setup.is_main:
            self.rundir.write_predictions(number, after, kept)
        return scores

    def _record(self, scores: dict[str, list[float]], zero_shot: bool = False) -> None:
        """One evaluation of every task, kept in the state and shown to the trackers."""
        self._track_evaluation(scores["accuracy"])
        self.state.record(scores, zero_shot)

    def results(self, complete: bool, **override: Any) -> RunResults:
        s = self.setup
        run = {
            "runner": self.name, "label": self.config.label, "stream": s.stream.name, "config": self.config.to_dict(),
            "tasks": [d.task.name for d in s.tasks],
            "task_options": {d.task.name: list(d.task.options) for d in s.tasks},
            "precision": s.runtime.precision.as_dict(),
            "dropped_eval_items": {d.task.name: d.task.dropped for d in s.tasks if d.task.dropped},
            "environment": self.environment(),
        }  # fmt: skip
        return build_results(self.state, run, complete, **override)  # type: ignore[return-value]

    def finish(self, results: RunResults) -> RunResults:
        self._track_evaluation([], results.get("metrics"))
        if self.setup.is_main:
            if self.config.plots:
                from jumplora.metrics.plots import write_run_plots

                results["plots"] = write_run_plots(self.out, results)
            self.rundir.finish(results)
        return results
