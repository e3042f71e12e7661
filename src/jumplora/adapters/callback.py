"""`JumpLoraCallback`: what a plain ``transformers.Trainer`` needs to train a JumpLoRA adapter.

Without it nothing drives γ and θ: γ stays 0, θ keeps its placeholder, and the end-of-training merge
throws the update away. The callback builds a :class:`~jumplora.adapters.Sparsifier` from the adapter's
``JumpLoraConfig`` (total steps from ``state.max_steps``) and, per optimizer step, sets γ (step begin),
adds the θ-only density-control gradient after the task gradient has been clipped (pre-optimizer step:
the term has no gradient to A or B, so it needs no pass through the model), updates the controller
(step end), and fully gates the adapter at train end.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .schedule import Sparsifier
from .sparsity import threshold_parameters


def give_thresholds_their_lr(optimizer: torch.optim.Optimizer, model: torch.nn.Module, lr: float,
                             scheduler: Any = None, adapter: str = "default") -> None:  # fmt: skip
    """Move θ into its own param group (learning rate ``lr``, no weight decay); before the first step only.

    A scheduler already built is told about the group, which keeps a constant ``lr``: the controller must
    still move θ at the end of a decaying schedule.
    """
    ids = {id(p) for p in threshold_parameters(model, adapter).values()}
    thetas = []
    for group in optimizer.param_groups:
        thetas += [p for p in group["params"] if id(p) in ids]
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    if not thetas:
        return
    optimizer.add_param_group({"params": thetas, "lr": lr, "initial_lr": lr, "weight_decay": 0.0})
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate wraps the torch scheduler
    if hasattr(inner, "base_lrs"):
        inner.base_lrs.append(lr)
    if hasattr(inner, "lr_lambdas"):
        inner.lr_lambdas.append(lambda _: 1.0)


class JumpLoraCallback(TrainerCallback):
    """Drives γ, the θ init and the density controller of a JumpLoRA adapter during ``Trainer.train()``.

    ``trainer = Trainer(model=peft_model, ..., callbacks=[JumpLoraCallback()])``; after training the
    adapter is fully gated (γ = 1), so ``merge_and_unload()`` keeps exactly what the adapter computes.
    ``log_state()`` of the sparsifier (γ, density, target, multiplier) joins the Trainer's logs.
    """

    def __init__(self, adapter: str = "default") -> None:
        self.adapter = adapter
        self.sparsifier: Sparsifier | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: Any = None, lr_scheduler: Any = None,
                       **kwargs: Any) -> None:  # fmt: skip
        if model is None:
            raise ValueError("JumpLoraCallback needs the Trainer's model")
        self.sparsifier = Sparsifier(model, max(1, state.max_steps), self.adapter)
        lr = self.sparsifier.theta_lr
        if lr is not None and optimizer is not None and state.global_step == 0:
            give_thresholds_their_lr(optimizer, model, lr, lr_scheduler, self.adapter)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:  # fmt: skip
        self.sparsifier.before_step(state.global_step)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:  # fmt: skip
        term = self.sparsifier.loss_term()
        if term is not None:
            term.backward()  # θ-only: adds the controller's gradient to θ.grad

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:  # fmt: skip
        self.sparsifier.after_step(state.global_step - 1)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict | None = None, **kwargs: Any) -> None:  # fmt: skip
        if logs is not None and self.sparsifier is not None:
            logs.update({f"jumplora/{k}": v for k, v in self.sparsifier.log_state().items() if v is not None})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:  # fmt: skip
        self.sparsifier.finish()
