"""A merged task update as tensors: pack it for safetensors, and apply (or remove) it on a model.

An update is keyed by base-model module name, in (out_features, in_features) layout whatever the
module stores, already scaled (s·ΔW⊙mask). Sparse updates keep the mask and the kept values only
(``<module>::mask`` + ``<module>::values``); one whose every entry is kept is stored whole
(``<module>::dense``).
"""

from __future__ import annotations

import torch
from torch import nn

from .residual import add_to_residual, is_quantized
from .sharded import add_to_weight, full_shape
from .targets import weight_is_transposed


def pack_update(updates: dict[str, torch.Tensor], supports: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, update in updates.items():
        mask = supports[name]
        if mask.all():
            tensors[f"{name}::dense"] = update.float().contiguous()
        else:
            tensors[f"{name}::mask"] = mask.contiguous()
            tensors[f"{name}::values"] = update[mask].float().contiguous()
    return tensors


def unpack_update(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name → dense float32 update (out, in). Raises ValueError on an inconsistent file."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted({key.split("::")[0] for key in tensors}):
        if f"{name}::dense" in tensors:
            out[name] = tensors[f"{name}::dense"].float()
            continue
        mask, values = tensors.get(f"{name}::mask"), tensors.get(f"{name}::values")
        if mask is None or values is None or mask.dtype != torch.bool or values.numel() != int(mask.sum()):
            raise ValueError(f"update of module {name!r} is inconsistent (mask and values do not match)")
        update = torch.zeros(mask.shape, dtype=torch.float32)
        update[mask] = values.float()
        out[name] = update
    return out


@torch.no_grad()
def apply_update(model: nn.Module, tensors: dict[str, torch.Tensor], sign: float = 1.0) -> None:
    """W += sign · update for every module the packed update names (sign −1 removes it).

    A quantized layer keeps the update in its float32 residual instead (``residual.add_to_residual``),
    in the same order, so replaying a run's updates rebuilds the residuals exactly."""
    modules = dict(model.named_modules())
    for name, update in unpack_update(tensors).items():
        if name not in modules:
            raise ValueError(f"the update names module {name!r}, which the model does not have")
        if is_quantized(modules[name]):
            add_to_residual(modules[name], update, sign=sign)
            continue
        weight = modules[name].weight
        if weight_is_transposed(modules[name]):
            update = update.t()
        if tuple(update.shape) != full_shape(weight):
            raise ValueError(f"the update of {name!r} has shape {tuple(update.shape)}, the weight {full_shape(weight)}")
        add_to_weight(weight, update, alpha=sign)
