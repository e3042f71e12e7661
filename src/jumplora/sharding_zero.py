"""DeepSpeed ZeRO, on CPU (gloo) or GPU: ZeRO-3 partitions the frozen base model (``--shard zero3``);
ZeRO-1/2 run the adapter's optimizer (``--shard zero1|zero2``).

DeepSpeed is imported here only, and only when a run asks for ZeRO (it logs at import and is an
optional dependency: ``pip install jumplora[deepspeed]``).

ZeRO-3. ``deepspeed.initialize`` without an optimizer
partitions every base parameter into flat per-process slices and installs the hooks that gather a
module's weights for its forward (and backward) and free them after; the adapter stays replicated, as
under FSDP2 (:mod:`jumplora.sharding`), and its gradients are averaged by the engine.

Settings that make the shards the only copy between forwards, so that θ init and the merge can work on
``ds_tensor`` in place (:mod:`jumplora.adapters.sharded_zero`): no persistent (never partitioned) small
parameters, no prefetching, and no keeping a gathered weight for a later reuse. And no
``memory_efficient_linear``: it replaces ``torch.nn.functional.linear`` for the whole process, for good,
by DeepSpeed's own autograd function (every other model and test in the process would run it too).

ZeRO-1/2 (:class:`AdapterZero`). These partition what training holds besides the weights: the optimizer
state (stage 1) and the gradients too (stage 2). Here only the adapter (A, B, θ) trains, so the base model
stays whole on every process, frozen, and each task's ``deepspeed.initialize`` gets the PEFT model and the
adapter's AdamW: DeepSpeed flattens the adapter, each process keeps the AdamW moments and an fp32 master
copy of its 1/N of it, reduces the gradients (stage 2: reduce-scatters them during the backward pass, so no
process holds all of them), steps its part and all-gathers the updated adapter. θ written outside the
optimizer (its budget init at the ramp start, the density controller's scale tracking, a strategy's
writes) is copied into DeepSpeed's master partitions before each step: DeepSpeed's step would otherwise
write its stale master copy back over it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

#: What a run that asks for ZeRO without DeepSpeed installed is told.
MISSING_DEEPSPEED = "DeepSpeed ZeRO needs DeepSpeed: pip install 'jumplora[deepspeed]'"

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


def _set_local_rank() -> None:
    """A world of one that no launcher started gets LOCAL_RANK=0: DeepSpeed reads it (at start and in every
    ZeRO-3 forward)."""
    if dist.get_world_size() == 1:
        os.environ.setdefault("LOCAL_RANK", "0")


def shard_base_model_zero3(model: nn.Module, device: torch.device) -> nn.Module:
    """Freeze the base model and partition it with ZeRO-3; the model object stays the one the run uses.

    The process group must exist already (the Accelerator's, or a world of one, for which LOCAL_RANK=0 is
    set in this process's environment, as a launcher would).
    """
    deepspeed = _import_deepspeed(device)
    _set_local_rank()
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ZERO3_CONFIG, dist_init_required=False)
    # The hooks live as long as the model; keep DeepSpeed's engine with it without making it a submodule.
    object.__setattr__(model, "_jumplora_zero3_engine", engine)
    return model


def adapter_zero_config(stage: int, batch_size: int, grad_accum: int, max_grad_norm: float) -> dict[str, Any]:
    """DeepSpeed config of the adapter's ZeRO-1/2 optimizer for a task's loop.

    The loop owns the accumulation boundary (``managed_gradient_accumulation: false``): Accelerate's
    dataloader decides it, a short last accumulation of an epoch included, and DeepSpeed's ``step``
    reduces and applies what the backward passes since the last one accumulated. ``backward`` divides
    the loss by ``grad_accum`` as Accelerate's does. Clipping is DeepSpeed's, over the global norm of the
    partitioned gradients (θ's included, like ``--max-grad-norm`` unsharded).
    """
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": stage},
        "steps_per_print": None,
    }


class AdapterZero:
    """One task's adapter training through DeepSpeed's ZeRO stage-1/2 optimizer (``--shard zero1|zero2``).

    ``model`` is the PEFT model (its forward passes go through :attr:`engine`, which hooks the backward
    pass for the gradient reduction); ``optimizer`` the adapter's AdamW with its param groups (θ's own
    learning rate and no weight decay), which DeepSpeed runs on each process's partition; a learning-rate
    scheduler stays on ``optimizer``. Call :meth:`close` at the task's end.

    One difference to an AdamW step is undone: DeepSpeed steps every group, one whose parameters have had
    no gradient yet with zeros, where AdamW skips them. θ has none until the sparsity ramp starts, and
    its Adam step count would run ahead (its first real step 0.74× as large); so the count of a group
    that has never had a gradient is set back to 0 after each step (its moments are still exactly 0, its
    values unchanged: no weight decay on θ).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, stage: int, *, batch_size: int, grad_accum: int,
        max_grad_norm: float, device: torch.device,
    ) -> None:  # fmt: skip
        dtypes = {p.dtype for group in optimizer.param_groups for p in group["params"]}
        if dtypes != {torch.float32}:  # the master copy would round what is written into the adapter
            raise ValueError(f"--shard zero{stage} trains a float32 adapter; this one is {sorted(map(str, dtypes))} "
                             "(load the base model in float32)")  # fmt: skip
        deepspeed = _import_deepspeed(device)
        _set_local_rank()
        self._had_gradient = [False] * len(optimizer.param_groups)
        self._hooks = [
            param.register_hook(functools.partial(self._mark_gradient, index))
            for index, group in enumerate(optimizer.param_groups)
            for param in group["params"]
        ]
        config = adapter_zero_config(stage, batch_size, grad_accum, max_grad_norm)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                               dist_init_required=False)  # fmt: skip

    def _mark_gradient(self, group: int, grad: torch.Tensor) -> None:
        self._had_gradient[group] = True

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate a micro-batch's gradients (divided by the accumulation steps); stage 2 reduce-scatters
        them right away, so ``param.grad`` is gone afterwards."""
        self.engine.backward(loss)

    def step(self) -> None:
        """Copy what was written into the adapter since the last step into DeepSpeed's fp32 master partitions,
        then reduce, clip and step: every process steps its partition and all-gathers the new adapter.

        The copy is exact (the adapter is float32; DeepSpeed's master is a float32 copy of it), so it
        changes only what was written outside the optimizer, which DeepSpeed would otherwise overwrite."""
        self.engine.optimizer.refresh_fp32_params()
        self.engine.step()
        optimizer = self.engine.optimizer  # DeepSpeed's: one flat partition per group
        for group, had_gradient in zip(optimizer.param_groups, self._had_gradient, strict=True):
            state = optimizer.state.get(group["params"][0], {})
            if not had_gradient and isinstance(state.get("step"), torch.Tensor):
                state["step"].zero_()

    def close(self) -> None:
        """Remove DeepSpeed's hooks and ours (a shared adapter gets a new engine next task)."""
        self.engine.destroy()
        for handle in (*self._hooks, self.engine.module_forward_pre_hook, self.engine.module_forward_post_hook):
            handle.remove()
