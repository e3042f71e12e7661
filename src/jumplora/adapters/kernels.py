"""The two weight-sized steps of the fused JumpLoRA layer, as torch ops (any device) or Triton kernels (CUDA).

- :func:`effective_weight`: W + s·(γ·ΔW·1[|ΔW|>θ] + (1−γ)·ΔW) with ΔW = B·A, in W's dtype.
- :func:`update_grad`: from G = ∂L/∂W_eff, the gated ∂L/∂ΔW and the straight-through gradient of the raw
  threshold parameter (θ itself, or log θ).

Why Triton on a GPU: with torch ops each step is ~5–10 ops over a weight-sized tensor, and at fine-tuning
batch sizes a GPU training step is bound by the host issuing ops (an H200 sat idle for 30–75 % of a
bf16 T5-large/LLaMA-1B step in bench/speed.py), not by arithmetic. One Triton kernel per step rebuilds
the rank-r product tile by tile in registers, so ΔW is never written to memory, θ is read (and exp'd) in
the kernel, and the θ-gradient is reduced per tile: the fused layer then issues fewer ops and kernels
than PEFT's LoRA (docs/PERFORMANCE.md has the counts).

The backend is picked per call: Triton for CUDA tensors when Triton is importable, torch ops otherwise.
``JUMPLORA_KERNELS=torch`` forces torch ops (e.g. to rule the kernels out while debugging);
:func:`use_backend` does the same in code. The tests run the kernels on CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1``, set in ``tests/conftest.py`` when no GPU run is asked for).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Literal

import torch

try:  # Triton ships with CUDA builds of torch; CPU installs do without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without Triton
    triton = None
    tl = None

Backend = Literal["auto", "torch", "triton"]
_BACKENDS = ("auto", "torch", "triton")
_backend_override: Backend | None = None
_triton_failure: str | None = None  # set when a kernel failed on this machine: "auto" then uses torch ops
_BLOCK = 64  # 64×64 tiles: 256 programs for a 1024×1024 weight, enough to fill an H200's 132 SMs


def triton_available() -> bool:
    return triton is not None


def triton_interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before Triton's import)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)  # Triton ≥ 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Force a backend inside the block; ``triton`` on CPU tensors needs Triton's interpreter (tests)."""
    global _backend_override
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton" and triton is None:
        raise RuntimeError("the Triton backend was asked for, but Triton is not installed")
    previous, _backend_override = _backend_override, backend
    try:
        yield
    finally:
        _backend_override = previous


def _backend_for(t: torch.Tensor) -> Backend:
    chosen = _backend_override or os.environ.get("JUMPLORA_KERNELS", "auto")
    if chosen not in _BACKENDS:
        raise ValueError(f"JUMPLORA_KERNELS must be one of {_BACKENDS}, got {chosen!r}")
    if chosen == "auto":
        return "triton" if (t.is_cuda and triton is not None and _triton_failure is None) else "torch"
    if chosen == "triton" and triton is None:
        raise RuntimeError("JUMPLORA_KERNELS=triton, but Triton is not installed")
    if chosen == "triton" and not t.is_cuda and not triton_interpreted():
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before Triton's import)")
    return chosen


# -- torch ops ------------------------------------------------------------------------------------------


def _theta_value(theta_raw: torch.Tensor, log_theta: bool) -> torch.Tensor:
    return theta_raw.exp() if log_theta else theta_raw


def _gate(t: torch.Tensor, open_gate: torch.Tensor, gamma: float) -> torch.Tensor:
    """t ⊙ (γ·1[open] + (1−γ)) as one ``where``; Python scalars only (a device tensor made from a float
    would be a blocking host→device copy)."""
    if gamma == 1.0:
        return torch.where(open_gate, t, 0.0)
    return torch.where(open_gate, t, t * (1.0 - gamma))


def _effective_weight_torch(weight, lora_A, lora_B, theta_raw, log_theta, scaling, gamma):
    delta = lora_B @ lora_A
    update = _gate(delta, delta.abs() > _theta_value(theta_raw, log_theta), gamma)
    del delta
    return torch.add(weight, update.to(weight.dtype), alpha=scaling)


def _update_grad_torch(grad_w_eff, lora_A, lora_B, theta_raw, log_theta, scaling, gamma, bandwidth, reduction,
                       need_theta):  # fmt: skip
    delta = lora_B @ lora_A
    theta = _theta_value(theta_raw, log_theta)
    abs_delta = delta.abs()
    open_gate = abs_delta > theta
    grad_w_eff = grad_w_eff.to(delta.dtype)
    grad_theta = None
    if need_theta:
        grad_theta = _threshold_grad(delta, abs_delta, theta, grad_w_eff, scaling * gamma, bandwidth, reduction)
        if log_theta:  # d/d(log θ) = θ · d/dθ
            grad_theta = grad_theta * theta.float()
        grad_theta = grad_theta.reshape(theta_raw.shape).to(theta_raw.dtype)
    del delta, abs_delta
    # s is left to the caller's rank-r products: one weight-sized pass fewer
    return _gate(grad_w_eff, open_gate, gamma), scaling, grad_theta


def _threshold_grad(delta, abs_delta, theta, grad_w_eff, factor, bandwidth, reduction):
    """−(θ/ε)·factor·Σ sign(ΔW)·K((|ΔW|−θ)/ε)·g over the kernel band only; consumes ``abs_delta``.

    The same number as :func:`~jumplora.adapters.jumprelu.threshold_grad` in fewer weight-sized passes;
    the band is computed in float32 as there.
    """
    theta32 = theta.float()
    dist = abs_delta.float() if abs_delta.dtype != torch.float32 else abs_delta
    inside = dist.sub_(theta32).div_(bandwidth).abs_() < 0.5
    signed = torch.where(inside, torch.sign(delta), 0.0).mul_(grad_w_eff)
    total = signed.sum(dtype=torch.float32)
    if reduction == "mean":
        total = total / signed.numel()
    return -(theta32 / bandwidth) * factor * total


# -- Triton kernels -----------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _delta_tile_and_theta(
        a_ptr, b_ptr, theta_ptr, rows, cols, rmask, cmask, sa0, sa1, sb0, sb1,
        LOG_THETA: tl.constexpr, R: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
    ):  # fmt: skip
        """The (rows × cols) tile of ΔW = B·A as r rank-one updates in float32 registers, and θ."""
        delta = tl.zeros((BO, BI), dtype=tl.float32)
        for k in tl.static_range(R):
            b = tl.load(b_ptr + rows * sb0 + k * sb1, mask=rmask, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + k * sa0 + cols * sa1, mask=cmask, other=0.0).to(tl.float32)
            delta += b[:, None] * a[None, :]
        theta = tl.load(theta_ptr).to(tl.float32)
        if LOG_THETA:
            theta = tl.exp(theta)
        return delta, theta

    @triton.jit
    def _effective_weight_kernel(
        w_ptr, a_ptr, b_ptr, theta_ptr, out_ptr,
        n_out, n_in, sw0, sw1, sa0, sa1, sb0, sb1,
        scaling, keep_closed,
        LOG_THETA: tl.constexpr, R: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BO + tl.arange(0, BO)
        cols = tl.program_id(1) * BI + tl.arange(0, BI)
        rmask, cmask = rows < n_out, cols < n_in
        delta, theta = _delta_tile_and_theta(
            a_ptr, b_ptr, theta_ptr, rows, cols, rmask, cmask, sa0, sa1, sb0, sb1, LOG_THETA, R, BO, BI
        )
        gated = tl.where(tl.abs(delta) > theta, delta, delta * keep_closed)
        mask = rmask[:, None] & cmask[None, :]
        w = tl.load(w_ptr + rows[:, None] * sw0 + cols[None, :] * sw1, mask=mask, other=0.0)
        out = w.to(tl.float32) + scaling * gated
        tl.store(out_ptr + rows[:, None] * n_in + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _update_grad_kernel(
        g_ptr, a_ptr, b_ptr, theta_ptr, gd_ptr, part_ptr,
        n_out, n_in, sg0, sg1, sa0, sa1, sb0, sb1,
        scaling, keep_closed, inv_bandwidth, theta_coef,
        LOG_THETA: tl.constexpr, NEED_THETA: tl.constexpr, R: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
    ):  # fmt: skip
        pid_o, pid_i = tl.program_id(0), tl.program_id(1)
        rows = pid_o * BO + tl.arange(0, BO)
        cols = pid_i * BI + tl.arange(0, BI)
        rmask, cmask = rows < n_out, cols < n_in
        mask = rmask[:, None] & cmask[None, :]
        delta, theta = _delta_tile_and_theta(
            a_ptr, b_ptr, theta_ptr, rows, cols, rmask, cmask, sa0, sa1, sb0, sb1, LOG_THETA, R, BO, BI
        )
        g = tl.load(g_ptr + rows[:, None] * sg0 + cols[None, :] * sg1, mask=mask, other=0.0).to(tl.float32)
        abs_delta = tl.abs(delta)
        grad_delta = tl.where(abs_delta > theta, g, g * keep_closed) * scaling
        tl.store(gd_ptr + rows[:, None] * n_in + cols[None, :], grad_delta.to(gd_ptr.dtype.element_ty), mask=mask)
        if NEED_THETA:
            inside = tl.abs((abs_delta - theta) * inv_bandwidth) < 0.5
            sign = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0))
            total = tl.sum(tl.where(inside & mask, sign * g, 0.0))
            scale = theta_coef * theta  # −(θ/ε)·s·γ (/numel): the θ of the estimator
            if LOG_THETA:
                scale = scale * theta  # chain rule to log θ
            tl.store(part_ptr + pid_o * tl.num_programs(1) + pid_i, total * scale)


def _grid(n_out: int, n_in: int) -> tuple[int, int]:
    return (triton.cdiv(n_out, _BLOCK), triton.cdiv(n_in, _BLOCK))


def _effective_weight_triton(weight, lora_A, lora_B, theta_raw, log_theta, scaling, gamma):
    n_out, n_in = weight.shape
    out = torch.empty((n_out, n_in), dtype=weight.dtype, device=weight.device)
    _effective_weight_kernel[_grid(n_out, n_in)](
        weight, lora_A, lora_B, theta_raw, out,
        n_out, n_in, *weight.stride(), *lora_A.stride(), *lora_B.stride(),
        float(scaling), 1.0 - float(gamma),
        LOG_THETA=log_theta, R=lora_A.shape[0], BO=_BLOCK, BI=_BLOCK,
    )  # fmt: skip
    return out


def _update_grad_triton(grad_w_eff, lora_A, lora_B, theta_raw, log_theta, scaling, gamma, bandwidth, reduction,
                        need_theta):  # fmt: skip
    n_out, n_in = grad_w_eff.shape
    grid = _grid(n_out, n_in)
    # in the adapter's dtype, for the rank-r products with A and B that follow
    grad_delta = torch.empty((n_out, n_in), dtype=lora_A.dtype, device=grad_w_eff.device)
    partials = torch.empty(grid[0] * grid[1] if need_theta else 1, dtype=torch.float32, device=grad_w_eff.device)
    theta_coef = -float(scaling) * float(gamma) / float(bandwidth)
    if reduction == "mean":
        theta_coef /= n_out * n_in
    _update_grad_kernel[grid](
        grad_w_eff, lora_A, lora_B, theta_raw, grad_delta, partials,
        n_out, n_in, *grad_w_eff.stride(), *lora_A.stride(), *lora_B.stride(),
        float(scaling), 1.0 - float(gamma), 1.0 / float(bandwidth), theta_coef,
        LOG_THETA=log_theta, NEED_THETA=need_theta, R=lora_A.shape[0], BO=_BLOCK, BI=_BLOCK,
    )  # fmt: skip
    grad_theta = partials.sum().reshape(theta_raw.shape).to(theta_raw.dtype) if need_theta else None
    return grad_delta, 1.0, grad_theta


# -- the two entry points -----------------------------------------------------------------------------


def effective_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    theta_raw: torch.Tensor,
    log_theta: bool,
    scaling: float,
    gamma: float,
) -> torch.Tensor:
    """W + s·(γ·ΔW·1[|ΔW|>θ] + (1−γ)·ΔW), in W's dtype and the (out, in) layout of ``weight`` (a view is fine).

    ``theta_raw`` is the threshold parameter as stored: log θ when ``log_theta``, else θ. No autograd.
    """
    args = (weight, lora_A, lora_B, theta_raw, log_theta, scaling, gamma)
    return _run(_effective_weight_triton, _effective_weight_torch, args)


def update_grad(
    grad_w_eff: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    theta_raw: torch.Tensor,
    log_theta: bool,
    scaling: float,
    gamma: float,
    bandwidth: float,
    reduction: str,
    need_theta: bool,
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """From G = ∂L/∂W_eff (out, in): (D, c, ∂L/∂θ_raw) with ∂L/∂ΔW = c·D.

    D is G gated by γ·1[|ΔW|>θ] + (1−γ); c is s (torch ops: the caller folds it into the rank-r products)
    or 1 (Triton: folded in the kernel). The θ-gradient is the straight-through estimate with the
    rectangle kernel (:mod:`jumplora.adapters.jumprelu`), taken to log θ when ``log_theta``.
    """
    args = (grad_w_eff, lora_A, lora_B, theta_raw, log_theta, scaling, gamma, bandwidth, reduction, need_theta)
    return _run(_update_grad_triton, _update_grad_torch, args)


def full_precision(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``t``'s device: ΔW = B·A, its gate and the θ-gradient stay in the adapter's float32
    under mixed precision (a bf16 ΔW would move entries across θ and round what the merge adds)."""
    return torch.autocast(t.device.type, enabled=False)


def _run(with_triton, with_torch, args: tuple):
    """The backend for ``args[0]``'s device; a kernel failing on this machine falls back (see below)."""
    with torch.no_grad(), full_precision(args[0]):
        if _backend_for(args[0]) == "triton":
            try:
                return with_triton(*args)
            except Exception as error:  # a Triton/driver mismatch must not stop training
                _fall_back_or_raise(error)
        return with_torch(*args)


def _fall_back_or_raise(error: Exception) -> None:
    """Automatic choice: warn once and use torch ops from now on. Forced Triton: re-raise."""
    global _triton_failure
    forced = (_backend_override or os.environ.get("JUMPLORA_KERNELS", "auto")) == "triton"
    if forced or isinstance(error, torch.OutOfMemoryError):
        raise error
    _triton_failure = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"JumpLoRA's Triton kernels failed on this machine ({_triton_failure.splitlines()[0][:300]}); "
        "using torch ops instead (same numbers, slower on a GPU). Set JUMPLORA_KERNELS=torch to skip them.",
        RuntimeWarning,
        stacklevel=3,
    )
