"""Runners: how the tasks of a stream follow each other, and the public ``ContinualTrainer``.

- :class:`ContinualRunner` — the continual stream: per task a fresh adapter (or the strategy's shared
  one), train, merge the gated update, evaluate every task; checkpointed after every task.
- :class:`MultitaskRunner` — every task's data at once (the upper bound), one row of R.
- :class:`IndependentRunner` — each task from the untouched model (FWT against training from scratch).

Every runner writes results.json in one shape (``jumplora.results.RunResults``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from jumplora.adapters import supports
from jumplora.adapters.updates import apply_update, pack_update
from jumplora.cl import make_strategy
from jumplora.config import RESUME_FREE_KEYS, RunConfig
from jumplora.data import stream_fingerprint
from jumplora.engine import Engine, scores_by_metric
from jumplora.environment import run_environment
from jumplora.lock import RunLock
from jumplora.metrics import cl_metrics, nll_metrics
from jumplora.results import RunResults
from jumplora.run.directory import (
    Progress,
    Restored,
    RunDirectory,
    check_out_dir,
    check_same_config,
    has_checkpoint,
    read_state,
)
from jumplora.training_state import adapter_tensors, load_adapter_tensors

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
    """Shared by the runners: the run directory, the log, trackers and the results.json shape."""

    name = ""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config
        self.out = Path(self.config.out)
        fingerprint = stream_fingerprint(engine.stream)
        self.rundir = RunDirectory(self.out, self.config.to_dict(), len(engine.tasks), fingerprint=fingerprint,
                                   free_keys=RESUME_FREE_KEYS)  # fmt: skip
        self.progress = Progress()
        self._start = time.perf_counter()
        self._elapsed_before = 0.0
        self._environment: dict[str, Any] | None = None
        engine.on_log = self._log

    def _log(self, record: dict[str, Any]) -> None:
        self.rundir.append_log(record)
        if not sys.stderr.isatty():  # no progress bar to watch: a line per logged step instead
            log.info("%s", training_line(record))
        if self.config.report_to:
            self.engine.accelerator.log(tracker_scalars(record), step=record["global_step"])

    def _track_evaluation(self, accuracies: list[float], metrics: dict[str, float | None] | None = None) -> None:
        """Trackers get each task's accuracy after every evaluation and, at the end, OP/BWT/FWT."""
        if not self.config.report_to:
            return
        names = [d.task.name for d in self.engine.tasks]
        values = {f"eval/acc/{name}": acc for name, acc in zip(names, accuracies, strict=False) if acc is not None}
        values.update({f"eval/{k}": v for k, v in (metrics or {}).items() if v is not None})
        self.engine.accelerator.log(values, step=self.engine.global_step)

    def environment(self) -> dict[str, Any]:
        """results.json's ``environment`` (measured once; its warnings are logged then, on rank 0)."""
        if self._environment is None:
            loaded = self.engine.loaded
            self._environment = run_environment(self.engine.accelerator, self.config, loaded and loaded.model)
            for warning in self._environment["warnings"] if self.engine.is_main else []:
                log.warning("warning: %s", warning)
        return self._environment

    def _start_trackers(self) -> None:
        self.environment()
        if self.config.report_to:
            flat = {k: v for k, v in self.config.flat().items() if isinstance(v, (int, float, str, bool))}
            self.engine.accelerator.init_trackers("jumplora", config=flat)

    def _evaluate(self, model: nn.Module, number: int, after: str) -> dict[str, list[float]]:
        """Every task's scores; with ``save_predictions``, each item's answers go to predictions/."""
        kept: dict[str, list[dict]] | None = {} if self.config.save_predictions else None
        scores = self.engine.evaluate_all(model, "zero-shot eval" if after == "zero-shot" else f"eval {after}", kept)
        if kept is not None and self.engine.is_main:
            self.rundir.write_predictions(number, after, kept)
        return scores

    def _record(self, scores: dict[str, list[float]], zero_shot: bool = False) -> None:
        """One evaluation of every task: a row of R (and of the ranking metric when there is one)."""
        p = self.progress
        nll, nll_se = _finite_or_none(scores["gold_nll"]), _finite_or_none(scores["gold_nll_se"])
        self._track_evaluation(scores["accuracy"])
        if zero_shot:
            p.zero_shot, p.rank_zero_shot = scores["accuracy"], scores.get("rank_accuracy")
            p.nll_zero_shot, p.nll_se_zero_shot = nll, nll_se
        else:
            p.rows.append(scores["accuracy"])
            p.nll_rows.append(nll)
            p.nll_se_rows.append(nll_se)
            if "rank_accuracy" in scores:
                p.rank_rows.append(scores["rank_accuracy"])

    def results(self, complete: bool, **override: Any) -> RunResults:
        engine, progress = self.engine, self.progress
        names = [d.task.name for d in engine.tasks]
        rows = progress.rows
        metrics = cl_metrics(np.array(rows), progress.zero_shot) if rows and len(rows) == len(names) else None
        progress.wall_time_s = self._elapsed_before + time.perf_counter() - self._start
        results: dict[str, Any] = {
            "complete": complete,
            "runner": self.name,
            "label": self.config.label,
            "stream": engine.stream.name,
            "config": self.config.to_dict(),
            "tasks": names,
            "task_options": {d.task.name: list(d.task.options) for d in engine.tasks},
            "tasks_done": len(rows),
            "accuracy_matrix": rows,
            "zero_shot": progress.zero_shot,
            "independent": None,
            "metrics": metrics,
            "per_task": progress.per_task,
            "overlap_matrix": engine.overlap,
            "wall_time_s": progress.wall_time_s,
            "precision": engine.precision.as_dict(),
            "dropped_eval_items": {d.task.name: d.task.dropped for d in engine.tasks if d.task.dropped},
            "rank_accuracy_matrix": progress.rank_rows or None,
            "rank_zero_shot": progress.rank_zero_shot,
            "rank_metrics": cl_metrics(np.array(progress.rank_rows), progress.rank_zero_shot)
            if progress.rank_rows and len(progress.rank_rows) == len(names)
            else None,
            "plots": [],
            "environment": self.environment(),
            **self._nll_results(len(names)),
        }
        results.update(override)
        return results  # type: ignore[return-value]

    def _nll_results(self, num_tasks: int) -> dict[str, Any]:
        """L (gold-answer NLL after each task), its standard errors and the metrics computed on it."""
        p = self.progress
        complete = bool(p.nll_rows) and len(p.nll_rows) == num_tasks
        return {
            "nll_matrix": p.nll_rows or None,
            "nll_se_matrix": p.nll_se_rows or None,
            "nll_zero_shot": p.nll_zero_shot,
            "nll_se_zero_shot": p.nll_se_zero_shot,
            "nll_metrics": _nan_to_none(nll_metrics(np.array(p.nll_rows, dtype=float), p.nll_zero_shot))
            if complete
            else None,
        }

    def finish(self, results: RunResults) -> RunResults:
        self._track_evaluation([], results.get("metrics"))
        if self.engine.is_main:
            if self.config.plots:
                from jumplora.metrics.plots import write_run_plots

                results["plots"] = write_run_plots(self.out, results)
            self.rundir.finish(results)
        return results


class ContinualRunner(Runner):
    name = "continual"

    def run(self, fresh: bool = False) -> RunResults:
        engine, acc = self.engine, self.engine.accelerator
        model, partial = self._restore_or_start(fresh)
        acc.wait_for_everyone()
        self._start_trackers()
        if self.progress.zero_shot is None:
            set_seed(self.config.seed)
            self._record(self._evaluate(model, 0, "zero-shot"), zero_shot=True)
            self._commit(model)
        peft_model: nn.Module | None = model if isinstance(model, peft.PeftModel) else None
        first = self.progress.next_task  # a mid-task checkpoint belongs to this task only
        for i in range(first, len(engine.tasks)):
            if peft_model is None or engine.strategy.adapter_lifecycle != "shared":
                peft_model = engine.new_adapter(model, i)
            else:  # a shared adapter: same per-task seeding, so a resumed run draws the same numbers
                set_seed(self.engine.task_seed(i))
            checkpoint = self._commit_partial if engine.is_main else None
            peft_model, _ = engine.train_task(peft_model, i, engine.tasks[i].train_features,
                                              partial=partial if i == first else None,
                                              on_checkpoint=checkpoint)  # fmt: skip
            model, peft_model = self._end_task(peft_model, i)
        return self.finish(self.results(True))

    def _restore_or_start(self, fresh: bool) -> tuple[nn.Module, tuple | None]:
        restored = None if fresh else self.rundir.load(self.engine.steps_per_task())
        if restored is None:
            if self.engine.is_main:
                self.rundir.start()
            return self.engine.base_model, None
        model = self._apply(restored)
        where = f"after {self.progress.next_task} of {len(self.engine.tasks)} tasks"
        if restored.partial is not None:
            meta = restored.partial[0]
            where += f", task {meta['task']} from its mid-task checkpoint at step {meta['step']}"
        if self.engine.is_main:
            log.warning("resuming %s %s", self.out, where)
            self.rundir.trim_log(self.progress.next_task, restored.partial[0]["step"] if restored.partial else 0)
        return model, restored.partial

    def _apply(self, restored: Restored) -> nn.Module:
        """The model after the last finished task, and the engine/strategy state that goes with it."""
        engine = self.engine
        self.progress = restored.progress
        self._elapsed_before = restored.progress.wall_time_s
        engine.global_step = restored.progress.global_step
        model = engine.base_model
        try:
            for update in restored.updates:
                if update is not None:
                    apply_update(model, update)
            for support in restored.supports:
                engine.add_support(support)
            engine.strategy.load_state_dict(restored.strategy_state or {})
            if restored.adapter is not None:
                model = peft.get_peft_model(model, engine.peft_config())
                load_adapter_tensors(model, restored.adapter, str(self.rundir.ckpt / "adapter"))
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"{self.rundir.ckpt}: the checkpoint does not fit this run ({err})") from err
        return model

    def _end_task(self, peft_model: nn.Module, i: int) -> tuple[nn.Module, nn.Module | None]:
        """Merge (unless the adapter is shared and tasks remain), let the strategy act, evaluate, commit."""
        engine, last = self.engine, i == len(self.engine.tasks) - 1
        thresholds = engine.thresholds(peft_model)
        merged = None
        if engine.strategy.adapter_lifecycle == "shared" and not last:
            support, model = supports(peft_model), peft_model
        else:
            merged = engine.merge(peft_model, i)
            support, model, peft_model = merged.supports, merged.model, None
        engine.strategy.on_task_end(engine.context(None, i), merged)
        self._record(self._evaluate(model, i + 1, f"after {engine.tasks[i].task.name}"))
        self.progress.per_task.append(engine.task_analytics(engine.tasks[i].task.name, support, thresholds))
        engine.add_support(support)
        self.progress.next_task = i + 1
        self._commit(model, merged)
        return model, peft_model

    def _commit(self, model: nn.Module, merged: Any = None) -> None:
        if not self.engine.is_main:
            return
        self.progress.global_step = self.engine.global_step
        results = self.results(False)  # also brings wall_time_s up to date
        done = self.progress.next_task
        self.rundir.commit(
            self.progress,
            update=pack_update(merged.updates, merged.supports) if merged is not None else None,
            support={k: v.contiguous() for k, v in self.engine.supports[done - 1].items()} if done else None,
            strategy_state=self.engine.strategy.state_dict(),
            adapter=adapter_tensors(model) if isinstance(model, peft.PeftModel) else None,
        )
        self.rundir.write_results(results)

    def _commit_partial(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.rundir.commit_partial(meta, tensors)


class _ReferenceRunner(Runner):
    """Reference rows: no strategy, no checkpoint (a killed reference run restarts)."""

    def run(self, fresh: bool = False) -> RunResults:
        engine = self.engine
        engine.strategy = make_strategy("inclora", {})
        if engine.is_main:
            self.rundir.start()
        self._start_trackers()
        self._record(self._evaluate(engine.base_model, 0, "zero-shot"), zero_shot=True)
        scores = self.train_and_evaluate()
        row, rank = scores["accuracy"], scores.get("rank_accuracy")
        override: dict[str, Any] = {"accuracy_matrix": [row], "metrics": {"op": float(np.mean(row))}}
        if rank is not None:  # generative families: the option-ranking score beside exact match
            override |= {"rank_accuracy_matrix": [rank], "rank_metrics": {"op": float(np.mean(rank))}}
        nll = np.array(scores["gold_nll"], dtype=float)
        override |= {
            "nll_matrix": [_finite_or_none(scores["gold_nll"])],
            "nll_se_matrix": [_finite_or_none(scores["gold_nll_se"])],
            "nll_metrics": _nan_to_none({"final": float(nll.mean())}),
        }
        return self.finish(self.results(True, **override, **self.extra(row)))

    def train_and_evaluate(self) -> dict[str, list[float]]:
        """Each task's scores after training, one list per metric (``accuracy``, maybe ``rank_accuracy``)."""
        raise NotImplementedError

    def extra(self, row: list[float]) -> dict[str, Any]:
        return {}


class MultitaskRunner(_ReferenceRunner):
    name = "multitask"

    def train_and_evaluate(self) -> dict[str, list[float]]:
        engine = self.engine
        features = [f for d in engine.tasks for f in d.train_features]
        peft_model, _ = engine.train_task(engine.new_adapter(engine.base_model, 0), 0, features, name="multitask")
        merged = engine.merge(peft_model, 0)
        self.progress.per_task.append(engine.task_analytics("multitask", merged.supports, {}))
        return self._evaluate(merged.model, 1, "after multitask")


class IndependentRunner(_ReferenceRunner):
    name = "independent"

    def train_and_evaluate(self) -> dict[str, list[float]]:
        engine, initial, scores = self.engine, copy.deepcopy(self.engine.base_model), []
        for i, data in enumerate(engine.tasks):
            peft_model, _ = engine.train_task(engine.new_adapter(copy.deepcopy(initial), i), i, data.train_features)
            merged = engine.merge(peft_model, i)
            kept: list[dict] | None = [] if self.config.save_predictions else None
            scores.append(engine.evaluate(merged.model, data, kept))
            if kept is not None and engine.is_main:
                self.rundir.write_predictions(i + 1, f"after {data.task.name}", {data.task.name: kept})
            self.progress.per_task.append(engine.task_analytics(data.task.name, merged.supports, {}))
        return scores_by_metric(scores)

    def extra(self, row: list[float]) -> dict[str, Any]:
        return {"independent": row}


def _finite_or_none(values: list[float]) -> list[float | None]:
    """JSON has no NaN: a cell without a scorable item is null."""
    return [value if math.isfinite(value) else None for value in values]


def _nan_to_none(metrics: dict[str, float | None]) -> dict[str, float | None]:
    return {key: None if value is None or not math.isfinite(value) else value for key, value in metrics.items()}


RUNNERS: dict[str, type[Runner]] = {r.name: r for r in (ContinualRunner, MultitaskRunner, IndependentRunner)}


class ContinualTrainer:
    """Runs one configuration end to end; ``run()`` returns the results also saved to ``config.out``.

    Pass ``model`` and ``tokenizer`` to train a model object you already hold (placed with
    ``device_map``, quantised, …) instead of loading ``config.model.name``. ``resume`` and ``overwrite``
    mean what ``--resume`` and ``--overwrite`` mean: by default a ``config.out`` that already holds a run
    is refused (never silently reused), ``resume=True`` continues it only when its recorded
    configuration equals ``config`` (output-only options aside), ``overwrite=True`` starts it again.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        accelerator: Accelerator | None = None,
        quiet: bool = False,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        self.resume, self.overwrite = resume, overwrite
        self.engine = Engine(config, model=model, tokenizer=tokenizer, accelerator=accelerator, quiet=quiet)

    def prepare(self) -> None:
        """Load and validate data, model and targets (nothing is written)."""
        self.engine.prepare()

    def check_resumable(self) -> None:
        """Refuse a resume whose configuration differs from the one the checkpoint recorded (config.json)."""
        out = Path(self.config.out)
        if has_checkpoint(out):
            state = read_state(out)
            check_same_config(out, state.get("config"), self.config.to_dict(), RESUME_FREE_KEYS)

    def run(self) -> RunResults:
        """Run the stream (resumed from the checkpoint in ``config.out`` only with ``resume=True``).

        Ends the run's trackers and, under several processes, the process group."""
        check_out_dir(Path(self.config.out), resume=self.resume, overwrite=self.overwrite)
        if self.resume:
            self.check_resumable()
        if self.engine.loaded is None:
            self.prepare()
        fresh = not self.resume
        runner = RUNNERS[self.config.runner](self.engine)
        self.engine.accelerator.wait_for_everyone()
        # One run per directory: a second run or a live --resume on the same folder is refused here,
        # after every input was validated and before the first write.
        with RunLock(Path(self.config.out)) if self.engine.is_main else contextlib.nullcontext():
            results = runner.run(fresh)
        self.engine.accelerator.wait_for_everyone()
        # Only once every rank is past its last barrier: trackers are flushed and the process group is
        # destroyed (a gloo group left to the interpreter's exit can abort it).
        self.engine.accelerator.end_training()
        return results
