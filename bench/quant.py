"""Quantized bases: memory of the float32 sparse residuals, and the residual's step-time cost on CPU.

Run from the repository root::

    python bench/quant.py memory studies/runs/o[14]-inclora-jl-s* studies/runs_smollm2/o1-inclora-jl-s*
    python bench/quant.py speed --repeats 15              # MiniLM, bitsandbytes int8 base, query/value

``memory`` reads finished sparse runs (``results.json``): the residual of a module after t tasks holds the
union of the t supports (entries that cancel exactly aside), and its size follows from the measured
per-task densities and each task's Jaccard overlap with the union of the earlier supports
(|U_t| = (|S_t| + |U_{t-1}|) / (1 + J_t), exact over all targeted modules). A residual is stored as CSR
with float32 values and int32 indices (8 bytes per entry + 4 per row), or densely in float32 once that is
smaller (density above 1/2; counted here over all targeted modules together, a per-module choice can only be
smaller); it is compared with a dense bf16 copy of the targeted weights (2 bytes per entry), the cheapest
dense alternative (and an inexact one).

``speed`` times one training step (zero_grad, forward, loss = mean(hidden²), backward, AdamW step on the
adapter) of MiniLM with a JumpLoRA adapter at γ = 1 on query/value, batch × seq tokens, on:
``int8`` (bitsandbytes int8 base, no residual yet), ``int8+R`` (the same model with a residual of the given
density on every targeted module, random support) and ``fp32`` (the float base: fused path). Variants live in
one process and the repeats go round-robin over them; it prints median times and the paired ratio
int8+R / int8 (the median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

BYTES_PER_ENTRY, BYTES_PER_ROW, DENSE_FP32, BF16 = 8, 4, 4, 2


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear module of the run's base model, from its config (no weights loaded)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from jumplora.models import resolve_model
    from jumplora.models.loading import default_model_path, detect_family

    name = config["model"]["name"]  # results schema 2: the nested config
    folder = resolve_model(name, None) if name else default_model_path()
    model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    auto = AutoModelForCausalLM if detect_family(model_config) == "causal" else AutoModel
    with torch.device("meta"):
        model = auto.from_config(model_config)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def union_sizes(results: dict, total: int) -> list[int]:
    """Entries in the union of the first t supports, t = 1..T (from densities and Jaccard with the past)."""
    sizes, union = [], 0
    for task in results["per_task"]:
        kept = task["density"] * total
        jaccard = task.get("jaccard_with_past") or 0.0
        union = kept if not sizes else (kept + union) / (1.0 + jaccard)
        sizes.append(round(union))
    return sizes


def memory(run_dirs: list[str]) -> None:
    print(
        "| run | tasks | targeted entries | union density after 4 / after T | residual MiB after 4 / T "
        "| bf16 copy MiB | residual / bf16 copy after 4 / T |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in run_dirs:
        results = json.loads((Path(run) / "results.json").read_text())
        shapes = module_shapes(results["config"])
        targeted = list(results["per_task"][0]["density_per_module"])
        total = sum(shapes[n][0] * shapes[n][1] for n in targeted)
        rows = sum(shapes[n][0] for n in targeted)
        sizes = union_sizes(results, total)
        picks = [sizes[min(3, len(sizes) - 1)], sizes[-1]]
        residual = [min(BYTES_PER_ENTRY * s + BYTES_PER_ROW * (rows + len(targeted)), DENSE_FP32 * total) / 2**20
                    for s in picks]  # fmt: skip
        dense = BF16 * total / 2**20
        label = f"{Path(run).parent.name}/{Path(run).name}"
        print(
            f"| {label} | {len(sizes)} | {total:,} | {100 * picks[0] / total:.1f} % / "
            f"{100 * picks[1] / total:.1f} % | {residual[0]:.2f} / {residual[1]:.2f} | {dense:.2f} | "
            f"{residual[0] / dense:.2f} / {residual[1] / dense:.2f} |"
        )


def _step_model(quantize: str, density: float, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    import peft

    from jumplora import JumpLoraConfig
    from jumplora.adapters import init_thresholds_to_budget, jumplora_layers, residual, set_gamma
    from jumplora.models import load_model

    model = load_model(None, quantize=quantize).model
    generator = torch.Generator().manual_seed(seed)
    if density > 0:
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("query", "value"):
                shape = (module.out_features, module.in_features)
                keep = torch.rand(shape, generator=generator) < density
                residual.add_to_residual(module, torch.randn(shape, generator=generator) * 1e-3 * keep)
    peft_model = peft.get_peft_model(model, JumpLoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"],
                                                           sparse=True))  # fmt: skip
    for _, layer in jumplora_layers(peft_model):
        with torch.no_grad():
            layer.jumplora_B["default"].normal_(0, 0.01, generator=generator)
    set_gamma(peft_model, 1.0)
    init_thresholds_to_budget(peft_model)
    peft_model.train()
    return peft_model, torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)


def _one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.square().mean()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = {"int8": _step_model("int8", 0.0), "int8+R": _step_model("int8", args.density),
                "fp32": _step_model("none", 0.0)}  # fmt: skip
    ids = torch.randint(1000, 20000, (args.batch, args.seq))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 1):
        for name, (model, optimizer) in variants.items():
            elapsed = _one_step(model, optimizer, ids)
            if round_:  # the first round warms up
                times[name].append(elapsed)
    for name, values in times.items():
        print(f"{name:7s} median {1e3 * statistics.median(values):8.1f} ms per step")
    ratios = [a / b for a, b in zip(times["int8+R"], times["int8"], strict=True)]
    vs_fp32 = [a / b for a, b in zip(times["int8"], times["fp32"], strict=True)]
    print(
        f"int8+R / int8 (residual density {args.density:.0%}): median of paired ratios "
        f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} rounds)"
    )
    print(f"int8 / fp32: median of paired ratios {statistics.median(vs_fp32):.3f}")


def main() -> None:
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("runs", nargs="+")
    spd = sub.add_parser("speed")
    spd.add_argument("--density", type=float, default=0.17, help="residual density of every targeted module")
    spd.add_argument("--batch", type=int, default=16)
    spd.add_argument("--seq", type=int, default=128)
    spd.add_argument("--repeats", type=int, default=15)
    spd.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    memory(args.runs) if args.command == "memory" else speed(args)


if __name__ == "__main__":
    main()
