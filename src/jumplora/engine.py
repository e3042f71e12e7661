"""The training engine: set-up, one task's optimisation, evaluation and per-task analytics.

``Engine`` loads and checks everything a run needs before anything is written (stream, model,
targets), puts a JumpLoRA (or dense LoRA) adapter on the model, trains it on one task through
Accelerate (:class:`TaskLoop`), evaluates every task, and measures the kept entries. How tasks follow
each other — the continual stream, multitask or independent training — is a runner's business
(``jumplora.runners``); what to do at task boundaries and which loss terms to add is a strategy's
(``jumplora.cl``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import peft
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup

from jumplora import faults, sharding, training_state
from jumplora.adapters import (
    MergeResult,
    Sparsifier,
    merge_and_discard,
    merge_controlled,
    norm_match_scales,
    random_masks,
    theta_learning_rate,
    threshold_parameters,
    threshold_values,
    topk_masks,
)
from jumplora.adapters.residual import effective_weight
from jumplora.adapters.sharded import average_gradients
from jumplora.adapters.targets import check_target_modules, weight_is_transposed
from jumplora.cl import Strategy, StrategyContext, make_strategy
from jumplora.config import RunConfig
from jumplora.data import Task, TaskStream, load_stream, resolve_stream_source
from jumplora.metrics import density, density_per_module, jaccard
from jumplora.models import LoadedModel, PromptExample, load_model, wrap_model
from jumplora.models._utils import to_device
from jumplora.precision import Precision, resolve_precision

log = logging.getLogger("jumplora")
#: A merged update larger than this many times the base weight's largest entry is a divergence.
DIVERGENCE_FACTOR = 1e3


class NumericalError(RuntimeError):
    """A NaN/inf loss, threshold or merged update: the run stops and keeps its last good checkpoint."""


def load_task_stream(config: RunConfig) -> TaskStream:
    """The stream a config names (custom file, explicit task list, or a benchmark order)."""
    s = config.stream
    source = resolve_stream_source(s.order, s.stream_file, s.tasks)
    return load_stream(source, s.data_dir, max_train=s.max_train, max_eval=s.max_eval, seed=config.seed,
                       allow_outside_paths=s.allow_outside_paths)  # fmt: skip


@dataclass
class TaskData:
    """A task's examples, tokenised once for the whole run."""

    task: Task
    train_examples: list[PromptExample]
    eval_examples: list[PromptExample]
    train_features: list[dict] = field(default_factory=list)
    eval_features: list[dict] = field(default_factory=list)


class Engine:
    """Everything one run needs to train and evaluate; built by :meth:`prepare`, used by the runners."""

    def __init__(
        self,
        config: RunConfig,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        accelerator: Accelerator | None = None,
        quiet: bool = False,
    ) -> None:
        self.config = config
        self.quiet = quiet
        self._given = (model, tokenizer)
        if model is not None and tokenizer is None:
            raise ValueError("pass the model's tokenizer with the model object")
        self.precision = resolve_precision(config.mixed_precision, config.cpu)
        if accelerator is not None:  # the caller's Accelerator decides
            self.precision = Precision(config.mixed_precision, accelerator.mixed_precision, "the given Accelerator's")
        if accelerator is None:
            _allow_precision_change(self.precision.mixed_precision)
        #: "none", "fsdp2" or "zero3": the engine shards the base model itself (jumplora.sharding).
        self.shard = sharding.resolve_shard(config.shard, config.runner, self.precision.mixed_precision)
        config.shard = self.shard  # config.json says what ran, also when accelerate launch chose it
        with sharding.launcher_sharding_hidden() if self.shard != "none" else contextlib.nullcontext():
            self.accelerator = accelerator or Accelerator(
                cpu=config.cpu,
                mixed_precision=self.precision.mixed_precision,
                gradient_accumulation_steps=config.optim.grad_accum,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                log_with=config.report_to,
                project_dir=str(_tracking_dir(config)) if config.report_to else None,
            )
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            log.info("compute precision: %s (%s)", self.precision.mixed_precision, self.precision.reason)
        self.strategy: Strategy = make_strategy(config.strategy.name, config.strategy.args)
        self.stream: TaskStream | None = None
        self.loaded: LoadedModel | None = None
        self.tasks: list[TaskData] = []
        self.supports: list[dict[str, torch.Tensor]] = []
        self.overlap: list[list[float]] = []  # Jaccard of the supports, task by task
        self.global_step = 0
        self.on_log: Callable[[dict[str, Any]], None] = lambda record: None

    # -- set-up -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load and validate everything (data, model, targets) before anything is written."""
        cfg = self.config
        self.stream = load_task_stream(cfg)
        model, tokenizer = self._given
        m = cfg.model
        if model is not None:
            self.loaded = wrap_model(model, tokenizer, m.family, max_length=m.max_length, rank_options=m.rank_options)
        else:
            self.loaded = load_model(
                m.name, m.family, revision=m.revision, trust_remote_code=m.trust_remote_code,
                max_length=m.max_length, rank_options=m.rank_options, quantize=m.quantize,
            )  # fmt: skip
        limit = self.loaded.max_positions
        if limit is not None and cfg.model.max_length > limit:
            raise ValueError(f"max_length {cfg.model.max_length} exceeds the model's {limit} positions")
        self.target_modules = check_target_modules(self.loaded.model, cfg.model.targets or self.loaded.target_modules)
        self.peft_config()  # validates the adapter options now, not at the first task
        self.tasks = [self._task_data(task) for task in self.stream.tasks]
        self.base_model = self.loaded.model.to(self.accelerator.device)
        if self.shard != "none":
            self.base_model = sharding.shard_base_model(self.base_model, self.accelerator.device, self.shard)

    def _task_data(self, task: Task) -> TaskData:
        own = self.config.stream.option_space == "task"
        candidates = tuple(task.options) if own else self.stream.option_space
        split = self.config.stream.eval_split

        def examples(name: str) -> list[PromptExample]:
            return [PromptExample(task.prompt(ex.text), ex.label, candidates) for ex in task.split(name)]

        data = TaskData(task, examples("train"), examples(split))
        data.train_features = self.loaded.family.encode(data.train_examples)
        data.eval_features = self.loaded.family.encode(data.eval_examples)
        return data

    def peft_config(self) -> peft.PeftConfig:
        return sharding.fit_adapter(self.config.adapter.to_peft(self.target_modules), self.shard)

    def new_adapter(self, base: nn.Module, task_index: int) -> nn.Module:
        set_seed(self.task_seed(task_index))
        return peft.get_peft_model(base, self.peft_config())

    def task_seed(self, task_index: int) -> int:
        """The seed of everything drawn for one task (its adapter's init, a control's random support)."""
        return self.config.seed * 1000 + task_index

    def steps_per_task(self) -> list[int]:
        """Optimizer steps each task takes (for checking a mid-task checkpoint's position)."""
        o = self.config.optim
        return [max(1, math.ceil(math.ceil(len(d.train_features) / o.batch_size) / o.grad_accum)) * o.epochs
                for d in self.tasks]  # fmt: skip

    def context(self, model: nn.Module | None, task_index: int) -> StrategyContext:
        return StrategyContext(
            model=model, task_index=task_index, task_name=self.tasks[task_index].task.name,
            num_tasks=len(self.tasks), family=self.loaded.family, device=self.accelerator.device,
            train_features=[d.train_features for d in self.tasks], batch_size=self.config.optim.batch_size,
            seed=self.config.seed,
        )  # fmt: skip

    # -- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, predictions: list[dict] | None = None) -> dict[str, float]:
        """Accuracy and gold-answer NLL on the task's eval split (sharded over processes, sums reduced).

        Generative families answer by greedy generation scored by exact match (``accuracy``); the option
        ranking by likelihood is measured beside it as ``rank_accuracy``. ``gold_nll`` is the mean
        negative log-likelihood of the gold answer (the continuous forgetting measure L) and
        ``gold_nll_se`` its standard error over items. A ``predictions`` list receives one record per
        item (every process's, in eval-split order) for error analysis.
        """
        faults.point("eval")
        family, modes = self.loaded.family, self._predict_modes()
        model = self.accelerator.unwrap_model(model)
        was_training = model.training
        model.eval()
        # A sharded model runs collectives in every forward: each process then evaluates every item.
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if self.shard != "none":
            rank, world = 0, 1
        indices = list(range(rank, len(data.eval_features), world))
        # Batches of similar lengths pad less (~10 % fewer tokens on the default stream); counts only.
        indices.sort(key=lambda i: len(data.eval_features[i]["input_ids"]))
        correct, bs = dict.fromkeys(modes, 0), self.config.optim.eval_batch_size
        nll = NllSums()
        # The training forward is autocast by Accelerate's wrapper; evaluation calls the bare model.
        with family.eval_cache(model), self.accelerator.autocast():
            for start in range(0, len(indices), bs):
                chunk = indices[start : start + bs]
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
                if predictions is not None:
                    predictions += _prediction_records(chunk, answers, answered, hits, gold_nll)
        model.train(was_training)
        if predictions is not None and world > 1:  # every process's share, in order
            predictions[:] = sorted(gather_object(predictions), key=lambda record: record["index"])
        totals = torch.tensor([*correct.values(), len(indices), *nll.sums()], dtype=torch.float64,
                              device=self.accelerator.device)  # fmt: skip
        if world > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        totals = totals.tolist()
        scores = {key: totals[k] / max(totals[len(modes)], 1) for k, key in enumerate(modes)}
        return scores | NllSums.summary(*totals[len(modes) + 1 :])

    def _predict_modes(self) -> dict[str, str | None]:
        """Metric name → predict mode; a generative family that generates also ranks, as a second metric."""
        if self.loaded.family_name == "encoder" or self.config.model.rank_options:
            return {"accuracy": None}
        return {"accuracy": "generate", "rank_accuracy": "rank"}

    def evaluate_all(
        self, model: nn.Module, desc: str, predictions: dict[str, list[dict]] | None = None
    ) -> dict[str, list[float]]:
        """Every task's scores, as one row per metric (``accuracy`` and, for generation, ``rank_accuracy``).

        ``predictions`` (task name → records) is filled as in :meth:`evaluate`."""
        log.info("%s", desc)
        scores = []
        for data in self.progress(self.tasks, desc):
            sink = None if predictions is None else predictions.setdefault(data.task.name, [])
            scores.append(self.evaluate(model, data, sink))
        return scores_by_metric(scores)

    def progress(self, items: Any, desc: str, **kwargs: Any) -> tqdm:
        """A progress bar on a terminal only: redirected logs get the per-task log lines instead."""
        hidden = self.quiet or not self.is_main or not sys.stderr.isatty()
        return tqdm(items, desc=desc, disable=hidden, leave=False, **kwargs)

    # -- training and merging -----------------------------------------------------------------------
    def train_task(
        self,
        model: nn.Module,
        task_index: int,
        features: list[dict],
        *,
        name: str | None = None,
        partial: tuple[dict, dict] | None = None,
        on_checkpoint: Callable[[dict, dict], None] | None = None,
    ) -> tuple[nn.Module, Sparsifier | None]:
        """Train the adapter of ``model`` on ``features``; returns the (unwrapped) PEFT model.

        ``name`` labels the log (default: the task's name); ``partial``: a mid-task checkpoint (meta,
        tensors) to continue from; ``on_checkpoint(meta, tensors)`` is called every ``checkpoint_every``
        optimizer steps when given.
        """
        loop = TaskLoop(self, model, task_index, features, name)
        if partial is not None:
            loop.restore(*partial)
        return loop.run(on_checkpoint), loop.sparsifier

    def merge(self, peft_model: nn.Module, task_index: int) -> MergeResult:
        """Merge the task's gated update into the base weights; a diverged update is a numerical fault."""
        if self.config.adapter.control:
            merged = self._controlled_merge(peft_model, task_index)
        else:
            merged = merge_and_discard(peft_model, keep_updates=True)
        if self.shard != "none" and self.config.adapter.sparse and density(merged.supports) == 0.0:
            raise NumericalError(  # θ above every |ΔW|: a run that merges nothing must not exit 0
                f"task {self.tasks[task_index].task.name!r} (index {task_index}): the sharded merge kept no "
                "entry of the update (θ above every |ΔW|)"
            )
        for name, (largest, scale) in self._update_sizes(merged).items():
            if not math.isfinite(largest) or largest > DIVERGENCE_FACTOR * max(scale, 1e-12):
                raise NumericalError(
                    f"task {self.tasks[task_index].task.name!r} (index {task_index}): the merged update of {name} "
                    f"has max |ΔW| = {largest:.3g} against max |W| = {scale:.3g} (diverged; lower --lr)"
                )
        return merged

    @staticmethod
    def _update_sizes(merged: MergeResult) -> dict[str, tuple[float, float]]:
        """Module → (max |merged update|, max |W| before the merge); a sharded merge measured them itself."""
        if merged.sizes is not None:
            return merged.sizes
        modules, sizes = dict(merged.model.named_modules()), {}
        for name, update in merged.updates.items():
            weight = effective_weight(modules[name]).cpu()  # a quantized layer's: dequantised + residual
            base = weight - (update.t() if weight_is_transposed(modules[name]) else update)
            sizes[name] = (float(update.abs().max()), float(base.abs().max()))
        return sizes

    def _controlled_merge(self, peft_model: nn.Module, task_index: int) -> MergeResult:
        """A control's merge of the densely trained update (random / top-k support, or norm-matched)."""
        a = self.config.adapter
        if a.merge_mask == "random":
            generator = torch.Generator().manual_seed(self.task_seed(task_index))
            return merge_controlled(peft_model, random_masks(peft_model, a.target_density, generator))
        masks = topk_masks(peft_model, a.target_density)
        scales = norm_match_scales(peft_model, masks) if a.norm_match else None
        return merge_controlled(peft_model, masks, scales)

    def check_loss(self, loss: torch.Tensor, task_index: int, step: int) -> None:
        """Stop on a NaN/inf loss; with several processes, all of them stop (no one hangs in a collective)."""
        bad = ~torch.isfinite(loss.detach())
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.float().reshape(1), reduction="sum") > 0
        if bool(bad):
            raise NumericalError(
                f"task {self.tasks[task_index].task.name!r} (index {task_index}), step {step}: loss is "
                f"{loss.item()} (on at least one process); the run directory keeps the last good checkpoint"
            )

    def check_thresholds(self, model: nn.Module, task_index: int, step: int) -> None:
        if not self.config.adapter.sparse:
            return
        for group, raw in threshold_parameters(model).items():
            if not torch.isfinite(raw).all():
                raise NumericalError(
                    f"task {self.tasks[task_index].task.name!r} (index {task_index}), step {step}: threshold of "
                    f"group {group!r} is {raw.item()}; the run directory keeps the last good checkpoint"
                )

    # -- analytics --------------------------------------------------------------------------------------
    def task_analytics(self, name: str, support: dict[str, torch.Tensor], thresholds: dict[str, float]) -> dict:
        past_union: dict[str, torch.Tensor] = {}
        for earlier in self.supports:
            for module, mask in earlier.items():
                past_union[module] = past_union[module] | mask if module in past_union else mask.clone()
        return {
            "task": name,
            "density": density(support),
            "density_per_module": density_per_module(support),
            "thresholds": thresholds,
            "jaccard_with_earlier": [jaccard(support, earlier) for earlier in self.supports],
            "jaccard_with_past": jaccard(support, past_union) if past_union else None,
        }

    def add_support(self, support: dict[str, torch.Tensor]) -> None:
        """Keep a finished task's support and its Jaccard overlap with every earlier one (computed once)."""
        self.supports.append(support)
        row = [jaccard(support, other) for other in self.supports]
        for earlier, value in zip(self.overlap, row, strict=False):
            earlier.append(value)
        self.overlap.append(row)

    def thresholds(self, model: nn.Module) -> dict[str, float]:
        return threshold_values(model) if self.config.adapter.sparse else {}


class TaskLoop:
    """One task's optimisation: optimizer groups, the γ/θ schedule, strategy hooks, logging, checkpoints."""

    def __init__(
        self, engine: Engine, model: nn.Module, task_index: int, features: list[dict], name: str | None = None
    ) -> None:
        cfg, acc = engine.config, engine.accelerator
        self.engine, self.model, self.task_index = engine, model, task_index
        self.ctx = engine.context(model, task_index)
        self.name = name or self.ctx.task_name
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + task_index)
        loader = DataLoader(features, batch_size=cfg.optim.batch_size, shuffle=True, generator=generator,
                            collate_fn=engine.loaded.family.collate)  # fmt: skip
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.optim.lr)
        if engine.shard != "none":  # the base is sharded already; the replicated adapter is synced by hand
            self.wrapped, (self.optimizer, self.loader) = model, acc.prepare(optimizer, loader)
        else:
            self.wrapped, self.optimizer, self.loader = acc.prepare(model, optimizer, loader)
        self.total_steps = max(1, math.ceil(len(self.loader) / cfg.optim.grad_accum) * cfg.optim.epochs)
        warmup = round(cfg.optim.warmup_ratio * self.total_steps)
        self.scheduler = get_constant_schedule_with_warmup(self.optimizer, warmup)
        self.sparsifier = Sparsifier(model, self.total_steps) if cfg.adapter.sparse else None
        self.step, self.running = 0, []
        self.skip_to: tuple[int, int] | None = None  # (epoch, micro-batch) of a mid-task checkpoint
        self._resume: tuple[dict, dict] | None = None

    def _param_groups(self) -> list[dict[str, Any]]:
        optim = self.engine.config.optim
        theta_ids = (
            {id(p) for p in threshold_parameters(self.model).values()} if self.engine.config.adapter.sparse else set()
        )
        groups = [{"params": [p for p in self.params if id(p) not in theta_ids], "weight_decay": optim.weight_decay}]
        if theta_ids:
            thetas = [p for p in self.params if id(p) in theta_ids]
            lr = optim.theta_lr or theta_learning_rate(self.model) or optim.lr  # a density controller sets its own
            groups.append({"params": thetas, "weight_decay": 0.0, "lr": lr})
        return groups

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if meta["task"] != self.task_index:
            raise ValueError(f"a mid-task checkpoint of task {meta['task']} cannot resume task {self.task_index}")
        training_state.restore(self.model, self.optimizer, self.scheduler, meta, tensors)
        self.step, self.running = meta["step"], list(meta["running"])
        self.engine.global_step = meta["global_step"]
        self.skip_to = (meta["epoch"], meta["micro"])
        self._resume = (meta, tensors)
        self.engine.strategy.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("strategy.")})
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(meta["sparsifier"])

    def run(self, on_checkpoint: Callable[[dict, dict], None] | None) -> nn.Module:
        engine, cfg = self.engine, self.engine.config
        engine.strategy.on_task_start(self.ctx)
        self.wrapped.train()
        bar = engine.progress(None, f"train {self.name}", total=self.total_steps, initial=self.step)
        for epoch in range(cfg.optim.epochs):
            for micro, batch in enumerate(self.loader):
                if self._replaying(epoch, micro):
                    continue
                if micro % cfg.optim.grad_accum == 0 and self.sparsifier is not None:
                    self.sparsifier.before_step(self.step)
                extra = self._forward_backward(batch)
                if engine.accelerator.sync_gradients:
                    self._after_optimizer_step(extra)
                    bar.update(1)
                    if on_checkpoint and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                            and self.step < self.total_steps:  # fmt: skip
                        on_checkpoint(*self._capture(epoch, micro))
                    faults.point("step")
        bar.close()
        if self.skip_to is not None:
            raise ValueError(f"the mid-task checkpoint of task {self.name!r} is past the end of its data")
        if self.sparsifier is not None:
            self.sparsifier.finish()
        engine.accelerator.free_memory()
        return engine.accelerator.unwrap_model(self.wrapped)

    def _replaying(self, epoch: int, micro: int) -> bool:
        """Skip the batches before a mid-task checkpoint; restore the RNG states where it was taken."""
        if self.skip_to is None:
            return False
        if (epoch, micro) == self.skip_to:
            training_state.restore_rng(*self._resume)
            self.skip_to = None
        return True

    def _forward_backward(self, batch: dict) -> torch.Tensor | None:
        engine, acc = self.engine, self.engine.accelerator
        with acc.accumulate(self.wrapped):
            task_loss = engine.loaded.family.loss(self.wrapped, batch)
            extra = engine.strategy.loss_term(self.ctx, batch, task_loss)
            penalty = self.sparsifier.loss_term() if self.sparsifier is not None else None
            loss = task_loss + extra if extra is not None else task_loss
            if faults.poisoned(self.task_index, self.step):
                loss = loss * float("nan")
            engine.check_loss(loss if penalty is None else loss + penalty.detach(), self.task_index, self.step)
            acc.backward(loss)
            if penalty is not None:
                self._add_theta_gradient(penalty)
            engine.strategy.after_backward(self.ctx)
            if acc.sync_gradients:
                if engine.shard != "none":  # what DDP does for the adapter: θ, A, B identical on every process
                    average_gradients(self.params)
                if engine.config.optim.max_grad_norm:
                    acc.clip_grad_norm_(self.params, engine.config.optim.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.running.append(float(task_loss.detach()))
        return extra

    def _add_theta_gradient(self, penalty: torch.Tensor) -> None:
        """The density-control term's gradient, added to θ's after the backward pass.

        Outside the wrapped model's backward on purpose: under DDP a θ the forward did not use (γ = 0)
        is already marked ready, and a second autograd hook on it would be an error. Every process adds
        the same gradient (θ and ΔW are in sync), scaled like the loss for gradient accumulation.
        """
        thetas = list(threshold_parameters(self.model).values())
        grads = torch.autograd.grad(penalty / self.engine.config.optim.grad_accum, thetas, allow_unused=True)
        for theta, grad in zip(thetas, grads, strict=True):
            if grad is not None:
                theta.grad = grad if theta.grad is None else theta.grad + grad

    def _after_optimizer_step(self, extra: torch.Tensor | None) -> None:
        engine = self.engine
        if self.sparsifier is not None:
            self.sparsifier.after_step(self.step)
        self.step += 1
        engine.global_step += 1
        engine.check_thresholds(self.model, self.task_index, self.step)
        if self.step % engine.config.log_every == 0 or self.step == self.total_steps:
            self._log(extra)
            self.running = []

    def _log(self, extra: torch.Tensor | None) -> None:
        engine = self.engine
        loss = float(np.mean(self.running)) if self.running else None
        if engine.accelerator.num_processes > 1 and loss is not None:  # the mean over all processes
            local = torch.tensor([loss], dtype=torch.float64, device=engine.accelerator.device)
            loss = float(engine.accelerator.reduce(local, reduction="mean")[0])
        record: dict[str, Any] = {
            "task": self.name,
            "task_index": self.task_index,
            "step": self.step,
            "global_step": engine.global_step,
            "loss": loss,
            "strategy_loss": float(extra.detach()) if extra is not None else 0.0,
            "lr": self.scheduler.get_last_lr()[0],
            "gamma": 0.0,
            "theta": engine.thresholds(self.model),
            "density": None,
        }
        if self.sparsifier is not None:
            record.update(self.sparsifier.log_state())
        if engine.is_main:
            engine.on_log(record)

    def _capture(self, epoch: int, micro: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta, tensors = training_state.capture(self.model, self.optimizer, self.scheduler)
        meta.update(
            task=self.task_index, epoch=epoch, micro=micro, step=self.step, global_step=self.engine.global_step,
            running=self.running, sparsifier=self.sparsifier.state_dict() if self.sparsifier else {},
        )  # fmt: skip
        tensors.update({f"strategy.{k}": v for k, v in self.engine.strategy.state_dict().items()})
        return meta, tensors


def _allow_precision_change(mixed_precision: str) -> None:
    """Accelerate keeps one precision per process: a run in a process whose earlier run chose another one
    (tests, notebooks, a Python loop over configs) resets the single-process state instead of failing."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", mixed_precision) != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


def _tracking_dir(config: RunConfig) -> Any:
    from pathlib import Path

    return Path(config.out) / "tracking"


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
