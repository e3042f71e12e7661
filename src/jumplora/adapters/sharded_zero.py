"""The block of a DeepSpeed ZeRO-3 partitioned base weight that this process holds, and ΔW lined up with it.

ZeRO-3 flattens each parameter and gives process p the flat elements [p·n, (p+1)·n) with n = ⌈numel /
world⌉, in ``param.ds_tensor`` (the last process's block is padded); outside a module's forward the
parameter itself is empty. Such a block is a run of whole rows with a partial row at either end, so
the matching piece of ΔW = B·A is the few rows it touches, computed from the replicated A and B,
flattened and cut to the same elements. :mod:`.sharded` hands these 1-D blocks to the same radix select,
density sums and in-place merge as FSDP2's row blocks (element-wise math does not care about layout).

Read by attribute only (``ds_tensor``, ``ds_numel``, ``ds_shape``, ``ds_process_group``, ``ds_status``):
nothing here imports DeepSpeed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .targets import weight_is_transposed


def is_zero_param(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is partitioned by DeepSpeed ZeRO-3."""
    return hasattr(weight, "ds_tensor") and hasattr(weight, "ds_numel")


def flat_block(weight: torch.Tensor) -> tuple[int, int]:
    """(first flat element, number of elements) of the full weight that this process holds, padding excluded."""
    group = weight.ds_process_group
    size = weight.ds_tensor.numel()
    first = dist.get_rank(group) * size
    return first, max(0, min(size, weight.ds_numel - first))


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """This process's elements of a partitioned weight (a 1-D view of ``ds_tensor``; writes go to the shard).

    A weight that is gathered at the moment (inside a forward, or kept whole by ZeRO-3's persistence) has
    a full copy that a write into the shard would not reach: refused rather than merged half-way.
    """
    if getattr(weight.ds_status, "name", "") != "NOT_AVAILABLE" or getattr(weight, "ds_persist", False):
        raise RuntimeError(
            f"a ZeRO-3 weight of shape {tuple(weight.ds_shape)} is gathered (status {weight.ds_status}); "
            "its shard cannot be updated in place"
        )
    return weight.ds_tensor.view(-1).narrow(0, 0, flat_block(weight)[1])


@torch.no_grad()
def local_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    """The elements of ΔW = B·A (unscaled, ungated, in W's layout) that line up with this process's block."""
    base = layer.get_base_layer()
    first, count = flat_block(base.weight)
    cols = base.weight.ds_shape[1]
    lora_A, lora_B = layer.jumplora_A[adapter], layer.jumplora_B[adapter]
    if count == 0:
        return lora_B.new_zeros(0)
    top, bottom = first // cols, (first + count - 1) // cols + 1  # the rows of W the block touches
    # Conv1D's W is (in, out): its rows are columns of ΔW
    transposed = weight_is_transposed(base)
    touched = (lora_B @ lora_A[:, top:bottom]).t() if transposed else lora_B[top:bottom] @ lora_A
    start = first - top * cols
    return touched.reshape(-1)[start : start + count]


def full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole partitioned weight (``weight.shape`` is empty outside a forward)."""
    return tuple(weight.ds_shape)


@torch.no_grad()
def add_to_weight(weight: torch.Tensor, update: torch.Tensor, alpha: float = 1.0) -> None:
    """W += alpha·update for a full-size ``update`` in W's layout; this process adds its own elements."""
    first, count = flat_block(weight)
    piece = update.reshape(-1)[first : first + count]
    local_weight(weight).add_(piece.to(device=weight.ds_tensor.device, dtype=weight.ds_tensor.dtype), alpha=alpha)
