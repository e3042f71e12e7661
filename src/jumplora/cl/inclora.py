"""IncLoRA: a new adapter per task; the earlier ones are merged into W, which freezes them."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Strategy, register_strategy


@register_strategy("inclora")
@dataclass
class IncLoRA(Strategy):
    """A fresh adapter per task, merged into W at the task's end; no extra loss."""
