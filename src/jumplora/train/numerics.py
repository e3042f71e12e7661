"""Numerical faults: a NaN/inf loss or threshold stops the run, which keeps its last good checkpoint."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from jumplora.adapters import threshold_parameters


class NumericalError(RuntimeError):
    """A NaN/inf loss, threshold or merged update: the run stops and keeps its last good checkpoint."""


def check_loss(loss: torch.Tensor, accelerator: Accelerator, where: str) -> None:
    """Stop on a NaN/inf loss; with several processes, all of them stop (no one hangs in a collective).

    ``where`` names the task and step, e.g. ``task 'cb' (index 0), step 3``."""
    bad = ~torch.isfinite(loss.detach())
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.float().reshape(1), reduction="sum") > 0
    if bool(bad):
        raise NumericalError(
            f"{where}: loss is {loss.item()} (on at least one process); the run directory keeps the last good "
            "checkpoint"
        )


def check_thresholds(model: nn.Module, where: str) -> None:
    """Stop when a threshold group's θ is no longer finite."""
    for group, raw in threshold_parameters(model).items():
        if not torch.isfinite(raw).all():
            raise NumericalError(
                f"{where}: threshold of group {group!r} is {raw.item()}; the run directory keeps the last good "
                "checkpoint"
            )


def task_label(name: str, index: int) -> str:
    """How an error names a task: ``task 'cb' (index 0)``."""
    return f"task {name!r} (index {index})"
