"""The continual stream: per task a fresh adapter (or the strategy's shared one), train, merge the task's
update, evaluate every task; checkpointed after the zero-shot evaluation and after every task, so a
killed run resumes to the same numbers."""

from __future__ import annotations

import logging
from typing import Any

import peft
from accelerate.utils import set_seed
from torch import nn

from jumplora.adapters import supports, threshold_values
from jumplora.adapters.updates import apply_update, pack_update
from jumplora.results import RunResults
from jumplora.run.base import Runner
from jumplora.run.directory import Restored
from jumplora.run.record import update_size
from jumplora.training_state import adapter_tensors, load_adapter_tensors

log = logging.getLogger("jumplora")


class ContinualRunner(Runner):
    """One task after another on one model; the strategy acts at each task's start, steps and end."""

    name = "continual"

    def run(self, fresh: bool = False) -> RunResults:
        setup = self.setup
        model, partial = self._restore_or_start(fresh)
        setup.accelerator.wait_for_everyone()
        self._start_trackers()
        if self.state.progress.zero_shot is None:
            set_seed(self.config.seed)
            self._record(self._evaluate(model, 0, "zero-shot"), zero_shot=True)
            self._commit(model)
        peft_model: nn.Module | None = model if isinstance(model, peft.PeftModel) else None
        first = self.state.progress.next_task  # a mid-task checkpoint belongs to this task only
        for i in range(first, len(setup.tasks)):
            if peft_model is None or self.strategy.adapter_lifecycle != "shared":
                peft_model = setup.new_adapter(model, i)
            else:  # a shared adapter: same per-task seeding, so a resumed run draws the same numbers
                set_seed(self.config.task_seed(i))
            checkpoint = self.rundir.commit_partial if setup.is_main else None
            peft_model = self.train_task(peft_model, i, setup.tasks[i].train_features,
                                         partial=partial if i == first else None, on_checkpoint=checkpoint)  # fmt: skip
            model, peft_model = self._end_task(peft_model, i)
        return self.finish(self.results(True))

    def _restore_or_start(self, fresh: bool) -> tuple[nn.Module, tuple | None]:
        restored = None if fresh else self.rundir.load(self.setup.steps_per_task())
        if restored is None:
            if self.setup.is_main:
                self.rundir.start()
            return self.setup.base_model, None
        model = self._apply(restored)
        next_task = self.state.progress.next_task
        where = f"after {next_task} of {len(self.setup.tasks)} tasks"
        if restored.partial is not None:
            meta = restored.partial[0]
            where += f", task {meta['task']} from its mid-task checkpoint at step {meta['step']}"
        if self.setup.is_main:
            log.warning("resuming %s %s", self.out, where)
            self.rundir.trim_log(next_task, restored.partial[0]["step"] if restored.partial else 0)
        return model, restored.partial

    def _apply(self, restored: Restored) -> nn.Module:
        """The model after the last finished task, and the run/strategy state that goes with it."""
        self.state.resume_from(restored.progress, [])
        model = self.setup.base_model
        try:
            for update in restored.updates:
                if update is not None:
                    apply_update(model, update)
            for support in restored.supports:
                self.state.add_support(support)
            self.strategy.load_state_dict(restored.strategy_state or {})
            if restored.adapter is not None:
                model = peft.get_peft_model(model, self.setup.peft_config())
                load_adapter_tensors(model, restored.adapter, str(self.rundir.ckpt / "adapter"))
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"{self.rundir.ckpt}: the checkpoint does not fit this run ({err})") from err
        return model

    def _end_task(self, peft_model: nn.Module, i: int) -> tuple[nn.Module, nn.Module | None]:
        """Merge (unless the adapter is shared and tasks remain), let the strategy act, evaluate, commit."""
        setup, last = self.setup, i == len(self.setup.tasks) - 1
        thresholds = threshold_values(peft_model) if self.config.adapter.sparse else {}
        merged = None
        if self.strategy.adapter_lifecycle == "shared" and not last:
            support, model = supports(peft_model), peft_model
        else:
            merged = self.merge(peft_model, i)
            support, model, peft_model = merged.supports, merged.model, None
        self.strategy.on_task_end(setup.context(None, i), merged)
        name = setup.tasks[i].task.name
        self._record(self._evaluate(model, i + 1, f"after {name}"))
        analytics = self.state.task_analytics(name, support, thresholds)
        self.state.progress.per_task.append({**analytics, **update_size(merged)})
        self.state.add_support(support)
        self.state.progress.next_task = i + 1
        self._commit(model, merged)
        return model, peft_model

    def _commit(self, model: nn.Module, merged: Any = None) -> None:
        if not self.setup.is_main:
            return
        results = self.results(False)  # also brings wall_time_s up to date
        done = self.state.progress.next_task
        self.rundir.commit(
            self.state.progress,
            update=pack_update(merged.updates, merged.supports) if merged is not None else None,
            support={k: v.contiguous() for k, v in self.state.supports[done - 1].items()} if done else None,
            strategy_state=self.strategy.state_dict(),
            adapter=adapter_tensors(model) if isinstance(model, peft.PeftModel) else None,
        )
        self.rundir.write_results(results)


__all__ = ["ContinualRunner"]
