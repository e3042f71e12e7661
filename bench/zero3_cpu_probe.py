"""Probe: a DeepSpeed ZeRO-3 step on CPU, 2 processes, gloo, outside jumplora's engine.

    torchrun --nproc_per_node 2 bench/zero3_cpu_probe.py [peft|jumplora]
    (env: PROBE_FUSED=0 for JumpLoRA's reference path; PROBE_SHM=1 to let DeepSpeed build its shm op)

Findings (DeepSpeed 0.19.8, torch 2.13, this 2-core machine, 2026-12-07):

- The "deepspeed.init_distributed hangs > 150 s" seen earlier is not MPI or oneCCL discovery: with
  torch.distributed initialised first, DeepSpeed only wraps the group. It is DeepSpeed's CPU accelerator
  JIT-compiling its shared-memory all-reduce (``deepspeed.comm.torch.build_shm_op`` → torch cpp_extension,
  in ~/.cache/torch_extensions/py311_cpu/deepspeed_shm_comm) behind a file lock; a build killed half-way
  (at 19:07 here) left ``lock`` behind with no .so, and every later start waited on it forever
  (faulthandler: ``file_baton.wait``). Marking the op incompatible
  (``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False``; jumplora never calls DeepSpeed's
  inference all-reduce it serves) makes the import + initialize take 2-3 s per process.
- ZeRO-3 partitions for real: q_proj (32, 32) is ``data (0,)`` and ``ds_tensor (512,)`` on each process
  (with ``stage3_param_persistence_threshold: 0``; the default keeps parameters under 1e5 elements whole).
- PEFT LoRA and JumpLoRA's reference path (which calls the base layer) train 2 steps in < 1 s, and the
  base weight is released again after the forward. JumpLoRA's fused path reads ``base.weight`` without
  calling the base layer: DeepSpeed's parameter getter then gathers it as an "external parameter" of the
  enclosing module and never releases it (``data (32, 32)`` after the steps): the run silently
  stops being sharded. jumplora therefore runs the reference path under ZeRO-3 (same losses here).
- ``deepspeed.initialize`` with ZeRO-3 replaces ``torch.nn.functional.linear`` process-wide, for good
  ("memory_efficient_linear"); its rounding differs from PyTorch's. jumplora turns it off.
- Even so, one process under ZeRO-3 is not bit-equal to an unsharded one (logits equal, adapter gradients
  differ in the last bits): DeepSpeed wraps module inputs/outputs in identity autograd nodes, and every
  single-path gradient stays bit-equal up to the first place where the residual stream's branches are
  summed (layers.1 self_attn o_proj output), where the sum is grouped differently.
"""

import faulthandler
import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
faulthandler.dump_traceback_later(float(os.environ.get("PROBE_DUMP_AFTER", "100")), exit=True)
import torch  # noqa: E402 (after the environment and the watchdog are set)
import torch.distributed as dist  # noqa: E402

t0 = time.perf_counter()
dist.init_process_group("gloo")  # before deepspeed: its init_distributed then only wraps this group
rank = dist.get_rank()
t_dist = time.perf_counter() - t0
import deepspeed  # noqa: E402

if os.environ.get("PROBE_SHM", "0") != "1":  # skip the JIT-built shared-memory all-reduce (see the docstring)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

t_import = time.perf_counter() - t0 - t_dist
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2))
model.requires_grad_(False)
zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0}
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
t1 = time.perf_counter()
engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
t_init = time.perf_counter() - t1
q = model.model.layers[0].self_attn.q_proj.weight
print(f"rank {rank}: dist {t_dist:.1f}s import {t_import:.1f}s initialize {t_init:.1f}s; q_proj {tuple(q.ds_shape)} "
      f"data {tuple(q.shape)} ds_tensor {tuple(q.ds_tensor.shape)}", flush=True)
mode = sys.argv[1] if len(sys.argv) > 1 else "peft"
import peft  # noqa: E402

if mode == "jumplora":
    from jumplora import JumpLoraConfig

    cfg = JumpLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, gamma=1.0,
                         fused=os.environ.get("PROBE_FUSED", "1") == "1")
else:
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
pm = peft.get_peft_model(model, cfg)
params = [p for p in pm.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-2)
ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(rank))
t2 = time.perf_counter()
for _ in range(2):
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
print(f"rank {rank}: {mode} 2 steps {time.perf_counter() - t2:.1f}s loss {float(loss):.4f} "
      f"q_proj data after {tuple(q.shape)}", flush=True)
dist.destroy_process_group()
