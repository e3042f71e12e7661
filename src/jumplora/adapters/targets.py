"""Which modules can take an adapter, how their weights are laid out, and checking a target list.

The only architecture facts the rest of the package needs: ``nn.Linear`` and transformers' ``Conv1D``
(GPT-2 & co., weight stored as (in, out)) take adapters; ``all-linear`` is PEFT's shorthand for every
linear layer but the output head.
"""

from __future__ import annotations

from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

ALL_LINEAR = "all-linear"

#: Modules a model_type's adapters go on by default (LoRA's usual query/value choice): PEFT's table, plus
#: the model types it lacks. The one table: the CLI's defaults and ``JumpLoraConfig(target_modules=None)``.
TARGET_MODULES: dict[str, list[str]] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "camembert": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "umt5": ["q", "v"],
    "mbart": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
}


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_is_transposed(module: nn.Module) -> bool:
    """True when ``module.weight`` is stored (in, out) rather than PyTorch's (out, in)."""
    return isinstance(module, Conv1D)


def check_target_modules(model: nn.Module, targets: list[str] | str) -> list[str] | str:
    """The targets as PEFT takes them, after checking each one names a linear layer of ``model``.

    Names match as in PEFT (the full module name or a ``.``-suffix). ``["all-linear"]`` becomes the
    string PEFT expands. Raises ValueError naming the missing or non-linear modules.
    """
    if targets == ALL_LINEAR or list(targets) == [ALL_LINEAR]:
        return ALL_LINEAR
    modules = dict(model.named_modules())

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    missing = [t for t in targets if not any(matches(n, t) for n in modules)]
    if missing:
        examples = ", ".join(n for n in list(modules)[-6:] if n)
        raise ValueError(f"target modules {missing} are not modules of the model; e.g. {examples}")
    for name, module in modules.items():
        if any(matches(name, t) for t in targets) and not is_adaptable(module):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}; adapters go on linear layers only "
                "(nn.Linear, GPT-2's Conv1D)"
            )
    return list(targets)
