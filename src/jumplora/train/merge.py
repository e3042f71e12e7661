"""A task's end: merge its update into the base weights (gated, or a control's mask) and check its size."""

from __future__ import annotations

import math

import torch
from torch import nn

from jumplora.adapters import (
    MergeResult,
    merge_and_discard,
    merge_controlled,
    norm_match_scales,
    random_masks,
    topk_masks,
)
from jumplora.adapters.residual import effective_weight
from jumplora.adapters.targets import weight_is_transposed
from jumplora.config import AdapterConfig
from jumplora.metrics import density
from jumplora.train.numerics import NumericalError

#: A merged update larger than this many times the base weight's largest entry is a divergence.
DIVERGENCE_FACTOR = 1e3


def merge_task(peft_model: nn.Module, adapter: AdapterConfig, *, seed: int, sharded: bool, label: str) -> MergeResult:
    """Merge the task's update into the base weights; a diverged update is a numerical fault.

    ``seed``: the task's seed (a random control's support); ``label`` names the task in errors."""
    if adapter.control:
        merged = _controlled_merge(peft_model, adapter, seed)
    else:
        merged = merge_and_discard(peft_model, keep_updates=True)
    if sharded and adapter.sparse and density(merged.supports) == 0.0:
        raise NumericalError(  # θ above every |ΔW|: a run that merges nothing must not exit 0
            f"{label}: the sharded merge kept no entry of the update (θ above every |ΔW|)"
        )
    for name, (largest, scale) in _update_sizes(merged).items():
        if not math.isfinite(largest) or largest > DIVERGENCE_FACTOR * max(scale, 1e-12):
            raise NumericalError(
                f"{label}: the merged update of {name} has max |ΔW| = {largest:.3g} against max |W| = "
                f"{scale:.3g} (diverged; lower --lr)"
            )
    return merged


def _update_sizes(merged: MergeResult) -> dict[str, tuple[float, float]]:
    """Module → (max |merged update|, max |W| before the merge); a sharded merge measured them itself."""
    if merged.sizes is not None:
        return merged.sizes
    modules, sizes = dict(merged.model.named_modules()), {}
    for name, update in merged.updates.items():
        weight = effective_weight(modules[name]).cpu()  # a quantized layer's: dequantised + residual
        base = weight - (update.t() if weight_is_transposed(modules[name]) else update)
        sizes[name] = (float(update.abs().max()), float(base.abs().max()))
    return sizes


def _controlled_merge(peft_model: nn.Module, adapter: AdapterConfig, seed: int) -> MergeResult:
    """A control's merge of the densely trained update (random / top-k support, or norm-matched)."""
    if adapter.merge_mask == "random":
        generator = torch.Generator().manual_seed(seed)
        return merge_controlled(peft_model, random_masks(peft_model, adapter.target_density, generator))
    masks = topk_masks(peft_model, adapter.target_density)
    scales = norm_match_scales(peft_model, masks) if adapter.norm_match else None
    return merge_controlled(peft_model, masks, scales)
