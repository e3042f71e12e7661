"""One process of a run for tests/test_sharding*.py: runs ``ContinualTrainer`` and dumps what it holds.

``python sharded_worker.py OUT MODEL DATA_DIR SHARD BATCH GRAD_ACCUM [cpu|cuda] [fused|reference] [TARGETS]``
(under ``accelerate launch`` for several processes; ``reference``: the JumpLoRA layers' unfused path, which
ZeRO-3 runs; TARGETS: comma-separated target modules instead of the family's). Each process writes
``OUT/rank<r>.safetensors``: its block of every base weight (``<name>`` with ``<name>::first_row``, the row
where the block starts; under ZeRO-3 a flat slice with ``<name>::first_element``) — read without any collective,
so a sharded model's merged weights are checked as they are held — and ``OUT/rank<r>.json``: θ of each
threshold group as this process saw it at each task's end. Under ZeRO-1/2 also ``OUT/rank<r>.zero.json``: how
many elements of the adapter this process's DeepSpeed optimizer held (its fp32 master partition, on which
AdamW keeps its moments), of how many, and how many adapter gradients were left after a backward pass.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from jumplora import ContinualTrainer, RunConfig, sharding_zero
from jumplora.adapters import sharded_zero
from jumplora.adapters.sharded import local_weight, reshard, row_block
from jumplora.build import Setup
from jumplora.run import continual


def main(
    out: str, model: str, data_dir: str, shard: str, batch: int, accum: int,
    device: str = "cpu", path: str = "fused", targets: str = "",
) -> None:  # fmt: skip
    config = RunConfig.from_flat(
        out=out, tasks=["cb", "rte"], model=model, data_dir=data_dir, max_train=16, max_eval=8, max_length=64,
        lr=0.01, strategy="inclora", jumplora=True, cpu=device == "cpu", log_every=1, plots=False, batch_size=batch,
        grad_accum=accum, shard=shard, targets=targets.split(",") if targets else None,
    )  # fmt: skip
    seen: list[dict[str, float]] = []
    original = continual.threshold_values

    def recording(peft_model: torch.nn.Module) -> dict[str, float]:
        values = original(peft_model)
        seen.append(values)
        return values

    continual.threshold_values = recording  # θ at each task's end, as the runner reads it
    zero = _record_adapter_zero()
    if path == "reference":
        adapter_config = Setup.peft_config

        def unfused(setup: Setup):
            config = adapter_config(setup)
            config.fused = False
            return config

        Setup.peft_config = unfused  # type: ignore[method-assign]
    trainer = ContinualTrainer(config, quiet=True)
    rank = trainer.runtime.accelerator.process_index
    trainer.run()
    reshard(trainer.setup.base_model)  # the root unit stays unsharded after the last evaluation
    tensors = {}
    for name, param in trainer.setup.base_model.named_parameters():
        if sharded_zero.is_zero_param(param):  # the run has ended its process group: the block from the rank
            assert param.ds_status.name == "NOT_AVAILABLE" and param.numel() == 0  # partitioned, not gathered
            size = param.ds_tensor.numel()
            count = max(0, min(size, param.ds_numel - rank * size))
            tensors[name] = param.ds_tensor.detach().reshape(-1)[:count].cpu().clone()
            tensors[f"{name}::first_element"] = torch.tensor(rank * size)
            continue
        tensors[name] = local_weight(param.detach()).cpu().contiguous()
        tensors[f"{name}::first_row"] = torch.tensor(row_block(param)[0])
    save_file(tensors, str(Path(out) / f"rank{rank}.safetensors"))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    if zero:
        (Path(out) / f"rank{rank}.zero.json").write_text(json.dumps(zero))


def _record_adapter_zero() -> dict[str, int]:
    """What DeepSpeed's ZeRO-1/2 optimizer holds on this process, filled in as the run goes (empty otherwise)."""
    seen: dict[str, int] = {}
    backward, step = sharding_zero.AdapterZero.backward, sharding_zero.AdapterZero.step

    def trainable(zero: sharding_zero.AdapterZero) -> list[torch.nn.Parameter]:
        return [p for p in zero.engine.module.parameters() if p.requires_grad]

    def recording_backward(zero: sharding_zero.AdapterZero, loss: torch.Tensor) -> None:
        backward(zero, loss)
        seen["grads_after_backward"] = sum(p.grad is not None for p in trainable(zero))
        seen["adapter_tensors"] = len(trainable(zero))

    def recording_step(zero: sharding_zero.AdapterZero) -> None:
        groups = zero.engine.optimizer.param_groups
        seen["partition_elements"] = sum(p.numel() for group in groups for p in group["params"])
        seen["adapter_elements"] = sum(p.numel() for p in trainable(zero))
        step(zero)

    sharding_zero.AdapterZero.backward = recording_backward  # type: ignore[method-assign]
    sharding_zero.AdapterZero.step = recording_step  # type: ignore[method-assign]
    return seen


if __name__ == "__main__":
    main(*sys.argv[1:5], int(sys.argv[5]), int(sys.argv[6]), *sys.argv[7:10])
