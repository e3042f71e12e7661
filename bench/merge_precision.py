"""How exact the end-of-task merges stay under each way of holding the base weights for bf16 compute.

    python bench/merge_precision.py RUN_DIR/checkpoint    # a SmolLM2 run's merged updates, replayed in order
    python bench/merge_precision.py --like studies/runs_smollm2/o1-inclora-jl-s0   # updates shaped like that run's

``--like RUN`` draws, for each of the run's tasks and each q/v module, a rank-8 ΔW = B·A (A as PEFT
initialises it, B Gaussian) scaled so that the task's recorded density is kept at its recorded θ, and
merges s·ΔW⊙1[|ΔW|>θ] (s = α/r = 4): updates with the run's sizes and sparsity, for runs whose
checkpoints were not kept.

JumpLoRA adds each task's sparse update U_t = s·ΔW_t⊙1[|ΔW_t|>θ] into the base after the task. The exact
result after task t is W + Σ_{k≤t} U_k (float64 here). Options for the weights a bf16 run keeps:

- ``fp32_base``: the base stays float32 and autocast casts it to bf16 per matmul (``--mixed-precision bf16``
  as shipped): W ← W + U_t in float32.
- ``bf16_base``: the base stored in bf16 and merged in place: W ← bf16(W + U_t). An entry of U_t below
  half a bf16 ulp of W vanishes; the others are rounded to 8 bits.
- ``bf16_base_fp32_master``: the targeted modules keep a float32 master copy that takes the merges (as
  ``fp32_base``); the bf16 compute copy is re-rounded from it after each merge. The merged result (the
  master) is exact to float32; the compute copy carries bf16's rounding of the whole weight, which is what
  autocast applies to ``fp32_base`` at every matmul too.
- ``bf16_base_fp32_residual``: the base stored in bf16, untouched; the merged updates kept as a float32
  residual R = Σ U_k added at compute time. Exact in the updates, but the base itself is bf16-rounded.

For each option and task, the error of what the merges added: E = (merged − start) − Σ U_k, where start is
the option's own weights before the first merge (W, or bf16(W)); max |E| and ‖E‖ / ‖Σ U_k‖ over all targeted
modules, and the share of a task's kept update entries that an in-place bf16 merge loses entirely.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from jumplora.adapters.updates import unpack_update
from jumplora.models import load_model


def load_updates(checkpoint: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted(checkpoint.glob("update_*.safetensors"))
    if not files:
        raise SystemExit(f"error: {checkpoint}: no update_*.safetensors (a run's checkpoint folder)")
    return [unpack_update(load_file(str(f))) for f in files]


def updates_like(run: Path, weights: dict[str, torch.Tensor], rank: int = 8, scale: float = 4.0) -> list[dict]:
    """Per task: rank-r updates keeping the run's density at its θ (global threshold), seeded."""
    results = json.loads((run / "results.json").read_text())
    gen = torch.Generator().manual_seed(0)
    tasks = []
    for task in results["per_task"]:
        theta, density = task["thresholds"]["global"], task["density"]
        update = {}
        for name, w in weights.items():
            a = (torch.rand(rank, w.shape[1], generator=gen) * 2 - 1) / w.shape[1] ** 0.5
            delta = torch.randn(w.shape[0], rank, generator=gen) @ a
            delta *= theta / torch.quantile(delta.abs().flatten(), 1 - density)
            update[name] = scale * delta * (delta.abs() > theta)
        tasks.append(update)
    return tasks


def errors(got: torch.Tensor, exact: torch.Tensor, added: torch.Tensor) -> tuple[float, float]:
    diff = got.double() - exact
    return float(diff.abs().max()), float(diff.norm() / added.norm().clamp(min=1e-30))


def replay(weights: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]]) -> list[dict]:
    """Every option's merge error after each task, summed over the targeted modules (max and pooled norm)."""
    names = sorted({n for u in updates for n in u})
    exact = {n: weights[n].double() for n in names}
    fp32 = {n: weights[n].float().clone() for n in names}
    bf16 = {n: weights[n].to(torch.bfloat16) for n in names}
    base_bf16 = {n: weights[n].to(torch.bfloat16) for n in names}
    residual = {n: torch.zeros_like(weights[n], dtype=torch.float32) for n in names}
    rows = []
    for task, update in enumerate(updates):
        lost = kept = 0
        for n, u in update.items():
            exact[n] += u.double()
            fp32[n] += u
            before = bf16[n]
            bf16[n] = (bf16[n].float() + u).to(torch.bfloat16)
            nonzero = u != 0
            kept += int(nonzero.sum())
            lost += int((nonzero & (bf16[n] == before)).sum())
            residual[n] += u
        options = {  # option → (start, merged)
            "fp32_base": (weights, fp32),
            "bf16_base": (base_bf16, bf16),
            "bf16_base_fp32_master": (weights, fp32),
            "bf16_base_fp32_master (compute copy)": (base_bf16, {n: fp32[n].to(torch.bfloat16) for n in names}),
            "bf16_base_fp32_residual": (base_bf16, {n: base_bf16[n].float() + residual[n] for n in names}),
        }
        added = torch.cat([(exact[n] - weights[n].double()).flatten() for n in names])
        for option, (start, merged) in options.items():
            got = torch.cat([(merged[n].double() - start[n].double()).flatten() for n in names])
            max_abs, rel = errors(got, added, added)
            rows.append({"after_task": task, "option": option, "max_abs": max_abs, "rel_to_updates": rel})
        rows.append({"after_task": task, "option": "bf16_base", "kept_entries": kept, "vanished_entries": lost})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", help="a run's checkpoint/ folder (update_NNN.safetensors)")
    parser.add_argument("--like", type=Path, default=None, help="draw updates shaped like this run's (see above)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if (args.checkpoint is None) == (args.like is None):
        raise SystemExit("error: give a checkpoint folder or --like RUN, one of them")
    modules = dict(load_model(args.model).model.named_modules())
    if args.like is not None:
        weights = {n: m.weight.detach().float() for n, m in modules.items() if n.endswith(("q_proj", "v_proj"))}
        updates = updates_like(args.like, weights)
    else:
        updates = load_updates(args.checkpoint)
        weights = {n: modules[n].weight.detach().float() for u in updates for n in u}
    rows = replay(weights, updates)
    print("| after task | option | max abs error of Σ U | ‖E‖ / ‖Σ U‖ | this task's kept entries lost |")
    print("|---|---|---|---|---|")
    lost = {r["after_task"]: r for r in rows if "kept_entries" in r}
    for r in rows:
        if "max_abs" not in r:
            continue
        gone = lost[r["after_task"]] if r["option"] == "bf16_base" else None
        share = f"{100 * gone['vanished_entries'] / max(gone['kept_entries'], 1):.1f} %" if gone else ""
        print(f"| {r['after_task'] + 1} | {r['option']} | {r['max_abs']:.3g} | {r['rel_to_updates']:.3g} | {share} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
