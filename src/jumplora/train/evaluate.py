"""Evaluation: every task's accuracy (per metric the family declares) and gold-answer NLL.

The family says which metrics it reports and how it predicts for each (``ModelFamily.metric_modes``);
the evaluator only shards the items over processes, batches them, and reduces the sums.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from jumplora.data import Task
from jumplora.models import ModelFamily, PromptExample
from jumplora.models._utils import to_device

log = logging.getLogger("jumplora")


@dataclass
class TaskData:
    """A task's examples, tokenised once for the whole run."""

    task: Task
    train_examples: list[PromptExample]
    eval_examples: list[PromptExample]
    train_features: list[dict] = field(default_factory=list)
    eval_features: list[dict] = field(default_factory=list)


class Evaluator:
    """Scores a model on tasks' eval splits through the family's declared metrics."""

    def __init__(
        self,
        family: ModelFamily,
        accelerator: Accelerator,
        *,
        batch_size: int,
        sharded: bool = False,
        progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda items, desc: items,
    ) -> None:
        self.family, self.accelerator, self.batch_size = family, accelerator, batch_size
        #: A sharded model runs collectives in every forward: each process then evaluates every item.
        self.sharded = sharded
        self.progress = progress

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, predictions: list[dict] | None = None) -> dict[str, float]:
        """Accuracy and gold-answer NLL on the task's eval split (sharded over processes, sums reduced).

        Generative families answer by greedy generation scored by exact match (``accuracy``); the option
        ranking by likelihood is measured beside it as ``rank_accuracy``. ``gold_nll`` is the mean
        negative log-likelihood of the gold answer (the continuous forgetting measure L) and
        ``gold_nll_se`` its standard error over items. A ``predictions`` list receives one record per
        item (every process's, in eval-split order) for error analysis.
        """
        modes, acc = self.family.metric_modes(), self.accelerator
        model = acc.unwrap_model(model)
        was_training = model.training
        model.eval()
        rank, world = (0, 1) if self.sharded else (acc.process_index, acc.num_processes)
        indices = list(range(rank, len(data.eval_features), world))
        # Batches of similar lengths pad less (~10 % fewer tokens on the default stream); counts only.
        indices.sort(key=lambda i: len(data.eval_features[i]["input_ids"]))
        correct, nll = dict.fromkeys(modes, 0), NllSums()
        # The training forward is autocast by Accelerate's wrapper; evaluation calls the bare model.
        with self.family.eval_cache(model), acc.autocast():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                records = self._score_batch(model, data, chunk, modes, correct, nll)
                if predictions is not None:
                    predictions += records
        model.train(was_training)
        if predictions is not None and world > 1:  # every process's share, in order
            predictions[:] = sorted(gather_object(predictions), key=lambda record: record["index"])
        totals = torch.tensor([*correct.values(), len(indices), *nll.sums()], dtype=torch.float64, device=acc.device)
        if world > 1:
            totals = acc.reduce(totals, reduction="sum")
        totals = totals.tolist()
        scores = {key: totals[k] / max(totals[len(modes)], 1) for k, key in enumerate(modes)}
        return scores | NllSums.summary(*totals[len(modes) + 1 :])

    def _score_batch(
        self, model: nn.Module, data: TaskData, chunk: list[int], modes: dict[str, str | None],
        correct: dict[str, int], nll: NllSums,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """One batch: counts hits into ``correct`` and NLL into ``nll``; returns its prediction records."""
        family = self.family
        batch = to_device(family.collate([data.eval_features[i] for i in chunk]), self.accelerator.device)
        answers = [data.eval_examples[i].answer for i in chunk]
        answered, gold_nll = family.answers_and_gold_nll(model, batch, modes)
        nll.add(gold_nll)
        hits = {
            key: [family.is_correct(p, a) for p, a in zip(preds, answers, strict=True)]
            for key, preds in answered.items()
        }
        for key, row in hits.items():
            correct[key] += sum(row)
        return _prediction_records(chunk, answers, answered, hits, gold_nll)

    def evaluate_all(
        self, model: nn.Module, tasks: list[TaskData], desc: str, predictions: dict[str, list[dict]] | None = None
    ) -> dict[str, list[float]]:
        """Every task's scores, as one row per metric (``accuracy`` and, for generation, ``rank_accuracy``).

        ``predictions`` (task name → records) is filled as in :meth:`evaluate`."""
        log.info("%s", desc)
        scores = []
        for data in self.progress(tasks, desc):
            sink = None if predictions is None else predictions.setdefault(data.task.name, [])
            scores.append(self.evaluate(model, data, sink))
        return scores_by_metric(scores)


def scores_by_metric(scores: list[dict[str, float]]) -> dict[str, list[float]]:
    """Per-task ``evaluate`` results → one row per metric, in task order (a row of R and of its ranking twin)."""
    return {key: [task[key] for task in scores] for key in scores[0]}


class NllSums:
    """Running count, sum and sum of squares of the items' gold-answer NLL (NaN items left out)."""

    def __init__(self) -> None:
        self.count = self.total = self.squares = 0.0

    def add(self, values: list[float]) -> None:
        for value in values:
            if math.isfinite(value):
                self.count, self.total, self.squares = self.count + 1, self.total + value, self.squares + value * value

    def sums(self) -> list[float]:
        return [self.count, self.total, self.squares]

    @staticmethod
    def summary(count: float, total: float, squares: float) -> dict[str, float]:
        """``gold_nll`` (mean) and ``gold_nll_se`` (standard error of the mean); NaN with no items."""
        if count == 0:
            return {"gold_nll": math.nan, "gold_nll_se": math.nan}
        mean = total / count
        variance = max(squares / count - mean * mean, 0.0) * count / max(count - 1, 1)  # unbiased
        return {"gold_nll": mean, "gold_nll_se": math.sqrt(variance / count)}


def _prediction_records(
    indices: list[int],
    answers: list[str],
    answered: dict[str, list[str]],
    hits: dict[str, list[bool]],
    gold_nll: list[float],
) -> list[dict[str, Any]]:
    """``accuracy`` → prediction/correct, ``rank_accuracy`` → rank_prediction/rank_correct; gold_nll beside."""
    records = []
    for row, (index, answer) in enumerate(zip(indices, answers, strict=True)):
        nll = gold_nll[row]
        record: dict[str, Any] = {"index": index, "answer": answer, "gold_nll": nll if math.isfinite(nll) else None}
        for key, preds in answered.items():
            prefix = key.removesuffix("accuracy")
            record[f"{prefix}prediction"] = preds[row]
            record[f"{prefix}correct"] = bool(hits[key][row])
        records.append(record)
    return records
