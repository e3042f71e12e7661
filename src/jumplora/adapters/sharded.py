"""JumpLoRA's model-level math on a base model whose weights are sharded (FSDP2 rows, DeepSpeed ZeRO-3 flat slices).

Under FSDP2 each base weight W is a ``DTensor`` split along dim 0: a process holds a block of W's rows
and never the whole matrix. The adapter (A, B, θ) is small and stays replicated on every process (its
gradients are averaged by :func:`average_gradients`, as DDP would), so a process can compute exactly
the rows of ΔW = B·A that match its block of W without any communication. On top of that:

- the budget θ is the global k-th largest |ΔW| of a threshold group, found by an exact radix select
  over float32 bit patterns (:func:`kth_smallest`: two ``all_reduce`` of a 65,536-bin histogram each),
  so ΔW is never gathered and the count is exact;
- densities and mean |ΔW| for the density controller are sums of per-process counts;
- the end-of-task merge adds s·ΔW⊙1[|ΔW|>θ] into each process's own block of W, in place.

Under DeepSpeed ZeRO-3 a process holds a flat slice of each weight instead of a block of rows
(:mod:`.sharded_zero`); the same functions then work on those 1-D slices, since everything above is
element-wise.

Everything here also works at world size 1 and on plain (unsharded) weights, where the "local block" is
the whole matrix; callers pick this path when :func:`is_sharded` says the base is sharded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from . import sharded_zero
from .targets import weight_is_transposed

_BINS = 1 << 16  # one radix digit: 16 of float32's 32 bits


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back in its sharded state (a no-op for an unsharded model).

    After an evaluation the root unit keeps its parameters unsharded (FSDP2 does not reshard the root
    after forward); a write into those full copies would be lost, so θ init, density and the merge
    always see the sharded parameters.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(layer: nn.Module) -> bool:
    """Whether the base weight of a JumpLoRA layer is sharded (a DTensor of FSDP2, or partitioned by ZeRO-3)."""
    weight = layer.get_base_layer().weight
    return isinstance(weight, DTensor) or sharded_zero.is_zero_param(weight)


def row_block(weight: torch.Tensor) -> tuple[int, int]:
    """(first row, number of rows) of ``weight`` that this process holds; the whole matrix if not sharded."""
    if not isinstance(weight, DTensor):
        return 0, weight.shape[0]
    if len(weight.placements) != 1 or weight.placements[0] != Shard(0):
        raise ValueError(f"sharded weights must be split along dim 0 only, got placements {weight.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return int(offset[0]), int(shape[0])


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """This process's block of a base weight (the tensor itself when it is not sharded)."""
    if sharded_zero.is_zero_param(weight):
        return sharded_zero.local_weight(weight)
    return weight.to_local() if isinstance(weight, DTensor) else weight


def full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole base weight, however it is sharded."""
    return sharded_zero.full_shape(weight) if sharded_zero.is_zero_param(weight) else tuple(weight.shape)


@torch.no_grad()
def local_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    """The block of ΔW = B·A (unscaled, ungated) that lines up with this process's block of W, in W's layout.

    ``nn.Linear`` stores W as (out, in): its rows are rows of ΔW, B[rows]·A. GPT-2's ``Conv1D`` stores
    W as (in, out): its rows are columns of ΔW, (B·A[:, rows])ᵀ.
    """
    base = layer.get_base_layer()
    if sharded_zero.is_zero_param(base.weight):
        return sharded_zero.local_delta(layer, adapter)
    first, count = row_block(base.weight)
    lora_A, lora_B = layer.jumplora_A[adapter], layer.jumplora_B[adapter]
    if weight_is_transposed(base):
        return (lora_B @ lora_A[:, first : first + count]).t()
    return lora_B[first : first + count] @ lora_A


def group_of(layers: Iterable[nn.Module]) -> dist.ProcessGroup | None:
    """The process group the layers' weights are sharded over (None: not sharded, nothing to reduce)."""
    for layer in layers:
        weight = layer.get_base_layer().weight
        if isinstance(weight, DTensor):
            return weight.device_mesh.get_group()
        if sharded_zero.is_zero_param(weight):
            return weight.ds_process_group
    return None


def sum_over_processes(values: list[float], group: dist.ProcessGroup | None, device: torch.device) -> list[float]:
    """Element-wise sum of per-process numbers (counts in float64 stay exact up to 2**53)."""
    if group is None:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def _reduced_histogram(digits: list[torch.Tensor], group: dist.ProcessGroup | None, device: torch.device):
    hist = torch.zeros(_BINS, dtype=torch.int64, device=device)
    for d in digits:
        hist += torch.bincount(d.long(), minlength=_BINS)
    if group is not None:
        dist.all_reduce(hist, group=group)
    return hist


def kth_smallest(chunks: list[torch.Tensor], k: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The k-th smallest (1-based) of the non-negative float32 values held by all processes together.

    The bit pattern of a non-negative float32, read as an integer, sorts like the float; a radix select on
    the high 16 bits, then on the low 16 bits within the chosen bin, finds the exact value with two
    histogram all-reduces and no gathering of the values.
    """
    bits = [c.detach().float().contiguous().view(torch.int32).flatten() for c in chunks]
    device = bits[0].device if bits else torch.device("cpu")
    high = _reduced_histogram([b >> 16 for b in bits], group, device).cumsum(0)
    high_bin = int(torch.searchsorted(high, torch.tensor(k, device=device)))
    below = int(high[high_bin - 1]) if high_bin > 0 else 0
    low = _reduced_histogram([b[(b >> 16) == high_bin] & 0xFFFF for b in bits], group, device).cumsum(0)
    low_bin = int(torch.searchsorted(low, torch.tensor(k - below, device=device)))
    return torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32)[0]


def threshold_keeping(chunks: list[torch.Tensor], keep: int, total: int, group: dist.ProcessGroup | None) -> float:
    """A θ with exactly ``keep`` of the ``total`` magnitudes (spread over processes) strictly above it.

    The same rule as the single-process ``kthvalue`` form: halfway between the largest dropped and the
    smallest kept magnitude, in float32.
    """
    if keep >= total:
        return 0.0
    if keep <= 0:
        return float(kth_smallest(chunks, total, group))
    largest_dropped = kth_smallest(chunks, total - keep, group)
    smallest_kept = kth_smallest(chunks, total - keep + 1, group)
    return float((largest_dropped + smallest_kept) / 2)


@torch.no_grad()
def merge_in_place(layers: list[tuple[str, nn.Module]], adapter: str) -> dict[str, tuple[float, float]]:
    """W_block += s·ΔW_block⊙1[|ΔW_block|>θ] on each process, for every layer; nothing is gathered.

    Returns, per module, (max |merged update|, max |W| before the merge) over all processes, for the
    divergence check.
    """
    sizes: dict[str, tuple[float, float]] = {}
    group = group_of(layer for _, layer in layers)
    for name, layer in layers:
        weight = local_weight(layer.get_base_layer().weight)
        delta = local_delta(layer, adapter)
        if layer.sparse[adapter]:
            delta = delta * (delta.abs() > layer.theta(adapter))
        update = (delta * layer.scaling[adapter]).to(weight.dtype)
        largest = torch.stack([update.abs().amax().float(), weight.abs().amax().float()]) if update.numel() \
            else torch.zeros(2, device=weight.device)  # fmt: skip
        if group is not None:
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
        weight.add_(update)
        sizes[name] = (float(largest[0]), float(largest[1]))
    return sizes


@torch.no_grad()
def add_to_weight(weight: torch.Tensor, update: torch.Tensor, alpha: float = 1.0) -> None:
    """W += alpha·update for a full-size ``update`` in W's layout; a sharded W takes its own block only."""
    if sharded_zero.is_zero_param(weight):
        sharded_zero.add_to_weight(weight, update, alpha)
        return
    first, count = row_block(weight)
    local_weight(weight).add_(update[first : first + count].to(device=weight.device, dtype=weight.dtype), alpha=alpha)


def average_gradients(params: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Average the gradients of replicated parameters over the processes (one flat all-reduce)."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for p in with_grad:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
