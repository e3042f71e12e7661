"""Capture and restore what a mid-task checkpoint needs: adapter, optimizer, scheduler and RNG states.

Everything becomes (JSON-able dict, tensors) so the run directory stores it with safetensors and JSON
only; nothing is pickled.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn


def _adapter_parameters(model: nn.Module, kinds: tuple[str, ...] | None = None) -> dict[str, nn.Parameter]:
    """``model``'s parameters that its JumpLoRA layers hold as adapter weights, by parameter name.

    The layers say which they are (``adapter_layer_names``: A, B, θ); ``kinds`` narrows to some of them."""
    from jumplora.adapters import JumpLoraLayer

    owned = {
        id(p)
        for module in model.modules()
        if isinstance(module, JumpLoraLayer)
        for kind in module.adapter_layer_names
        if kinds is None or kind in kinds
        for p in getattr(module, kind).parameters()
    }
    return {name: p for name, p in model.named_parameters() if id(p) in owned}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every JumpLoRA parameter of ``model`` (A, B, θ), by parameter name."""
    return {name: p.detach() for name, p in _adapter_parameters(model).items()}


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    params = _adapter_parameters(model)
    thetas = set(_adapter_parameters(model, ("jumplora_theta",)))
    if set(params) != set(tensors):
        different = sorted(set(params) ^ set(tensors))[:3]
        raise ValueError(f"{source}: adapter tensors do not match the model (e.g. {different})")
    with torch.no_grad():
        for name, p in params.items():
            if name in thetas and tensors[name].dim() == 0:  # saved before θ became 1-D
                tensors = {**tensors, name: tensors[name].reshape(1)}
            if tensors[name].shape != p.shape:
                raise ValueError(
                    f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))


def capture(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """Adapter, optimizer, scheduler and RNG states as (JSON-able dict, tensors)."""
    tensors = {f"adapter.{k}": v for k, v in adapter_tensors(model).items()}
    opt = optimizer.state_dict()
    opt_keys: dict[str, dict[str, Any]] = {}
    for idx, slots in opt["state"].items():
        opt_keys[str(idx)] = {}
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value
                opt_keys[str(idx)][key] = None
            else:
                opt_keys[str(idx)][key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for k, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{k}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_state = random.getstate()
    meta = {
        "optimizer": {"param_groups": opt["param_groups"], "state": opt_keys},
        "scheduler": scheduler.state_dict(),
        "rng": {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        },
    }
    return meta, tensors


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, meta: dict, tensors: dict) -> None:
    """Inverse of :func:`capture` except the RNG states (see :func:`restore_rng`)."""
    adapter = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    load_adapter_tensors(model, adapter, "mid-task checkpoint")
    state: dict[int, dict[str, Any]] = {}
    for idx, slots in meta["optimizer"]["state"].items():
        state[int(idx)] = {key: tensors[f"opt.{idx}.{key}"] if value is None else value for key, value in slots.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(dict(meta["scheduler"]))


def restore_rng(meta: dict, tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["rng"]["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
