"""jumplora: continual learning of language models with sparse JumpLoRA adapters.

The heavy parts (PEFT, Transformers) load on first use, so ``jumplora.data`` and the CLI's
``--help`` stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ContinualTrainer", "JumpLoraConfig", "JumpLoraModel", "RunConfig", "__version__", "merge_and_discard"]


def __getattr__(name: str) -> Any:
    if name in ("JumpLoraConfig", "JumpLoraModel", "merge_and_discard"):
        from jumplora import adapters

        return getattr(adapters, name)
    if name == "ContinualTrainer":
        from jumplora.runners import ContinualTrainer

        return ContinualTrainer
    if name == "RunConfig":
        from jumplora.config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'jumplora' has no attribute {name!r}")
