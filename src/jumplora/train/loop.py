"""One task's optimisation through Accelerate: optimizer groups, the γ/θ schedule, step hooks, logging,
mid-task checkpoints. It knows the model, its data, the accelerator and the hooks, not the run."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_constant_schedule_with_warmup

from jumplora import training_state
from jumplora.adapters import Sparsifier, theta_learning_rate, threshold_parameters, threshold_values
from jumplora.adapters.sharded import average_gradients
from jumplora.cl import Strategy, StrategyContext
from jumplora.config import RunConfig
from jumplora.models import ModelFamily
from jumplora.sharding import BASE_BACKENDS, zero_stage
from jumplora.sharding_zero import AdapterZero
from jumplora.train.hooks import StepHook, StrategyHook, gradient_readers, registered_hooks
from jumplora.train.numerics import check_loss, check_thresholds, task_label


class StepCounter(Protocol):
    """Where the run counts its optimizer steps across tasks (``RunState``)."""

    global_step: int


class TaskLoop:
    """Trains the adapter of ``model`` on ``features`` for one task (``task_index``)."""

    def __init__(
        self,
        model: nn.Module,
        task_index: int,
        features: list[dict],
        *,
        config: RunConfig,
        accelerator: Accelerator,
        family: ModelFamily,
        strategy: Strategy,
        ctx: StrategyContext,
        counter: StepCounter,
        name: str | None = None,
        shard: str = "none",
        on_log: Callable[[dict[str, Any]], None] = lambda record: None,
        progress: Callable[..., Any] | None = None,
    ) -> None:
        self.config, self.accelerator, self.family, self.strategy, self.ctx = config, accelerator, family, strategy, ctx
        self.model, self.task_index, self.counter = model, task_index, counter
        self.sharded = shard in BASE_BACKENDS  # the base is sharded: the loop syncs the replicated adapter itself
        self.name, self.on_log, self.progress = name or ctx.task_name, on_log, progress
        self.hooks: list[StepHook] = [StrategyHook(strategy, ctx), *registered_hooks(task_index)]
        generator = torch.Generator().manual_seed(config.seed * 100_003 + task_index)
        loader = DataLoader(features, batch_size=config.optim.batch_size, shuffle=True, generator=generator,
                            collate_fn=family.collate)  # fmt: skip
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self._param_groups(), lr=config.optim.lr)
        self.zero = self._adapter_zero(zero_stage(shard), optimizer)
        if self.zero is not None:  # DeepSpeed steps the adapter; forward passes go through its engine
            self.wrapped, self.optimizer, self.loader = self.zero.engine, optimizer, accelerator.prepare(loader)
        elif self.sharded:  # the base is sharded already; the replicated adapter is synced by hand
            self.wrapped, (self.optimizer, self.loader) = model, accelerator.prepare(optimizer, loader)
        else:
            self.wrapped, self.optimizer, self.loader = accelerator.prepare(model, optimizer, loader)
        self.total_steps = max(1, math.ceil(len(self.loader) / config.optim.grad_accum) * config.optim.epochs)
        warmup = round(config.optim.warmup_ratio * self.total_steps)
        self.scheduler = get_constant_schedule_with_warmup(self.optimizer, warmup)
        self.sparsifier = Sparsifier(model, self.total_steps) if config.adapter.sparse else None
        self.step, self.running = 0, []
        self.skip_to: tuple[int, int] | None = None  # (epoch, micro-batch) of a mid-task checkpoint
        self._resume: tuple[dict, dict] | None = None

    def _param_groups(self) -> list[dict[str, Any]]:
        optim = self.config.optim
        theta_ids = {id(p) for p in threshold_parameters(self.model).values()} if self.config.adapter.sparse else set()
        groups = [{"params": [p for p in self.params if id(p) not in theta_ids], "weight_decay": optim.weight_decay}]
        if theta_ids:
            thetas = [p for p in self.params if id(p) in theta_ids]
            lr = optim.theta_lr or theta_learning_rate(self.model) or optim.lr  # a density controller sets its own
            groups.append({"params": thetas, "weight_decay": 0.0, "lr": lr})
        return groups

    def _adapter_zero(self, stage: int | None, optimizer: torch.optim.Optimizer) -> AdapterZero | None:
        """DeepSpeed's ZeRO-1/2 optimizer for the adapter (None: the loop steps ``optimizer`` itself).

        ZeRO-2 hands the gradients to their partitions during the backward pass: a hook that reads or
        edits ``param.grad`` before the step would see none, so it is refused rather than run without them."""
        if stage is None:
            return None
        readers = gradient_readers(self.hooks)
        if stage == 2 and readers:
            raise ValueError(f"{', '.join(readers)} act on the gradients before the optimizer step, which ZeRO-2 "
                             "partitions during the backward pass; use --shard zero1")  # fmt: skip
        o = self.config.optim
        return AdapterZero(self.model, optimizer, stage, batch_size=o.batch_size, grad_accum=o.grad_accum,
                           max_grad_norm=o.max_grad_norm, device=self.accelerator.device)  # fmt: skip

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a mid-task checkpoint (``meta``, ``tensors``) of this task."""
        if meta["task"] != self.task_index:
            raise ValueError(f"a mid-task checkpoint of task {meta['task']} cannot resume task {self.task_index}")
        training_state.restore(self.model, self.optimizer, self.scheduler, meta, tensors)
        self.step, self.running = meta["step"], list(meta["running"])
        self.counter.global_step = meta["global_step"]
        self.skip_to = (meta["epoch"], meta["micro"])
        self._resume = (meta, tensors)
        self.strategy.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("strategy.")})
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(meta["sparsifier"])

    def run(self, on_checkpoint: Callable[[dict, dict], None] | None = None) -> nn.Module:
        """Train to the task's end; ``on_checkpoint(meta, tensors)`` every ``checkpoint_every`` steps.

        Returns the unwrapped PEFT model."""
        cfg = self.config
        self.strategy.on_task_start(self.ctx)
        self.wrapped.train()
        bar = self.progress(None, f"train {self.name}", total=self.total_steps, initial=self.step) \
            if self.progress else None  # fmt: skip
        for epoch in range(cfg.optim.epochs):
            for micro, batch in enumerate(self.loader):
                if self._replaying(epoch, micro):
                    continue
                if micro % cfg.optim.grad_accum == 0 and self.sparsifier is not None:
                    self.sparsifier.before_step(self.step)
                extra = self._forward_backward(batch)
                if self.accelerator.sync_gradients:
                    self._after_optimizer_step(extra)
                    if bar is not None:
                        bar.update(1)
                    if on_checkpoint and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                            and self.step < self.total_steps:  # fmt: skip
                        on_checkpoint(*self._capture(epoch, micro))
                    for hook in self.hooks:
                        hook.after_step(self.task_index, self.step)
        if bar is not None:
            bar.close()
        if self.skip_to is not None:
            raise ValueError(f"the mid-task checkpoint of task {self.name!r} is past the end of its data")
        if self.sparsifier is not None:
            self.sparsifier.finish()
        self.accelerator.free_memory()
        if self.zero is not None:
            self.zero.close()
            return self.model
        return self.accelerator.unwrap_model(self.wrapped)

    def _replaying(self, epoch: int, micro: int) -> bool:
        """Skip the batches before a mid-task checkpoint; restore the RNG states where it was taken."""
        if self.skip_to is None:
            return False
        if (epoch, micro) == self.skip_to:
            training_state.restore_rng(*self._resume)
            self.skip_to = None
        return True

    def _where(self) -> str:
        return f"{task_label(self.ctx.task_name, self.task_index)}, step {self.step}"

    def _forward_backward(self, batch: dict) -> torch.Tensor | None:
        acc = self.accelerator
        # Accelerate counts the micro-batches; DeepSpeed's engine accumulates until its step by itself (and its
        # no_sync, which Accelerate would enter, refuses ZeRO-2), so Accelerate gets the bare model
        with acc.accumulate(self.model if self.zero is not None else self.wrapped):
            task_loss = self.family.loss(self.wrapped, batch)
            extra = None
            for hook in self.hooks:
                term = hook.loss_term(batch, task_loss, self.step)
                if term is not None:
                    extra = term if extra is None else extra + term
            penalty = self.sparsifier.loss_term() if self.sparsifier is not None else None
            loss = task_loss + extra if extra is not None else task_loss
            check_loss(loss if penalty is None else loss + penalty.detach(), acc, self._where())
            if self.zero is not None:  # θ's term reaches θ's gradient through DeepSpeed's hooks like the rest
                self.zero.backward(loss if penalty is None else loss + penalty)
            else:
                acc.backward(loss)
                if penalty is not None:
                    add_theta_gradient(self.model, penalty, self.config.optim.grad_accum)
            if acc.sync_gradients:
                self._optimizer_step()
        self.running.append(float(task_loss.detach()))
        return extra

    def _optimizer_step(self) -> None:
        """The hooks see the accumulated gradients, then they are synced, clipped and applied."""
        for hook in self.hooks:
            hook.before_optimizer_step()
        if self.zero is not None:  # DeepSpeed averages, clips and steps each process's partition
            self.zero.step()
            self.scheduler.step()
            return
        if self.sharded:  # what DDP does for the adapter: θ, A, B identical on every process
            average_gradients(self.params)
        if self.config.optim.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _after_optimizer_step(self, extra: torch.Tensor | None) -> None:
        if self.sparsifier is not None:
            self.sparsifier.after_step(self.step)
        self.step += 1
        self.counter.global_step += 1
        if self.config.adapter.sparse:
            check_thresholds(self.model, self._where())
        if self.step % self.config.log_every == 0 or self.step == self.total_steps:
            self._log(extra)
            self.running = []

    def _log(self, extra: torch.Tensor | None) -> None:
        acc = self.accelerator
        loss = float(np.mean(self.running)) if self.running else None
        if acc.num_processes > 1 and loss is not None:  # the mean over all processes
            local = torch.tensor([loss], dtype=torch.float64, device=acc.device)
            loss = float(acc.reduce(local, reduction="mean")[0])
        record: dict[str, Any] = {
            "task": self.name,
            "task_index": self.task_index,
            "step": self.step,
            "global_step": self.counter.global_step,
            "loss": loss,
            "strategy_loss": float(extra.detach()) if extra is not None else 0.0,
            "lr": self.scheduler.get_last_lr()[0],
            "gamma": 0.0,
            "theta": threshold_values(self.model) if self.config.adapter.sparse else {},
            "density": None,
        }
        if self.sparsifier is not None:
            record.update(self.sparsifier.log_state())
        if acc.is_main_process:
            self.on_log(record)

    def _capture(self, epoch: int, micro: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta, tensors = training_state.capture(self.model, self.optimizer, self.scheduler)
        meta.update(
            task=self.task_index, epoch=epoch, micro=micro, step=self.step, global_step=self.counter.global_step,
            running=self.running, sparsifier=self.sparsifier.state_dict() if self.sparsifier else {},
        )  # fmt: skip
        tensors.update({f"strategy.{k}": v for k, v in self.strategy.state_dict().items()})
        return meta, tensors


def add_theta_gradient(model: nn.Module, penalty: torch.Tensor, grad_accum: int) -> None:
    """The density-control term's gradient, added to θ's after the backward pass.

    Outside the wrapped model's backward on purpose: under DDP a θ the forward did not use (γ = 0)
    is already marked ready, and a second autograd hook on it would be an error. Every process adds
    the same gradient (θ and ΔW are in sync), scaled like the loss for gradient accumulation.
    """
    thetas = list(threshold_parameters(model).values())
    grads = torch.autograd.grad(penalty / grad_accum, thetas, allow_unused=True)
    for theta, grad in zip(thetas, grads, strict=True):
        if grad is not None:
            theta.grad = grad if theta.grad is None else theta.grad + grad
