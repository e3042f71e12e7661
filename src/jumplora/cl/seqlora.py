"""SeqLoRA: one adapter trained on task after task, the naive sequential fine-tuning baseline."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Strategy, register_strategy


@register_strategy("seqlora")
@dataclass
class SeqLoRA(Strategy):
    """One adapter trained on task after task (sequential fine-tuning), merged after the last task."""

    adapter_lifecycle = "shared"
