"""Sharded training: which backend a run asked for, and sharding the base model (FSDP2 or DeepSpeed ZeRO-3)
or the adapter's optimizer (DeepSpeed ZeRO-1/2).

A run shards when ``--shard fsdp2`` is given, or when it is started by ``accelerate launch`` with an
FSDP config of ``fsdp_version: 2`` (the ecosystem's way; Accelerate passes it on through environment
variables). Either way jumplora shards the base model itself with ``fully_shard`` — one unit per
transformer block (the model's ``_no_split_modules``, as Accelerate's auto-wrap picks them) plus the
root — because Accelerate's FSDP plugin only shards on an accelerator and would silently run DDP on a
CPU. The adapter (A, B, θ) stays replicated and its gradients are averaged by the training loop (jumplora.train.loop).

``--shard zero3``, or ``accelerate launch --use_deepspeed --zero_stage 3``, partitions the base model with
DeepSpeed ZeRO-3 instead (:mod:`jumplora.sharding_zero`, which imports DeepSpeed only then); as with FSDP,
the launcher's request is hidden from the Accelerator and jumplora partitions the base itself.

``--shard zero1|zero2``, or ``accelerate launch --use_deepspeed --zero_stage 1|2``, leave the base model whole
on every process (those stages partition optimizer state and gradients, and only the adapter has any):
each task's adapter trains through DeepSpeed's ZeRO stage-1/2 optimizer (``sharding_zero.AdapterZero``),
which partitions its AdamW state (and, at stage 2, its gradients) over the processes. The Accelerator is
again built without the launcher's request (its DeepSpeed plugin would prepare the model itself).

Whatever jumplora cannot run as asked is refused with one error (exit 2), never run as something else:
FSDP1, ZeRO stage 0, launcher DeepSpeed settings it would not apply (a JSON config file, offloading, ...),
mid-task checkpoints under ZeRO-1/2 (the AdamW state is partitioned), the independent runner or
Accelerate's mixed precision under sharding.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from jumplora.config import SHARD_CHOICES
from jumplora.sharding_zero import MISSING_DEEPSPEED, shard_base_model_zero3

#: What ``--shard`` runs (its choices but "none"): the base model is sharded by jumplora itself with
#: BASE_BACKENDS, and stays whole on every process with ADAPTER_BACKENDS (DeepSpeed's ZeRO optimizer
#: partitions the adapter's optimizer state instead).
BACKENDS = tuple(choice for choice in SHARD_CHOICES if choice != "none")
BASE_BACKENDS = ("fsdp2", "zero3")
ADAPTER_BACKENDS = ("zero1", "zero2")

#: Environment variables through which ``accelerate launch`` asks for FSDP / DeepSpeed.
_LAUNCHER_KEYS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def launcher_request() -> str | None:
    """The sharding ``accelerate launch`` was configured for: fsdp1, fsdp2, zero0–3, or None."""
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1").strip() == "2" else "fsdp1"
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?').strip()}"
    return None


#: DeepSpeed settings of ``accelerate launch`` that jumplora's ZeRO runs as given (None: any value). Any
#: other (a JSON config file, offloading, Accelerate's gradient accumulation or clipping, MoE) would not be
#: applied, so it is refused; ``zero3_init`` only changes how a model loads (jumplora loads it whole).
_LAUNCHER_ZERO_SETTINGS = {
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("1", "2", "3"),
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("none",),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("none",),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("1",),
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": None,
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": None,
}


def _launcher_zero_unapplied() -> list[str]:
    """The DeepSpeed settings ``accelerate launch`` passes that jumplora's ZeRO would not apply."""
    unapplied = []
    for key, value in os.environ.items():
        if not key.startswith(("ACCELERATE_DEEPSPEED_", "ACCELERATE_GRADIENT_")):
            continue
        allowed = _LAUNCHER_ZERO_SETTINGS.get(key, ())
        if allowed is not None and value.strip().lower() not in allowed:
            unapplied.append(f"{key}={value}")
    return unapplied


def _launched_backend(shard: str) -> str | None:
    """The backend ``accelerate launch`` asks for, if jumplora runs it as asked (ValueError if not)."""
    launched = launcher_request()
    unapplied = _launcher_zero_unapplied() if launched in ("zero1", "zero2", "zero3") else []
    if (launched is not None and launched not in BACKENDS) or unapplied:
        detail = f" with {', '.join(unapplied)}" if unapplied else ""
        raise ValueError(
            f"accelerate launch asks for {launched}{detail}: jumplora shards with FSDP2 (an FSDP config with "
            "fsdp_version: 2, or --shard fsdp2) or DeepSpeed ZeRO-1/2/3 (zero_stage 1, 2 or 3 without a "
            "DeepSpeed config file or offloading, or --shard zero1|zero2|zero3); refusing rather than running "
            "something else"
        )
    if launched is not None and shard not in ("none", launched):
        raise ValueError(f"--shard {shard} conflicts with accelerate launch's {launched} config")
    return launched


def resolve_shard(
    shard: str, runner: str, mixed_precision: str = "no", refusal: str | None = None, checkpoint_every: int = 0
) -> str:
    """The backend this run shards with ("none" or one of BACKENDS); ValueError for what would not run as asked.

    ``refusal``: why the runner cannot shard, as it declares (``Runner.shard_refusal``); None when it can."""
    if shard not in ("none", *BACKENDS):
        raise ValueError(f"--shard {shard}: jumplora shards with {', '.join(BACKENDS)}")
    chosen = _launched_backend(shard) or shard
    if chosen in ADAPTER_BACKENDS and checkpoint_every:
        raise ValueError(
            f"--checkpoint-every {checkpoint_every} under --shard {chosen}: DeepSpeed partitions the AdamW state over "
            "the processes and jumplora writes no mid-task checkpoint of it; use --checkpoint-every 0 (a checkpoint "
            "at each task's end) or --shard fsdp2|zero3"
        )
    if chosen.startswith("zero") and importlib.util.find_spec("deepspeed") is None:  # before the model is loaded
        raise ValueError(MISSING_DEEPSPEED)
    if chosen != "none" and refusal:
        raise ValueError(f"--runner {runner} cannot shard ({refusal})")
    if chosen != "none" and mixed_precision != "no":  # Accelerate's autocast comes with prepare(model), unused here
        raise ValueError(f"--mixed-precision {mixed_precision} is not applied under --shard {chosen}; use 'no'")
    return chosen


@contextlib.contextmanager
def launcher_sharding_hidden() -> Iterator[None]:
    """Hide accelerate launch's FSDP request while the Accelerator is built: jumplora shards by itself,
    and Accelerate must neither wrap the model again nor downgrade to DDP on a CPU."""
    saved = {key: os.environ.pop(key) for key in _LAUNCHER_KEYS if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _ensure_process_group(device: torch.device) -> None:
    """fully_shard needs a process group; a single process (no launcher) gets a world of one."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def fit_adapter(peft_config: Any, backend: str) -> Any:
    """The adapter's PEFT config as ``backend`` can run it.

    ZeRO-3 gathers a weight only while its own module runs, so JumpLoRA layers take the reference path
    (which calls the base layer) instead of the fused one (which reads ``base.weight`` directly and would
    leave it gathered, i.e. unsharded, for the rest of the run).
    """
    if backend == "zero3":
        peft_config.fused = False
    return peft_config


def shard_base_model(model: nn.Module, device: torch.device, backend: str = "fsdp2") -> nn.Module:
    """Freeze the base model and shard it with ``backend`` (fsdp2 or zero3) over the processes; under zero1
    or zero2 it stays whole on every process (each task's optimizer is partitioned instead)."""
    _ensure_process_group(device)
    if backend == "zero3":
        return shard_base_model_zero3(model, device)
    if backend in ADAPTER_BACKENDS:
        return model.requires_grad_(False)
    return _fully_shard(model)


def zero_stage(backend: str) -> int | None:
    """The ZeRO stage DeepSpeed runs the adapter's optimizer at (None: jumplora's own AdamW step)."""
    return int(backend[-1]) if backend in ADAPTER_BACKENDS else None


def _fully_shard(model: nn.Module) -> nn.Module:
    """FSDP2, one unit per transformer block, then the root: weights become DTensors split by rows, and
    outside a forward pass a process holds only its rows."""
    from torch.distributed.fsdp import fully_shard

    model.requires_grad_(False)
    block_types = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_types and m is not model]
    if not blocks:
        raise ValueError(
            f"--shard fsdp2: cannot tell the transformer blocks of {type(model).__name__} (no _no_split_modules)"
        )
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model
