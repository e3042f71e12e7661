"""A dense run's task update as the plain PEFT LoRA adapter it is.

A dense task's update is ΔW = s·B·A, of rank ≤ r, but the run keeps only the product (``::dense``, what
the merge added). Its thin SVD gives the LoRA factors back (B' = U·√S, A' = √S·Vᵀ, at most r columns;
scale 1): r·(d_in + d_out) numbers per module instead of the d_in·d_out of the dense matrix (or of a
SHiRA adapter holding every entry). The factorisation is exact up to float32 rounding of the product.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Singular values below this fraction of a module's largest are rounding noise of the float32 product.
RANK_TOLERANCE = 1e-5


def is_dense_update(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when every module of the update is a full matrix (a dense LoRA run's merged update)."""
    keys = [k for k in tensors if "::" in k]
    return bool(keys) and all(k.endswith("::dense") for k in keys)


def lora_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = ``delta`` to float32 rounding; as many columns as its numerical rank (≥ 1)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = max(1, int((s > s[0] * RANK_TOLERANCE).sum())) if s.numel() and s[0] > 0 else 1
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def write_lora_adapter(base: nn.Module, tensors: Mapping[str, torch.Tensor], folder: Path,
                       base_id: str) -> dict[str, Any] | str:  # fmt: skip
    """Save the dense update as a PEFT LoRA adapter in ``folder``; its description, or why it cannot be."""
    from peft import LoraConfig, get_peft_model

    from jumplora.cards import fix_adapter_card

    modules = dict(base.named_modules())
    names = sorted(k.removesuffix("::dense") for k in tensors if k.endswith("::dense"))
    bad = [n for n in names if type(modules.get(n)) is not nn.Linear]
    if bad:
        return f"LoRA export supports nn.Linear only, not {type(modules.get(bad[0])).__name__} ({bad[0]})"
    factors = {n: lora_factors(tensors[f"{n}::dense"]) for n in names}
    r = max(b.shape[1] for b, _ in factors.values())
    config = LoraConfig(r=r, lora_alpha=r, target_modules=names, init_lora_weights=False, inference_mode=True)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    for name, (b, a) in factors.items():
        layer = peft_model.base_model.model.get_submodule(name)
        weight_b, weight_a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        with torch.no_grad():  # zero-padded to the shared r: the extra rank-1 terms are 0
            weight_b.zero_()[:, : b.shape[1]] = b.to(weight_b)
            weight_a.zero_()[: a.shape[0]] = a.to(weight_a)
    peft_model.peft_config["default"].base_model_name_or_path = base_id
    peft_model.save_pretrained(folder)
    fix_adapter_card(folder, base_id, tags=["jumplora"])
    return {"type": "LORA", "r": r, "ranks": {n: b.shape[1] for n, (b, _) in factors.items()}}
