"""Partitioning the frozen base model with DeepSpeed ZeRO-3 (``--shard zero3``), on CPU (gloo) or GPU.

DeepSpeed is imported here only, and only when a run asks for ZeRO-3 (it logs at import and is an
optional dependency: ``pip install jumplora[deepspeed]``). ``deepspeed.initialize`` without an optimizer
partitions every base parameter into flat per-process slices and installs the hooks that gather a
module's weights for its forward (and backward) and free them after; the adapter stays replicated, as
under FSDP2 (:mod:`jumplora.sharding`), and its gradients are averaged by the engine.

Settings that make the shards the only copy between forwards, so that θ init and the merge can work on
``ds_tensor`` in place (:mod:`jumplora.adapters.sharded_zero`): no persistent (never partitioned) small
parameters, no prefetching, and no keeping a gathered weight for a later reuse. And no
``memory_efficient_linear``: it replaces ``torch.nn.functional.linear`` for the whole process, for good,
by DeepSpeed's own autograd function (every other model and test in the process would run it too).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

#: What a run that asks for ZeRO-3 without DeepSpeed installed is told.
MISSING_DEEPSPEED = "ZeRO-3 needs DeepSpeed: pip install 'jumplora[deepspeed]'"

#: DeepSpeed config of the base model's partitioning (no optimizer: DeepSpeed never trains the adapter).
ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_model_persistence_threshold": 0,
        "stage3_prefetch_bucket_size": 0,
        "stage3_max_reuse_distance": 0,
        "memory_efficient_linear": False,
    },
}


def _import_deepspeed(device: torch.device):
    """DeepSpeed with the accelerator of ``device``, minus its JIT-built shared-memory all-reduce on CPU.

    On the CPU accelerator DeepSpeed's first communication set-up compiles a C++ extension (in
    ``~/.cache/torch_extensions``, behind a file lock): minutes on a loaded machine, and a build killed
    half-way leaves the lock behind so every later start waits forever (the "init hangs" seen on this
    machine). The extension only speeds up DeepSpeed's inference all-reduce, which jumplora never calls.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ValueError(MISSING_DEEPSPEED) from exc
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def shard_base_model_zero3(model: nn.Module, device: torch.device) -> nn.Module:
    """Freeze the base model and partition it with ZeRO-3; the model object stays the one the run uses.

    The process group must exist already (the Accelerator's, or a world of one, for which LOCAL_RANK=0 is
    set in this process's environment, as a launcher would).
    """
    deepspeed = _import_deepspeed(device)
    if dist.get_world_size() == 1:  # no launcher set it; DeepSpeed reads it (at start and in every forward)
        os.environ.setdefault("LOCAL_RANK", "0")
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ZERO3_CONFIG, dist_init_required=False)
    # The hooks live as long as the model; keep DeepSpeed's engine with it without making it a submodule.
    object.__setattr__(model, "_jumplora_zero3_engine", engine)
    return model
