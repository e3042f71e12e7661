"""Step hooks: what acts at each step of a task's training besides the task loss.

The strategy is one (:class:`StrategyHook`: its loss term, and ``after_backward`` once per optimizer
step); the sparsifier's γ/θ schedule is the loop's own. Code outside the package (a ``--plugin`` file,
a test injecting a fault) adds hooks with :func:`register_step_hook`; nothing here knows about them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from jumplora.cl import Strategy, StrategyContext


class StepHook:
    """No-ops; a hook overrides what it needs. ``step`` counts the optimizer steps already taken in the task."""

    def loss_term(self, batch: dict, task_loss: torch.Tensor, step: int) -> torch.Tensor | None:
        """Added to the loss of this micro-batch (None: nothing)."""
        return None

    def before_optimizer_step(self) -> None:
        """The accumulated gradients of the step exist; the optimizer has not stepped yet."""

    def after_step(self, task_index: int, step: int) -> None:
        """The optimizer step ``step`` (counted from 1) is done, logged and, when due, checkpointed."""


class StrategyHook(StepHook):
    """A CL strategy's per-step hooks (its task-boundary hooks are the runner's)."""

    def __init__(self, strategy: Strategy, ctx: StrategyContext) -> None:
        self.strategy, self.ctx = strategy, ctx

    def loss_term(self, batch: dict, task_loss: torch.Tensor, step: int) -> torch.Tensor | None:
        return self.strategy.loss_term(self.ctx, batch, task_loss)

    def before_optimizer_step(self) -> None:
        self.strategy.after_backward(self.ctx)


def gradient_readers(hooks: list[StepHook]) -> list[str]:
    """The hooks (a strategy by its name) that act before the optimizer step, i.e. on the gradients."""
    readers = []
    for hook in hooks:
        if isinstance(hook, StrategyHook):
            if type(hook.strategy).after_backward is not Strategy.after_backward:
                readers.append(f"strategy {hook.strategy.name!r}")
        elif type(hook).before_optimizer_step is not StepHook.before_optimizer_step:
            readers.append(f"step hook {type(hook).__name__}")
    return readers


#: Factories of the hooks added to every task's loop: ``factory(task_index)`` → a hook or None.
_FACTORIES: list[Callable[[int], StepHook | None]] = []


def register_step_hook(factory: Callable[[int], StepHook | None]) -> Callable[[int], StepHook | None]:
    """Add a hook to every task's training loop from now on (usable as a decorator)."""
    _FACTORIES.append(factory)
    return factory


def registered_hooks(task_index: int) -> list[StepHook]:
    """The registered factories' hooks for one task."""
    return [hook for factory in _FACTORIES if (hook := factory(task_index)) is not None]
