"""Continual-learning strategies: one file each, registered by name, called at the run's hooks.

Built-ins: ``inclora``, ``seqlora``, ``ella``, ``olora`` and ``replay`` (Experience Replay). Add one with
``@register_strategy("name")`` on a ``Strategy`` dataclass; docs/EXTENDING.md shows how.
"""

from . import inclora, seqlora, ella, olora, replay  # noqa: F401, I001  (registers the built-ins in this order)
from .base import (
    LayerView,
    Strategy,
    StrategyContext,
    jumplora_layers,
    make_strategy,
    register_strategy,
    strategy_help,
    strategy_names,
    strip_prefix,
)
from .ella import ELLA
from .inclora import IncLoRA
from .olora import OLoRA
from .replay import ExperienceReplay
from .seqlora import SeqLoRA

__all__ = [
    "ELLA",
    "ExperienceReplay",
    "IncLoRA",
    "LayerView",
    "OLoRA",
    "SeqLoRA",
    "Strategy",
    "StrategyContext",
    "jumplora_layers",
    "make_strategy",
    "register_strategy",
    "strategy_help",
    "strategy_names",
    "strip_prefix",
]
