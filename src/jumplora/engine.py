"""The training engine: a task stream goes in, the accuracy matrix and CL analytics come out.

Per task: put a JumpLoRA (or dense LoRA) adapter on the model → train through Accelerate → let the
strategy act (sparse merge, W_past update) → evaluate every task of the stream. After each task the
run directory holds everything needed to resume (see ``RunState``); every file is written atomically.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup

from jumplora import faults
from jumplora.adapters import (
    JumpLoraConfig,
    MergeResult,
    Sparsifier,
    merge_and_discard,
    supports,
    theta_learning_rate,
    threshold_parameters,
    threshold_values,
)
from jumplora.cl.strategies import REFERENCE_MODES, Strategy, make_strategy
from jumplora.config import RunConfig
from jumplora.data import Task, TaskStream, load_benchmark_stream, load_custom_stream, resolve_data_dir
from jumplora.io import append_jsonl
from jumplora.metrics import cl_metrics, density, density_per_module, jaccard
from jumplora.models import LoadedModel, PromptExample, load_model


class NumericalError(RuntimeError):
    """A NaN/inf loss or threshold: the run stops and keeps its last good checkpoint."""


def load_task_stream(config: RunConfig) -> TaskStream:
    """The stream a config names (custom file, explicit task list, or a benchmark order)."""
    caps = {"max_train": config.max_train, "max_eval": config.max_eval, "seed": config.seed}
    if config.stream_file:
        data_dir = resolve_data_dir(config.data_dir) if config.data_dir else None
        return load_custom_stream(config.stream_file, data_dir=data_dir, **caps)
    return load_benchmark_stream(config.order, resolve_data_dir(config.data_dir), tasks=config.tasks, **caps)


@dataclass
class TaskData:
    """A task's examples, tokenised once for the whole run."""

    task: Task
    train_examples: list[PromptExample]
    eval_examples: list[PromptExample]
    train_features: list[dict] = field(default_factory=list)
    eval_features: list[dict] = field(default_factory=list)


def build_task_data(stream: TaskStream, loaded: LoadedModel, config: RunConfig) -> list[TaskData]:
    space = stream.option_space
    out = []
    for task in stream.tasks:
        candidates = tuple(task.options) if config.option_space == "task" else space

        def examples(
            split: str, task: Task = task, candidates: tuple[str, ...] = candidates
        ) -> list[PromptExample]:
            return [PromptExample(task.prompt(ex.text), ex.label, candidates) for ex in task.split(split)]

        data = TaskData(task, examples("train"), examples(config.eval_split))
        data.train_features = loaded.family.encode(data.train_examples)
        data.eval_features = loaded.family.encode(data.eval_examples)
        out.append(data)
    return out


@dataclass
class RunState:
    """What survives between tasks (and is checkpointed): the rows of R and per-task analytics."""

    next_task: int = 0
    zero_shot: list[float] | None = None
    rows: list[list[float]] = field(default_factory=list)
    per_task: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0
    wall_time_s: float = 0.0


class ContinualTrainer:
    """Runs one configuration end to end; ``run()`` returns the results dict also saved to disk."""

    def __init__(
        self, config: RunConfig, accelerator: Accelerator | None = None, quiet: bool = False
    ) -> None:
        self.config = config
        self.out = Path(config.out)
        self.quiet = quiet
        if accelerator is None:
            kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)]
            accelerator = Accelerator(
                cpu=config.cpu,
                mixed_precision=config.mixed_precision,
                gradient_accumulation_steps=config.grad_accum,
                kwargs_handlers=kwargs,
            )
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        if config.strategy in REFERENCE_MODES:
            self.strategy: Strategy | None = None
        else:
            self.strategy = make_strategy(
                config.strategy,
                ella_lambda=config.ella_lambda,
                olora_lambda=config.olora_lambda,
                olora_l2=config.olora_l2,
            )
        # Loaded lazily in prepare(): loading and validating input must fail before any output exists.
        self.stream: TaskStream | None = None
        self.loaded: LoadedModel | None = None
        self.tasks: list[TaskData] = []
        self.state = RunState()
        self.supports: list[dict[str, torch.Tensor]] = []
        # A mid-task checkpoint of the next task (JSON part, tensors), set by RunDirectory.restore.
        self.pending_partial: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None

    # -- set-up -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load and validate everything (data, model, targets) before anything is written."""
        cfg = self.config
        self.stream = load_task_stream(cfg)
        self.loaded = load_model(
            cfg.model,
            cfg.family,
            trust_remote_code=cfg.trust_remote_code,
            max_length=cfg.max_length,
            rank_options=cfg.rank_options,
        )
        self.target_modules = cfg.target_modules or self.loaded.target_modules
        self._check_targets()
        self.adapter_config()  # validates the adapter options now, not at the first task
        self.tasks = build_task_data(self.stream, self.loaded, cfg)
        self.base_model = self.loaded.model.to(self.accelerator.device)

    def _check_targets(self) -> None:
        names = [name for name, _ in self.loaded.model.named_modules()]
        missing = [t for t in self.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing and self.target_modules != ["all-linear"]:
            raise ValueError(
                f"target modules {missing} are not modules of the model at "
                f"{self.loaded.path}; e.g. {', '.join(n for n in names[-6:] if n)}"
            )
        if self.target_modules != ["all-linear"]:
            for name, module in self.loaded.model.named_modules():
                matched = any(name == t or name.endswith("." + t) for t in self.target_modules)
                if matched and not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
                    raise ValueError(
                        f"target module {name!r} is a {type(module).__name__}; adapters go on linear "
                        "layers only (nn.Linear, GPT-2's Conv1D)"
                    )

    def adapter_config(self) -> JumpLoraConfig:
        cfg = self.config
        return JumpLoraConfig(
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(self.target_modules),
            fan_in_fan_out=getattr(self.loaded.model.config, "model_type", "") == "gpt2",
            sparse=cfg.jumplora,
            threshold_granularity=cfg.threshold_granularity,
            threshold_param=cfg.threshold_param,
            bandwidth=cfg.bandwidth,
            threshold_reduction=cfg.threshold_reduction,
            sparsify_start=cfg.sparsify_start,
            sparsify_end=cfg.sparsify_end,
            target_density=cfg.target_density,
            density_control=cfg.density_control,
            l0_lambda=cfg.l0_lambda,
            dual_lr=cfg.dual_lr,
            dual_gain=cfg.dual_gain,
            controller_theta_lr=cfg.controller_theta_lr,
        )

    # -- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData) -> float:
        """Accuracy on the task's eval split (sharded over processes, counts summed)."""
        family = self.loaded.family
        model = self.accelerator.unwrap_model(model)
        was_training = model.training
        model.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        indices = list(range(rank, len(data.eval_features), world))
        # Batches of similar lengths pad less (~10 % fewer tokens on the default stream); counts only.
        indices.sort(key=lambda i: len(data.eval_features[i]["input_ids"]))
        correct = 0
        bs = self.config.eval_batch_size
        with family.eval_cache(model):
            for start in range(0, len(indices), bs):
                chunk = indices[start : start + bs]
                batch = family.collate([data.eval_features[i] for i in chunk])
                batch = _to_device(batch, self.accelerator.device)
                preds = family.predict(model, batch)
                correct += sum(
                    family.is_correct(p, data.eval_examples[i].answer)
                    for p, i in zip(preds, chunk, strict=True)
                )
        model.train(was_training)
        totals = torch.tensor([correct, len(indices)], dtype=torch.float64, device=self.accelerator.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        return float(totals[0] / max(totals[1], 1))

    def evaluate_all(self, model: nn.Module, desc: str) -> list[float]:
        bar = tqdm(self.tasks, desc=desc, disable=self.quiet or not self.is_main, leave=False)
        return [self.evaluate(model, data) for data in bar]

    # -- training -------------------------------------------------------------------------------------
    def train_task(
        self,
        model: nn.Module,
        features: list[dict],
        task_index: int,
        task_name: str,
        *,
        resume: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
        checkpoint: bool = False,
    ) -> tuple[nn.Module, Sparsifier | None]:
        """Train the adapter on one task's features; returns the (unwrapped) PEFT model.

        ``checkpoint``: write a mid-task checkpoint every ``config.checkpoint_every`` optimizer steps;
        ``resume``: such a checkpoint to continue from (the batches before it are skipped).
        """
        from jumplora.checkpoint import capture_training_state, restore_rng, restore_training_state

        cfg, acc = self.config, self.accelerator
        family = self.loaded.family
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + task_index)
        loader = DataLoader(
            features, batch_size=cfg.batch_size, shuffle=True, generator=generator, collate_fn=family.collate
        )
        theta_ids = {id(p) for p in threshold_parameters(model).values()} if cfg.jumplora else set()
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in theta_ids], "weight_decay": cfg.weight_decay}]
        if theta_ids:
            groups.append(
                {
                    "params": [p for p in params if id(p) in theta_ids],
                    "weight_decay": 0.0,
                    "lr": cfg.theta_lr or theta_learning_rate(model) or cfg.lr,
                }
            )
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        wrapped, optimizer, loader = acc.prepare(model, optimizer, loader)
        steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
        total_steps = max(1, steps_per_epoch * cfg.epochs)
        scheduler = get_constant_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps))
        sparsifier = None
        if cfg.jumplora:
            sparsifier = Sparsifier(model, total_steps)  # window, target and control from the adapter config
        step = 0
        running: list[float] = []
        skip_to: tuple[int, int] | None = None  # (epoch, micro-batch) after which the checkpoint was taken
        if resume is not None:
            meta, tensors = resume
            restore_training_state(model, optimizer, scheduler, meta, tensors)
            step, running = meta["step"], list(meta["running"])
            self.state.global_step = meta["global_step"]
            skip_to = (meta["epoch"], meta["micro"])
            if sparsifier is not None:
                sparsifier.load_state_dict(meta["sparsifier"])
        if self.strategy is not None:
            self.strategy.on_task_start(model, task_index)

        wrapped.train()
        bar = tqdm(
            total=total_steps,
            initial=step,
            desc=f"train {task_name}",
            disable=self.quiet or not self.is_main,
            leave=False,
        )
        for epoch in range(cfg.epochs):
            for micro, batch in enumerate(loader):
                if skip_to is not None:
                    # Replay the data order up to the checkpoint; RNG states as they were there.
                    if (epoch, micro) == skip_to:
                        restore_rng(resume[0], resume[1])
                        skip_to = None
                    continue
                if micro % cfg.grad_accum == 0 and sparsifier is not None:
                    sparsifier.before_step(step)
                with acc.accumulate(wrapped):
                    task_loss = family.loss(wrapped, batch)
                    extra = self.strategy.loss_term(model) if self.strategy is not None else None
                    loss = task_loss + extra if extra is not None else task_loss
                    density_term = sparsifier.loss_term() if sparsifier is not None else None
                    if density_term is not None:
                        loss = loss + density_term
                    if faults.nan_at(task_index, step):
                        loss = loss * float("nan")
                    self._check_loss(loss, task_name, task_index, step)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if cfg.max_grad_norm:
                            acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        if sparsifier is not None:
                            sparsifier.after_step(step)
                running.append(float(task_loss.detach()))
                if acc.sync_gradients:
                    step += 1
                    self.state.global_step += 1
                    self._check_thresholds(model, task_name, task_index, step)
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == total_steps:
                        self._log_step(
                            model, task_name, task_index, step, running, extra, sparsifier, scheduler
                        )
                        running = []
                    every = cfg.checkpoint_every if checkpoint else 0
                    if every and step % every == 0 and step < total_steps:
                        meta, tensors = capture_training_state(model, optimizer, scheduler)
                        meta.update(
                            task=task_index,
                            epoch=epoch,
                            micro=micro,
                            step=step,
                            global_step=self.state.global_step,
                            running=running,
                            sparsifier=sparsifier.state_dict() if sparsifier else None,
                        )
                        self.rundir.save_partial(self, meta, tensors)
                    faults.point("step")
        bar.close()
        if skip_to is not None:
            raise RuntimeError(f"mid-task checkpoint of task {task_name!r} is past the end of its data")
        if sparsifier is not None:
            sparsifier.finish()
        acc.free_memory()
        return acc.unwrap_model(wrapped), sparsifier

    def _check_loss(self, loss: torch.Tensor, task_name: str, task_index: int, step: int) -> None:
        """Stop on a NaN/inf loss; with several processes, all of them stop (no one hangs in a collective)."""
        bad = ~torch.isfinite(loss.detach())
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.float().reshape(1), reduction="sum") > 0
        if bool(bad):
            raise NumericalError(
                f"task {task_name!r} (index {task_index}), step {step}: loss is {loss.item()} (on at least "
                "one process); the run directory keeps the last good checkpoint"
            )

    def _check_thresholds(self, model: nn.Module, task_name: str, task_index: int, step: int) -> None:
        if not self.config.jumplora:
            return
        for group, raw in threshold_parameters(model).items():
            if not torch.isfinite(raw).all():
                raise NumericalError(
                    f"task {task_name!r} (index {task_index}), step {step}: threshold of group {group!r} is "
                    f"{raw.item()}; the run directory keeps the last good checkpoint"
                )

    def _log_step(self, model, task_name, task_index, step, running, extra, sparsifier, scheduler) -> None:
        loss = float(np.mean(running)) if running else None
        if self.accelerator.num_processes > 1 and loss is not None:  # the mean over all processes
            local = torch.tensor([loss], dtype=torch.float64, device=self.accelerator.device)
            loss = float(self.accelerator.reduce(local, reduction="mean")[0])
        if not self.is_main:
            return
        record: dict[str, Any] = {
            "task": task_name,
            "task_index": task_index,
            "step": step,
            "global_step": self.state.global_step,
            "loss": loss,
            "strategy_loss": float(extra.detach()) if extra is not None else 0.0,
            "lr": scheduler.get_last_lr()[0],
            "gamma": 0.0,
            "theta": threshold_values(model) if self.config.jumplora else {},
            "density": None,
        }
        if sparsifier is not None:
            record.update(sparsifier.log_state())
        append_jsonl(self.out / "train_log.jsonl", record)

    def new_adapter(self, base: nn.Module, task_index: int) -> nn.Module:
        set_seed(self.config.seed * 1000 + task_index)
        return peft.get_peft_model(base, self.adapter_config())

    # -- the stream -----------------------------------------------------------------------------------
    def run(self, fresh: bool = False) -> dict[str, Any]:
        """Run the stream; resumes from the checkpoint in ``config.out`` unless ``fresh``."""
        from jumplora.checkpoint import RunDirectory  # local: the run directory format lives there

        if self.loaded is None:
            self.prepare()
        self.rundir = RunDirectory(self.out, self.config)
        faults.instrument(self)
        # Every process has validated its input (and the CLI has checked the folder) before the
        # main process writes anything.
        self.accelerator.wait_for_everyone()
        start = time.perf_counter()
        if self.config.strategy in REFERENCE_MODES:
            results = self._run_reference(start)
        else:
            results = self._run_stream(start, fresh)
        self.accelerator.wait_for_everyone()
        return results

    def _run_stream(self, start: float, fresh: bool = False) -> dict[str, Any]:
        cfg, names = self.config, [d.task.name for d in self.tasks]
        model: nn.Module = self.base_model
        # restore() returns the model in its state after the last finished task
        resumed = None if fresh else self.rundir.restore(self)
        if resumed is not None:
            model = resumed
            if self.is_main:
                where = f"after {self.state.next_task} of {len(names)} tasks"
                if self.pending_partial is not None:
                    meta = self.pending_partial[0]
                    where += f", task {meta['task']} from its mid-task checkpoint at step {meta['step']}"
                print(f"resuming {self.out} {where}", file=sys.stderr)
        elif self.is_main:
            self.rundir.start()
        self.accelerator.wait_for_everyone()
        elapsed_before = self.state.wall_time_s
        if self.state.zero_shot is None:
            set_seed(cfg.seed)
            self.state.zero_shot = self.evaluate_all(model, "zero-shot eval")
            self.rundir.save(self, model, partial_results=self._results(names, False, elapsed_before, start))
        peft_model: nn.Module | None = model if isinstance(model, peft.PeftModel) else None
        for i in range(self.state.next_task, len(self.tasks)):
            data = self.tasks[i]
            if peft_model is None or not self.strategy.shares_adapter:
                peft_model = self.new_adapter(model, i)
            else:  # a shared adapter: same per-task seeding, so a resumed run draws the same numbers
                set_seed(cfg.seed * 1000 + i)
            partial, self.pending_partial = self.pending_partial, None
            peft_model, _ = self.train_task(
                peft_model, data.train_features, i, data.task.name, resume=partial, checkpoint=True
            )
            last = i == len(self.tasks) - 1
            merged: MergeResult | None = None
            if self.strategy.shares_adapter and not last:
                task_support = supports(peft_model)
                task_thresholds = threshold_values(peft_model) if cfg.jumplora else {}
                model = peft_model
            else:
                task_thresholds = threshold_values(peft_model) if cfg.jumplora else {}
                merged = merge_and_discard(peft_model, keep_updates=True)
                task_support, model, peft_model = merged.supports, merged.model, None
            self.strategy.on_task_end(i, merged)
            self.state.rows.append(self.evaluate_all(model, f"eval after {data.task.name}"))
            self.state.per_task.append(self._task_analytics(data.task.name, task_support, task_thresholds))
            self.supports.append(task_support)
            self.state.next_task = i + 1
            self.rundir.save(
                self, model, merged=merged, partial_results=self._results(names, False, elapsed_before, start)
            )
        results = self._results(names, True, elapsed_before, start)
        self.rundir.finish(self, results)
        return results

    def _run_reference(self, start: float) -> dict[str, Any]:
        """Upper bound (all tasks jointly) or per-task training from scratch, clearly labelled."""
        cfg, names = self.config, [d.task.name for d in self.tasks]
        if self.is_main:
            self.rundir.start()
        initial = copy.deepcopy(self.base_model)
        self.state.zero_shot = self.evaluate_all(self.base_model, "zero-shot eval")
        if cfg.strategy == "multitask":
            features = [f for d in self.tasks for f in d.train_features]
            peft_model, _ = self.train_task(self.new_adapter(self.base_model, 0), features, 0, "multitask")
            merged = merge_and_discard(peft_model)
            row = self.evaluate_all(merged.model, "eval multitask")
            self.state.per_task.append(self._task_analytics("multitask", merged.supports, {}))
            matrix, metrics = [row], {"op": float(np.mean(row))}
        else:
            row = []
            for i, data in enumerate(self.tasks):
                fresh = copy.deepcopy(initial)
                peft_model, _ = self.train_task(
                    self.new_adapter(fresh, i), data.train_features, i, data.task.name
                )
                merged = merge_and_discard(peft_model)
                row.append(self.evaluate(merged.model, data))
                self.state.per_task.append(self._task_analytics(data.task.name, merged.supports, {}))
            matrix, metrics = [row], {"op": float(np.mean(row))}
        results = self._results(names, True, 0.0, start)
        results.update(accuracy_matrix=matrix, metrics=metrics, reference=cfg.strategy)
        if cfg.strategy == "independent":
            results["independent"] = row
        self.rundir.finish(self, results)
        return results

    # -- analytics --------------------------------------------------------------------------------------
    def _task_analytics(self, name: str, support: dict[str, torch.Tensor], thresholds: dict[str, float]):
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

    def _results(
        self, names: list[str], complete: bool, elapsed_before: float, start: float
    ) -> dict[str, Any]:
        rows = self.state.rows
        zero_shot = self.state.zero_shot
        metrics = cl_metrics(np.array(rows), zero_shot) if len(rows) == len(names) and rows else None
        overlap = [[jaccard(a, b) for b in self.supports] for a in self.supports]
        self.state.wall_time_s = elapsed_before + time.perf_counter() - start
        return {
            "complete": complete,
            "config": self.config.to_dict(),
            "label": self.config.label,
            "tasks": names,
            "tasks_done": len(rows),
            "accuracy_matrix": rows,
            "zero_shot": zero_shot,
            "independent": None,
            "metrics": metrics,
            "per_task": self.state.per_task,
            "overlap_matrix": overlap,
            "wall_time_s": self.state.wall_time_s,
            "dropped_eval_items": {d.task.name: d.task.dropped for d in self.tasks if d.task.dropped},
        }


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
