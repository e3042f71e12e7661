"""θ's own optimizer param group: for a hand-written loop (:func:`param_groups`) and for a ``Trainer``.

θ needs its own learning rate (a density controller moves log θ by about ``controller_theta_lr`` per
step, whatever the task's lr) and no weight decay (decay would pull θ, hence the density, down).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .schedule import theta_learning_rate
from .sparsity import threshold_parameters


def param_groups(model: nn.Module, lr: float, theta_lr: float | None = None, weight_decay: float = 0.0,
                 adapter: str = "default") -> list[dict[str, Any]]:  # fmt: skip
    """Optimizer groups for a JumpLoRA model: trainable weights at ``lr``, θ alone without weight decay.

    ``theta_lr`` defaults to the adapter's ``controller_theta_lr`` under a density controller, else
    ``lr``: ``torch.optim.AdamW(param_groups(model, lr=1e-3), lr=1e-3)``.
    """
    theta_ids = {id(p) for p in threshold_parameters(model, adapter).values()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in theta_ids], "lr": lr, "weight_decay": weight_decay}]
    thetas = [p for p in trainable if id(p) in theta_ids]
    if thetas:
        lr_theta = theta_lr if theta_lr is not None else theta_learning_rate(model, adapter) or lr
        groups.append({"params": thetas, "lr": lr_theta, "weight_decay": 0.0})
    return groups


class ThetaGroup:
    """Moves θ of an optimizer someone else built (a ``Trainer``'s) into its own group, in a resumable way.

    The optimizer's ``state_dict()`` is written in the layout it was built with (θ back in its original
    group and position), so a ``Trainer`` resuming from a checkpoint loads it into its freshly built
    optimizer, and :meth:`attach` then moves θ, whose Adam moments came with it, into its group again.
    A scheduler already built is told about the group, which keeps a constant ``lr``: the controller
    must still move θ at the end of a decaying schedule.
    """

    def __init__(self, optimizer: Any, model: nn.Module, lr: float, scheduler: Any = None,
                 adapter: str = "default") -> None:  # fmt: skip
        self.optimizer: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps it
        self.theta_ids = {id(p) for p in threshold_parameters(model, adapter).values()}
        self.built_layout = [list(group["params"]) for group in self.optimizer.param_groups]
        self.lr = lr
        self.scheduler = getattr(scheduler, "scheduler", scheduler)

    def attach(self) -> bool:
        """Move θ into a new last group; False (nothing changed) when the optimizer does not hold θ."""
        thetas = []
        for group in self.optimizer.param_groups:
            thetas += [p for p in group["params"] if id(p) in self.theta_ids]
            group["params"] = [p for p in group["params"] if id(p) not in self.theta_ids]
        if not thetas:
            return False
        self.optimizer.add_param_group({"params": thetas, "lr": self.lr, "initial_lr": self.lr, "weight_decay": 0.0})
        built = len(self.built_layout)
        if hasattr(self.scheduler, "base_lrs"):  # a resumed scheduler's state may already list the θ group
            self.scheduler.base_lrs = [*self.scheduler.base_lrs[:built], self.lr]
        if hasattr(self.scheduler, "lr_lambdas"):
            self.scheduler.lr_lambdas = [*self.scheduler.lr_lambdas[:built], _constant]
        self.optimizer.register_state_dict_post_hook(self._as_built)
        return True

    def _as_built(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        """The state dict in the built layout: parameter indexes renumbered, the θ group's entry dropped."""
        now = [p for group in optimizer.param_groups for p in group["params"]]
        index_now = {id(p): i for i, p in enumerate(now)}
        index_built = {id(p): i for i, p in enumerate(p for params in self.built_layout for p in params)}
        groups = [
            {**state["param_groups"][k], "params": [index_built[id(p)] for p in params]}
            for k, params in enumerate(self.built_layout)
        ]
        saved = state["state"]
        moments = {index_built[id(p)]: saved[index_now[id(p)]] for p in now if index_now[id(p)] in saved}
        return {"state": moments, "param_groups": groups}


def _constant(_: int) -> float:
    return 1.0
