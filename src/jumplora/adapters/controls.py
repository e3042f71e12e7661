"""Merges that isolate what a sparse update's support does (the controls of the mechanism study).

JumpLoRA keeps the entries |ΔW| > θ of an update trained under a γ ramp and a learned θ. Each control
here trains the update densely (no ramp, no θ) and changes only what the task's end merges, at a density
chosen like JumpLoRA's (``target_density``, else the LoRA budget r·(d_in+d_out) of each threshold group):

- ``random``: a uniformly random support of exactly that many entries per group (does *which* entries
  matter?);
- ``posthoc-topk``: the largest-|ΔW| entries, exactly that many per group (does the ramp / learned θ
  matter?);
- norm matching: the whole dense update, scaled per module to the Frobenius norm of its top-k part (is
  the gain only a smaller update?).
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import JumpLoraLayer
from .sparsity import MergeResult, _layers_with

#: How the task's end chooses the entries it merges: the gate |ΔW| > θ, or a control.


def _groups(model: nn.Module, adapter: str) -> dict[str, list[tuple[str, JumpLoraLayer]]]:
    groups: dict[str, list[tuple[str, JumpLoraLayer]]] = {}
    for name, layer in _layers_with(model, adapter):
        groups.setdefault(layer.threshold_group[adapter], []).append((name, layer))
    return groups


def entries_to_keep(layers: list[JumpLoraLayer], adapter: str, density: float | None) -> int:
    """round(density · entries), or the LoRA budget Σ r·(d_in + d_out) when ``density`` is None."""
    entries = sum(layer.in_features * layer.out_features for layer in layers)
    if density is None:
        return min(entries, sum(layer.r[adapter] * (layer.in_features + layer.out_features) for layer in layers))
    return round(density * entries)


def _split(flat: torch.Tensor, layers: list[tuple[str, JumpLoraLayer]]) -> dict[str, torch.Tensor]:
    sizes = [layer.out_features * layer.in_features for _, layer in layers]
    return {
        name: part.reshape(layer.out_features, layer.in_features)
        for (name, layer), part in zip(layers, flat.split(sizes), strict=True)
    }


@torch.no_grad()
def topk_masks(model: nn.Module, density: float | None, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Per module (out, in) boolean masks keeping exactly the k largest |ΔW| entries of each group (CPU)."""
    masks: dict[str, torch.Tensor] = {}
    for layers in _groups(model, adapter).values():
        magnitudes = torch.cat([layer.delta_weight(adapter).abs().float().flatten().cpu() for _, layer in layers])
        keep = entries_to_keep([layer for _, layer in layers], adapter, density)
        flat = torch.zeros_like(magnitudes, dtype=torch.bool)
        flat[torch.topk(magnitudes, keep).indices] = True
        masks |= _split(flat, layers)
    return masks


@torch.no_grad()
def random_masks(
    model: nn.Module, density: float | None, generator: torch.Generator, adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """Per module (out, in) boolean masks keeping exactly k uniformly drawn entries of each group (CPU)."""
    masks: dict[str, torch.Tensor] = {}
    for layers in _groups(model, adapter).values():
        entries = sum(layer.in_features * layer.out_features for _, layer in layers)
        keep = entries_to_keep([layer for _, layer in layers], adapter, density)
        flat = torch.zeros(entries, dtype=torch.bool)
        flat[torch.randperm(entries, generator=generator)[:keep]] = True
        masks |= _split(flat, layers)
    return masks


@torch.no_grad()
def norm_match_scales(model: nn.Module, masks: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, float]:
    """Per module ‖ΔW ⊙ M‖_F / ‖ΔW‖_F: the factor that gives the dense update the masked one's norm."""
    scales = {}
    for name, layer in _layers_with(model, adapter):
        delta = layer.delta_weight(adapter).float().cpu()
        full = float(delta.norm())
        scales[name] = float((delta * masks[name]).norm()) / full if full > 0 else 0.0
    return scales


@torch.no_grad()
def merge_controlled(
    peft_model: nn.Module,
    masks: dict[str, torch.Tensor],
    scales: dict[str, float] | None = None,
    adapter: str = "default",
) -> MergeResult:
    """Add s·(ΔW ⊙ M) (or, with ``scales``, the dense s·c·ΔW) into the base weights and drop the adapter.

    Returns the plain model, the support of what was merged and each merged update ((out, in), CPU, float32),
    like :func:`jumplora.adapters.merge_and_discard`.
    """
    supports, updates = {}, {}
    for name, layer in _layers_with(peft_model, adapter):
        delta = layer.delta_weight(adapter).float().cpu() * layer.scaling[adapter]
        if scales is None:
            supports[name], update = masks[name].clone(), delta * masks[name]
        else:
            supports[name], update = torch.ones_like(delta, dtype=torch.bool), delta * scales[name]
        updates[name] = update
        weight = layer.get_base_layer().weight
        weight.data += (update.t() if layer._fan_in_fan_out else update).to(weight.device, weight.dtype)
    if not hasattr(peft_model, "unload"):
        raise TypeError("merge_controlled needs a PeftModel (or PEFT tuner) with unload()")
    return MergeResult(model=peft_model.unload(), supports=supports, updates=updates)
