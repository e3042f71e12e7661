"""Quantized frozen bases: merged updates kept as an exact float32 sparse residual beside the weight.

A quantized weight (bitsandbytes int8 / nf4, torchao) cannot take ``W += ΔW``: the update is far below
the quantization step, and bitsandbytes int8 even lets the in-place add pass silently while the layer
keeps computing with its unchanged int8 copy. A JumpLoRA update is sparse (a few % of a weight's
entries), so it is kept instead, exactly, as a float32 matrix R on the module (CSR; dense once the
accumulated supports cover half the entries, where that is smaller), and a forward hook adds ``x·Rᵀ``
to the quantized layer's output (autograd flows to ``x``). Later tasks' updates accumulate into R in
float32, so the model computes Q(W) + Σ_t ΔW_t.

Which layers count as quantized (:func:`quantization_kind`): bitsandbytes ``Linear8bitLt`` /
``Linear4bit``, an ``nn.Linear`` whose weight is a torchao tensor subclass, and GPTQ/AWQ layers
(modules with a packed ``qweight``), which are refused as adapter targets: their kernels need CUDA and
are untested here.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RESIDUAL = "jumplora_residual"
#: Bytes per stored entry: CSR (float32 value + int32 column index) against a dense float32 matrix.
CSR_BYTES_PER_ENTRY, DENSE_BYTES_PER_ENTRY = 8, 4
_HOOK = "_jumplora_residual_hook"


def quantization_kind(module: nn.Module) -> str | None:
    """'bnb-int8', 'bnb-4bit', 'torchao' or 'gptq-awq' for a quantized layer; None for a float weight."""
    cls = type(module)
    if cls.__module__.startswith("bitsandbytes"):
        if "8bit" in cls.__name__:
            return "bnb-int8"
        if "4bit" in cls.__name__ or cls.__name__ in ("LinearNF4", "LinearFP4"):
            return "bnb-4bit"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and type(weight.data).__module__.startswith("torchao"):
        return "torchao"
    if hasattr(module, "qweight"):
        return "gptq-awq"
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantization_kind(module) is not None


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The quantized weight as float32 (out, in), without the residual; a float weight as float32."""
    kind = quantization_kind(module)
    weight = module.weight
    if kind == "bnb-int8":  # row-wise absmax int8; the first forward moves CB/SCB to the layer's state
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return weight.data.float() * scales.float()[:, None] / 127.0
    if kind == "bnb-4bit":
        import bitsandbytes.functional as bnbf

        unpack_cpu_repack(module)
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "torchao":
        return weight.dequantize().float()
    if kind == "gptq-awq":
        raise TypeError(f"{type(module).__name__}: GPTQ/AWQ layers are not supported (no dequantisation here)")
    return weight.detach().float()


def residual(module: nn.Module) -> torch.Tensor | None:
    """The module's float32 residual R (out, in; CSR, or dense past density 1/2), or None."""
    return getattr(module, RESIDUAL, None)


def residual_dense(module: nn.Module) -> torch.Tensor | None:
    found = residual(module)
    if found is None:
        return None
    return found if found.layout == torch.strided else found.to_dense()


def effective_weight(module: nn.Module) -> torch.Tensor:
    """What the layer computes with, float32 (out, in): dequantised weight + residual."""
    weight = dequantized_weight(module)
    extra = residual_dense(module)
    return weight if extra is None else weight + extra.to(weight.device)


@torch.no_grad()
def add_to_residual(module: nn.Module, update: torch.Tensor, sign: float = 1.0, check_finite: bool = False) -> None:
    """R += sign·update (float32, (out, in)); the forward hook is added on first use.

    R is stored as CSR while that is smaller than a dense float32 matrix (density below 1/2), densely
    after that (many tasks' supports add up); both hold the same float32 values exactly."""
    shape = (module.out_features, module.in_features)
    if tuple(update.shape) != shape:
        raise ValueError(f"an update of shape {tuple(update.shape)} does not fit a {shape} layer")
    device = next((p.device for p in module.parameters()), update.device)
    total = update.detach().to(device=device, dtype=torch.float32) * sign
    found = residual(module)
    if found is not None:
        total = residual_dense(module).to(device) + total
    if check_finite and not torch.isfinite(total).all():
        raise ValueError("NaNs or infs in the merged residual")
    stored = total
    if CSR_BYTES_PER_ENTRY * int(torch.count_nonzero(total)) < DENSE_BYTES_PER_ENTRY * total.numel():
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are tested
            warnings.simplefilter("ignore", UserWarning)
            stored = _csr32(total.to_sparse_csr())
    if RESIDUAL in module._buffers:
        del module._buffers[RESIDUAL]
    module.register_buffer(RESIDUAL, stored, persistent=False)
    if getattr(module, _HOOK, None) is None:
        setattr(module, _HOOK, module.register_forward_hook(_add_residual))


def _csr32(matrix: torch.Tensor) -> torch.Tensor:
    """The CSR matrix with int32 indices (8 bytes per stored entry with its float32 value, not 12)."""
    return torch.sparse_csr_tensor(
        matrix.crow_indices().int(), matrix.col_indices().int(), matrix.values(), matrix.shape
    )


def _add_residual(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: output + x·Rᵀ, R float32 and sparse (torch.sparse.mm carries the gradient to x)."""
    found = residual(module)
    if found is None or not args:
        return output
    x = args[0]
    if found.layout == torch.strided:
        return output + F.linear(x.to(torch.float32), found).to(output.dtype)
    flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
    extra = torch.sparse.mm(found, flat.t()).t()
    return output + extra.reshape(*x.shape[:-1], -1).to(output.dtype)


def residual_nnz(model: nn.Module) -> dict[str, int]:
    """Stored entries of every residual in ``model`` (module name → nnz), for memory accounting."""
    return {name: int(torch.count_nonzero(residual_dense(m))) for name, m in model.named_modules()
            if residual(m) is not None}  # fmt: skip


# -- bitsandbytes 4-bit on CPU: never let the inference repack stop training --------------------------
def unpack_cpu_repack(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repack of a 4-bit weight (a no-op if it was not repacked)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        if hasattr(module, "quant_state"):
            module.quant_state = weight.quant_state


def disable_cpu_repack(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer trainable on CPU; returns how many layers it touched.

    On a CPU with AVX512-BF16, ``Linear4bit`` repacks its weight for a faster kernel the first time it
    runs in eval mode without gradients (an evaluation). Training through a repacked layer then
    silently stops: gradients no longer reach the adapters below it. Switching the repack off (and
    undoing one that already happened) keeps the ordinary kernel, which trains.
    """
    touched = 0
    for module in model.modules():
        if quantization_kind(module) == "bnb-4bit":
            module.support_avx512bf16_for_cpu = False
            unpack_cpu_repack(module)
            touched += 1
    return touched


@torch.no_grad()
def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized linear layer by an ``nn.Linear`` holding dequant(W) + R (float32).

    The result is a plain float model that computes what the quantized model with its residuals
    computes (up to the quantized kernels' own activation rounding), e.g. for export. Returns how many
    layers were replaced; the transformers quantization markers are removed so the model saves plainly.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_quantized(module) or not name:
            continue
        weight = effective_weight(module)
        bias = getattr(module, "bias", None)
        plain = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=weight.device)
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias.detach().float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
        replaced += 1
    if replaced:
        _drop_quantization_markers(model)
    return replaced


def _drop_quantization_markers(model: nn.Module) -> None:
    """Remove transformers' quantized-model markers, so ``save_pretrained`` writes a plain float model."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
