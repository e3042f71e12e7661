"""Probe: DeepSpeed ZeRO-3 on CPU, 2 processes, gloo (torchrun --nproc_per_node 2 bench/zero3_cpu_probe.py).

Findings are filled in below after running it.
"""

import faulthandler
import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
faulthandler.dump_traceback_later(float(os.environ.get("PROBE_DUMP_AFTER", "100")), exit=True)
import torch
import torch.distributed as dist

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
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
          "stage3_model_persistence_threshold": 0}}
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
