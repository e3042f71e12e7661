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
from transformers.trainer_callback import ExportableState

from .optim import ThetaGroup
from .schedule import Sparsifier


class JumpLoraCallback(TrainerCallback, ExportableState):
    """Drives γ, the θ init and the density controller of a JumpLoRA adapter during ``Trainer.train()``.

    ``trainer = Trainer(model=peft_model, ..., callbacks=[JumpLoraCallback()])``; after training the
    adapter is fully gated (γ = 1), so ``merge_and_unload()`` keeps exactly what the adapter computes.
    ``log_state()`` of the sparsifier (γ, density, target, multiplier) joins the Trainer's logs.
    ``trainer.train(resume_from_checkpoint=...)`` continues where the checkpoint left off: the
    sparsifier's state is saved in the checkpoint's ``trainer_state.json`` (``stateful_callbacks``) and
    the optimizer's in the layout the Trainer builds (see :class:`~jumplora.adapters.optim.ThetaGroup`).
    """

    def __init__(self, adapter: str = "default") -> None:
        self.adapter = adapter
        self.sparsifier: Sparsifier | None = None

    def state(self) -> dict:
        """What a Trainer checkpoint keeps of this callback (JSON): the sparsifier's state."""
        saved = self.sparsifier.state_dict() if self.sparsifier is not None else None
        return {"args": {"adapter": self.adapter}, "attributes": {"sparsifier_state": saved}}

    def _saved_state(self, state: TrainerState) -> dict | None:
        """The sparsifier state a resumed Trainer read from its checkpoint (whatever
        ``restore_callback_states_from_checkpoint`` says), None on a fresh start."""
        if state.global_step == 0:
            return None
        saved = state.stateful_callbacks.get(type(self).__name__)
        for entry in saved if isinstance(saved, list) else [saved] if saved else []:
            if entry.get("args", {}).get("adapter", "default") == self.adapter:
                return entry.get("attributes", {}).get("sparsifier_state")
        return None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: Any = None, lr_scheduler: Any = None,
                       **kwargs: Any) -> None:  # fmt: skip
        if model is None:
            raise ValueError("JumpLoraCallback needs the Trainer's model")
        self.sparsifier = Sparsifier(model, max(1, state.max_steps), self.adapter)
        saved = self._saved_state(state)
        if saved is not None:
            self.sparsifier.load_state_dict(saved)
        elif state.global_step > 0:
            raise ValueError(
                f"JumpLoraCallback: the checkpoint at step {state.global_step} holds no JumpLoRA state for "
                f"adapter {self.adapter!r} (was it trained with JumpLoraCallback?)"
            )
        lr = self.sparsifier.theta_lr
        if lr is not None and optimizer is not None:
            ThetaGroup(optimizer, model, lr, lr_scheduler, self.adapter).attach()

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
