"""Which compute precision a run uses. ``--mixed-precision bf16`` on CPU is Accelerate's bf16 autocast;
``auto`` picks it on CPUs that multiply bf16 natively and fp32 everywhere else.

What stays float32 under bf16 autocast: the base weights (so every end-of-task merge is exact to float32
rounding), the LoRA factors, θ, ΔW = B·A and its gate, and the optimizer state; only the activation
matmuls run in bf16. Without native bf16 (AVX2-only CPUs) autocast emulates it and gains little, so
``auto`` stays fp32 there; on a GPU ``auto`` is fp32 as before (ask for ``bf16`` explicitly). The default
is ``no`` (fp32): docs/PERFORMANCE.md ("bf16 on CPU") has the measurements and why it is not ``auto`` yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """The resolved choice: what Accelerate is given (``no`` | ``fp16`` | ``bf16``) and why."""

    requested: str
    mixed_precision: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"requested": self.requested, "mixed_precision": self.mixed_precision, "reason": self.reason}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU has bf16 dot-product instructions (oneDNN uses them)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def runs_on_cpu(force_cpu: bool) -> bool:
    """Where Accelerate will put the run: the CPU when forced or when no CUDA/XPU/MPS device is present."""
    if force_cpu:
        return True
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def resolve_precision(requested: str, force_cpu: bool) -> Precision:
    """``auto`` → bf16 on a CPU run with native bf16, else ``no``; any other value is taken as given."""
    if requested != "auto":
        return Precision(requested, requested, "asked for")
    if not runs_on_cpu(force_cpu):
        return Precision(requested, "no", "auto: fp32 on an accelerator (pass --mixed-precision bf16 to use it)")
    if cpu_has_native_bf16():
        return Precision(requested, "bf16", "auto: CPU with native bf16 (AVX512-BF16/AMX); fp32 weights")
    return Precision(requested, "no", "auto: this CPU has no native bf16, fp32 is faster")
