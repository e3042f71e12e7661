"""The symmetric JumpReLU gate on the entries of a LoRA update, and its straight-through θ-gradient.

J(x; θ) = x · 1[|x| > θ]. The gate is a step function of θ, so θ gets its gradient from the
straight-through estimator of JumpReLU sparse autoencoders (Rajamanoharan et al., 2024) with a
rectangle kernel K(u) = 1[|u| < ½] of width ε (the *bandwidth*).

Symmetric gate as two one-sided JumpReLUs: J(x) = jr(x) − jr(−x). Each side contributes
−(θ/ε)·K((±x − θ)/ε)·g_side, where g_side is the gradient reaching that side's output
(+g for the positive side, −g for the negative side). Only the side whose jump is near x fires, so the
sum is −(θ/ε)·sign(x)·K((|x| − θ)/ε)·g: raising θ pulls an entry that sits just above the
threshold towards zero, whatever its sign.

Reduction over the entries of one matrix: ``"mean"`` (default, as the public JumpLoRA release does)
makes the θ step independent of the matrix size, so a threshold shared by modules of different shapes
is not dominated by the largest one; ``"sum"`` is the exact pseudo-derivative of the summed loss.
"""

from __future__ import annotations

from typing import Literal

import torch

Reduction = Literal["mean", "sum"]


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel K(u) = 1[|u| < ½]."""
    return (u.abs() < 0.5).to(u.dtype)


def threshold_grad(
    x: torch.Tensor,
    theta: torch.Tensor,
    grad_gate_out: torch.Tensor,
    bandwidth: float,
    reduction: Reduction,
) -> torch.Tensor:
    """Pseudo-derivative of ⟨grad, J(x; θ)⟩ with respect to a scalar θ (see the module docstring)."""
    theta32 = theta.float()
    x32 = x.float()
    kernel = rectangle((x32.abs() - theta32) / bandwidth)
    per_entry = -(theta32 / bandwidth) * torch.sign(x32) * kernel * grad_gate_out.float()
    reduced = per_entry.mean() if reduction == "mean" else per_entry.sum()
    return reduced.reshape(theta.shape).to(theta.dtype)


class _SymmetricJumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, theta: torch.Tensor, bandwidth: float, reduction: Reduction):
        open_gate = x.abs() > theta
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        ctx.reduction = reduction
        return x * open_gate

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, theta = ctx.saved_tensors
        grad_x = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out * (x.abs() > theta)
        if ctx.needs_input_grad[1]:
            grad_theta = threshold_grad(x, theta, grad_out, ctx.bandwidth, ctx.reduction)
        return grad_x, grad_theta, None, None


def jumprelu(
    x: torch.Tensor, theta: torch.Tensor, bandwidth: float = 1e-3, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Symmetric JumpReLU x·1[|x| > θ] with a straight-through θ-gradient.

    ``theta`` is a scalar tensor (one threshold for the whole matrix); gradients to ``x`` pass only
    where the gate is open.
    """
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return _SymmetricJumpReLU.apply(x, theta, bandwidth, reduction)
