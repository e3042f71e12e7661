"""jumplora: continual learning of language models with sparse JumpLoRA adapters.

The heavy parts (PEFT, Transformers) load on first use, so ``jumplora.data`` and the CLI's
``--help`` stay fast. The JumpLoRA PEFT method is still registered as soon as PEFT is in use: at once if
PEFT is already imported, else by a one-shot import hook the moment PEFT is imported, so
``import jumplora`` then ``peft.PeftModel.from_pretrained(base, dir)`` works.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "ContinualTrainer",
    "JumpLoraCallback",
    "JumpLoraConfig",
    "JumpLoraModel",
    "RunConfig",
    "__version__",
    "merge_and_discard",
]


class _RegisterWithPeft(importlib.abc.MetaPathFinder):
    """Wraps PEFT's loader so that ``jumplora.adapters`` (which registers JUMPLORA) loads right after it."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            import jumplora.adapters  # noqa: F401  (registers the method)

        spec.loader.exec_module = exec_and_register
        return spec


if "peft" in sys.modules:
    import jumplora.adapters  # noqa: F401
elif not any(isinstance(finder, _RegisterWithPeft) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithPeft())


def __getattr__(name: str) -> Any:
    if name in ("JumpLoraConfig", "JumpLoraModel", "merge_and_discard"):
        from jumplora import adapters

        return getattr(adapters, name)
    if name == "ContinualTrainer":
        from jumplora.run.trainer import ContinualTrainer

        return ContinualTrainer
    if name == "JumpLoraCallback":
        from jumplora.adapters.callback import JumpLoraCallback

        return JumpLoraCallback
    if name == "RunConfig":
        from jumplora.config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'jumplora' has no attribute {name!r}")
