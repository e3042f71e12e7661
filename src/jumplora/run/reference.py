"""Reference rows beside the continual stream: every task at once (multitask, the upper bound) and each
task from the untouched model (independent: FWT against training from scratch). No strategy acts and no
checkpoint is kept (a killed reference run restarts)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from jumplora.cl import Strategy
from jumplora.results import RunResults
from jumplora.run.base import Runner
from jumplora.run.record import finite_or_none, nan_to_none
from jumplora.train.evaluate import scores_by_metric


class ReferenceRunner(Runner):
    """One row of R after training; the base ``Strategy`` (a fresh adapter per task, no extra loss)."""

    _plain = Strategy()

    @property
    def strategy(self) -> Strategy:
        return self._plain

    def run(self, fresh: bool = False) -> RunResults:
        setup = self.setup
        if setup.is_main:
            self.rundir.start()
        self._start_trackers()
        self._record(self._evaluate(setup.base_model, 0, "zero-shot"), zero_shot=True)
        scores = self.train_and_evaluate()
        row, rank = scores["accuracy"], scores.get("rank_accuracy")
        override: dict[str, Any] = {"accuracy_matrix": [row], "metrics": {"op": float(np.mean(row))}}
        if rank is not None:  # generative families: the option-ranking score beside exact match
            override |= {"rank_accuracy_matrix": [rank], "rank_metrics": {"op": float(np.mean(rank))}}
        nll = np.array(scores["gold_nll"], dtype=float)
        override |= {
            "nll_matrix": [finite_or_none(scores["gold_nll"])],
            "nll_se_matrix": [finite_or_none(scores["gold_nll_se"])],
            "nll_metrics": nan_to_none({"final": float(nll.mean())}),
        }
        return self.finish(self.results(True, **override, **self.extra(row)))

    def train_and_evaluate(self) -> dict[str, list[float]]:
        """Each task's scores after training, one list per metric (``accuracy``, maybe ``rank_accuracy``)."""
        raise NotImplementedError

    def extra(self, row: list[float]) -> dict[str, Any]:
        return {}


class MultitaskRunner(ReferenceRunner):
    """Every task's training data at once, one adapter, one merge."""

    name = "multitask"

    def train_and_evaluate(self) -> dict[str, list[float]]:
        setup = self.setup
        features = [f for d in setup.tasks for f in d.train_features]
        peft_model = self.train_task(setup.new_adapter(setup.base_model, 0), 0, features, name="multitask")
        merged = self.merge(peft_model, 0)
        self.state.progress.per_task.append(self.state.task_analytics("multitask", merged.supports, {}))
        return self._evaluate(merged.model, 1, "after multitask")


class IndependentRunner(ReferenceRunner):
    """Each task trained and evaluated from a copy of the untouched model."""

    name = "independent"
    shard_refusal = "it copies the whole base model per task"

    def train_and_evaluate(self) -> dict[str, list[float]]:
        setup, initial, scores = self.setup, copy.deepcopy(self.setup.base_model), []
        for i, data in enumerate(setup.tasks):
            peft_model = self.train_task(setup.new_adapter(copy.deepcopy(initial), i), i, data.train_features)
            merged = self.merge(peft_model, i)
            kept: list[dict] | None = [] if self.config.save_predictions else None
            scores.append(setup.evaluator.evaluate(merged.model, data, kept))
            if kept is not None and setup.is_main:
                self.rundir.write_predictions(i + 1, f"after {data.task.name}", {data.task.name: kept})
            self.state.progress.per_task.append(self.state.task_analytics(data.task.name, merged.supports, {}))
        return scores_by_metric(scores)

    def extra(self, row: list[float]) -> dict[str, Any]:
        return {"independent": row}
