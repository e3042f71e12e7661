"""``--quantize``: load the frozen base quantized (bitsandbytes int8 / nf4, torchao int8 weight-only).

The quantization itself is transformers' (``from_pretrained(quantization_config=...)``); the packages are
the optional extra ``jumplora[quant]``. Adapters train on top in float32, and every merged task update is
kept beside the quantized weights as an exact float32 sparse residual (``jumplora.adapters.residual``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from jumplora.config import QUANTIZE_CHOICES

from .sources import ModelLoadError

_PACKAGE = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "torchao-int8": "torchao"}


def require_package(kind: str) -> None:
    """One clear error when the package a quantization needs is missing."""
    package = _PACKAGE[kind]
    if importlib.util.find_spec(package) is None:
        raise ModelLoadError(
            f"--quantize {kind} needs the {package} package, which is not installed: pip install 'jumplora[quant]'"
        )


def quantization_config(kind: str, compute_dtype: torch.dtype = torch.float32) -> Any | None:
    """The transformers quantization config of a ``--quantize`` value (None for 'none')."""
    if kind not in QUANTIZE_CHOICES:
        raise ModelLoadError(f"--quantize {kind!r}: expected one of {', '.join(QUANTIZE_CHOICES)}")
    if kind == "none":
        return None
    require_package(kind)
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())
