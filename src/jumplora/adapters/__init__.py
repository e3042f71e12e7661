"""JumpLoRA adapters: the gate, the layer, and their registration as a PEFT method.

Importing this package registers ``JUMPLORA`` with PEFT, so ``get_peft_model``,
``save_pretrained``/``PeftModel.from_pretrained`` and ``merge_and_unload`` work as for LoRA.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from ..adapter_fields import MERGE_MASKS
from .config import JumpLoraConfig
from .controls import merge_controlled, norm_match_scales, random_masks, topk_masks
from .jumprelu import jumprelu, rectangle, threshold_grad
from .layer import JumpLoraLayer, Linear
from .model import JumpLoraModel, block_name
from .optim import param_groups
from .peft_type import JUMPLORA
from .schedule import Sparsifier, SparsitySchedule, theta_learning_rate
from .sparsity import (
    MergeResult,
    init_thresholds_to_budget,
    jumplora_layers,
    merge_and_discard,
    set_gamma,
    sparsity_stats,
    supports,
    threshold_parameters,
    threshold_values,
)

if JUMPLORA not in PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(
        name="jumplora", config_cls=JumpLoraConfig, model_cls=JumpLoraModel, prefix="jumplora_"
    )

__all__ = [
    "JUMPLORA",
    "MERGE_MASKS",
    "JumpLoraConfig",
    "JumpLoraLayer",
    "JumpLoraModel",
    "Linear",
    "MergeResult",
    "Sparsifier",
    "SparsitySchedule",
    "block_name",
    "init_thresholds_to_budget",
    "jumplora_layers",
    "jumprelu",
    "merge_and_discard",
    "merge_controlled",
    "norm_match_scales",
    "param_groups",
    "random_masks",
    "rectangle",
    "set_gamma",
    "sparsity_stats",
    "supports",
    "theta_learning_rate",
    "threshold_grad",
    "threshold_parameters",
    "threshold_values",
    "topk_masks",
]
