"""Model-level operations on JumpLoRA layers: γ schedule, budget-matched θ init, supports, merge.

These work on any module tree that contains JumpLoRA layers (a ``PeftModel``, the tuner, or a
DDP-wrapped model), so the training engine never needs to know how PEFT nests things.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import sharded
from .layer import JumpLoraLayer
from .model import check_fully_gated

_WRAPPER_PREFIXES = ("module.", "base_model.model.", "_orig_mod.")


def _clean_name(name: str) -> str:
    """Module name as in the bare base model (no PEFT / DDP / compile prefixes)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def jumplora_layers(model: nn.Module) -> Iterator[tuple[str, JumpLoraLayer]]:
    """Yield (base-model module name, layer) for every JumpLoRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, JumpLoraLayer):
            yield _clean_name(name), module


def _layers_with(model: nn.Module, adapter: str) -> list[tuple[str, JumpLoraLayer]]:
    layers = [(n, m) for n, m in jumplora_layers(model) if adapter in m.jumplora_A]
    if not layers:
        raise ValueError(f"the model has no JumpLoRA layers with adapter {adapter!r}")
    return layers


def set_gamma(model: nn.Module, gamma: float, adapter: str = "default") -> None:
    """Set the dense→sparse interpolation factor γ on every layer (ignored by dense adapters)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    for _, layer in _layers_with(model, adapter):
        if layer.sparse[adapter]:
            layer.gamma[adapter] = float(gamma)
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict) and adapter in config:
        config[adapter].gamma = float(gamma)


def threshold_parameters(model: nn.Module, adapter: str = "default") -> dict[str, nn.Parameter]:
    """The raw θ parameter of each threshold group."""
    return {
        layer.threshold_group[adapter]: layer.jumplora_theta[adapter]
        for _, layer in _layers_with(model, adapter)
    }


def threshold_values(model: nn.Module, adapter: str = "default") -> dict[str, float]:
    """θ of each threshold group, as floats (for logs and results)."""
    out: dict[str, float] = {}
    for _, layer in _layers_with(model, adapter):
        group = layer.threshold_group[adapter]
        if group not in out:
            out[group] = float(layer.theta(adapter).detach())
    return out


def _threshold_keeping(magnitudes: torch.Tensor, keep: int) -> float:
    """A θ with exactly ``keep`` entries of ``magnitudes`` strictly above it (ties aside)."""
    n = magnitudes.numel()
    if keep >= n:
        return 0.0
    if keep <= 0:
        return float(magnitudes.max())
    largest_dropped = torch.kthvalue(magnitudes, n - keep).values
    smallest_kept = torch.kthvalue(magnitudes, n - keep + 1).values
    return float((largest_dropped + smallest_kept) / 2)


@torch.no_grad()
def init_thresholds_to_budget(
    model: nn.Module, adapter: str = "default", target_density: float | None = None
) -> dict[str, float]:
    """Re-initialise θ of each group to keep the LoRA parameter budget Σ r·(d_in + d_out) entries.

    With ``target_density`` the group keeps that fraction of its entries instead. Returns the new θ
    per group. For the log parametrisation a θ of 0 (keep everything) is stored as the smallest
    positive float32, which keeps every non-zero entry.
    """
    sharded.reshard(model)
    groups: dict[str, list[JumpLoraLayer]] = {}
    for _, layer in _layers_with(model, adapter):
        if layer.sparse[adapter]:
            groups.setdefault(layer.threshold_group[adapter], []).append(layer)
    new_values: dict[str, float] = {}
    for group, layers in groups.items():
        total = sum(layer.in_features * layer.out_features for layer in layers)
        if target_density is None:
            keep = sum(layer.r[adapter] * (layer.in_features + layer.out_features) for layer in layers)
        else:
            keep = round(target_density * total)
        if sharded.is_sharded(layers[0]):  # each process its rows of ΔW; a global select, nothing gathered
            chunks = [sharded.local_delta(layer, adapter).abs() for layer in layers]
            theta = sharded.threshold_keeping(chunks, keep, total, sharded.group_of(layers))
        else:
            magnitudes = torch.cat([layer.delta_weight(adapter).abs().float().flatten() for layer in layers])
            theta = _threshold_keeping(magnitudes, keep)
        layer = layers[0]
        raw = layer.jumplora_theta[adapter]
        if layer.threshold_param[adapter] == "log":
            raw.fill_(torch.tensor(max(theta, torch.finfo(torch.float32).tiny)).log())
        else:
            raw.fill_(theta)
        new_values[group] = theta
    return new_values


def supports(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Boolean support |ΔW| > θ of each module's update (what the merge keeps), on the CPU."""
    return {name: layer.support(adapter).cpu() for name, layer in _layers_with(model, adapter)}


@torch.no_grad()
def sparsity_stats(model: nn.Module, adapter: str = "default") -> tuple[float, dict[str, float]]:
    """(overall density, density per module) of the gated update at the current θ."""
    kept = total = 0
    per_module: dict[str, float] = {}
    for name, layer in _layers_with(model, adapter):
        mask = layer.support(adapter)
        per_module[name] = float(mask.float().mean())
        kept += int(mask.sum())
        total += mask.numel()
    return (kept / total if total else 0.0), per_module


@dataclass
class MergeResult:
    """What an end-of-task merge leaves: the plain model and the support of each merged update."""

    model: nn.Module
    supports: dict[str, torch.Tensor]
    updates: dict[str, torch.Tensor]
    #: Sharded merges only: module → (max |merged update|, max |W| before it), over all processes.
    sizes: dict[str, tuple[float, float]] | None = None


@torch.no_grad()
def merge_and_discard(
    peft_model: nn.Module, adapter: str = "default", keep_updates: bool = False, force: bool = False
) -> MergeResult:
    """Merge s·(ΔW ⊙ 1[|ΔW|>θ]) into the base weights and drop the adapter (plain ``nn.Linear`` again).

    ``keep_updates`` also returns each merged update ((out, in) layout like the supports, CPU, float32), which
    strategies such as ELLA accumulate. A sparse adapter must be fully gated (γ = 1, θ initialised, as
    ``Sparsifier.finish()`` leaves it) unless ``force``.
    """
    sharded.reshard(peft_model)
    layers = _layers_with(peft_model, adapter)
    masks = {name: layer.support(adapter).cpu() for name, layer in layers}
    updates = {}
    if keep_updates:
        for name, layer in layers:
            update = layer.get_delta_weight(adapter).float().cpu()
            updates[name] = update.t() if layer._fan_in_fan_out else update
    if not hasattr(peft_model, "merge_and_unload"):
        raise TypeError("merge_and_discard needs a PeftModel (or PEFT tuner) with merge_and_unload()")
    if sharded.is_sharded(layers[0][1]):  # each process merges into its own rows of W
        check_fully_gated(peft_model, [adapter], force)
        sizes = sharded.merge_in_place(layers, adapter)
        return MergeResult(model=peft_model.unload(), supports=masks, updates=updates, sizes=sizes)
    base = peft_model.merge_and_unload(adapter_names=[adapter], force=force)
    return MergeResult(model=base, supports=masks, updates=updates)
