"""The JumpLoRA layer: a LoRA adapter on an ``nn.Linear`` whose update ΔW = B·A is gated entry-wise.

Effective update (scale s = α/r):  s · (γ·ΔW·1[|ΔW|>θ] + (1−γ)·ΔW).

Three forward paths give the same numbers and differ in cost:
- γ = 0 (dense warm-up, or ``sparse=False``): plain low-rank LoRA, x·Aᵀ·Bᵀ, never forming ΔW.
- fused (γ > 0, one active adapter, no dropout): a single ``F.linear`` with W + s·ΔW_eff. The backward
  recomputes ΔW and its mask from A and B instead of storing them, and pays one weight-sized matmul
  (gᵀx, the dense gradient of ΔW that the θ-gradient and the gate need).
- reference (anything else): the straightforward formulation x·Wᵀ + s·x·ΔW_effᵀ with autograd.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import kernels, residual
from .config import JumpLoraConfig
from .jumprelu import jumprelu
from .targets import weight_is_transposed


class _FusedJumpLoraLinear(torch.autograd.Function):
    """y = x·(W + s·ΔW_eff)ᵀ + b in one matmul; the backward rebuilds ΔW from A and B.

    The weight-sized steps (build W_eff; gate ∂L/∂W_eff and take the θ-gradient) are
    :mod:`~jumplora.adapters.kernels`: one Triton kernel each on a GPU, a few torch ops elsewhere. θ
    enters raw (log θ or θ), so no per-layer ``exp`` node is recorded.

    Saved for backward: x (which the base layer's own backward keeps too), references to W, A, B and θ,
    and W_eff only when it is no larger than x (at least as many tokens as output features): then keeping
    it costs less memory than PEFT's float32 copy of x, and saves rebuilding it for ∂L/∂x. With fewer
    tokens it is recomputed, so nothing weight-sized outlives the forward.

    Under autocast (``--mixed-precision bf16``) the two activation-sized matmuls of the forward and the
    backward run in the autocast dtype; W_eff is built, and ΔW gated, in float32 (:func:`kernels.full_precision`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, theta_raw, log_theta, scaling, gamma, bandwidth, reduction):
        w_eff = kernels.effective_weight(weight, lora_A, lora_B, theta_raw, log_theta, scaling, gamma)
        out = F.linear(x.to(weight.dtype), w_eff, bias)
        device = x.device.type
        ctx.compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        keep_w_eff = ctx.needs_input_grad[0] and x.numel() >= w_eff.numel()
        ctx.save_for_backward(x, weight, lora_A, lora_B, theta_raw, w_eff if keep_w_eff else None)
        ctx.log_theta, ctx.scaling, ctx.gamma, ctx.bandwidth, ctx.reduction = (
            log_theta, scaling, gamma, bandwidth, reduction
        )
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, theta_raw, w_eff = ctx.saved_tensors
        needs_x, needs_w, needs_b, needs_A, needs_B, needs_theta = ctx.needs_input_grad[:6]
        grad_x = grad_w = grad_b = grad_A = grad_B = grad_theta = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if needs_x:
            if w_eff is None:
                w_eff = kernels.effective_weight(
                    weight, lora_A, lora_B, theta_raw, ctx.log_theta, ctx.scaling, ctx.gamma
                )
            grad_x = _matmul(grad_out, w_eff, ctx.compute_dtype).to(x.dtype)
            del w_eff
        if needs_A or needs_B or needs_theta or needs_w:
            x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
            grad_w_eff = _matmul(g2.t(), x2, ctx.compute_dtype)  # the weight-sized matmul sparsity cannot avoid
            if needs_w:
                grad_w = grad_w_eff.to(weight.dtype)
            if needs_A or needs_B or needs_theta:
                grad_delta, factor, grad_theta = kernels.update_grad(
                    grad_w_eff, lora_A, lora_B, theta_raw, ctx.log_theta, ctx.scaling, ctx.gamma,
                    ctx.bandwidth, ctx.reduction, needs_theta,
                )  # fmt: skip
                del grad_w_eff
                if needs_A:
                    grad_A = lora_B.t() @ grad_delta
                    if factor != 1.0:
                        grad_A.mul_(factor)
                if needs_B:
                    grad_B = grad_delta @ lora_A.t()
                    if factor != 1.0:
                        grad_B.mul_(factor)
        if needs_b and ctx.has_bias:
            grad_b = g2.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, grad_theta, None, None, None, None, None


def _matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b in ``dtype`` (the forward's autocast dtype; None: as given, which must then agree)."""
    if dtype is None:
        return a @ b.to(a.dtype)
    return a.to(dtype) @ b.to(dtype)


class JumpLoraLayer(BaseTunerLayer):
    """State of JumpLoRA adapters on one layer (PEFT's multi-adapter bookkeeping included)."""

    adapter_layer_names = ("jumplora_A", "jumplora_B", "jumplora_theta")
    other_param_names = ("r", "lora_alpha", "scaling", "jumplora_dropout", "gamma", "threshold_group")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.gamma: dict[str, float] = {}
        self.sparse: dict[str, bool] = {}
        self.threshold_group: dict[str, str] = {}
        self.threshold_param: dict[str, str] = {}
        self.bandwidth: dict[str, float] = {}
        self.reduction: dict[str, str] = {}
        self.fused: dict[str, bool] = {}
        self.init_threshold: dict[str, float] = {}
        self.jumplora_A = nn.ParameterDict({})
        self.jumplora_B = nn.ParameterDict({})
        # The θ parameter is shared by every layer of its group (the same Parameter object), so the
        # optimizer sees it once; PEFT's save de-duplicates shared storage.
        self.jumplora_theta = nn.ParameterDict({})
        self.jumplora_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif weight_is_transposed(base):  # transformers' Conv1D: weight is (in, out)
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(f"JumpLoRA supports nn.Linear (and GPT-2's Conv1D), got {type(base).__name__}")
        self.kwargs = kwargs

    def update_layer(
        self, adapter_name: str, config: JumpLoraConfig, theta: nn.Parameter, group: str, inference_mode: bool
    ) -> None:
        r = config.r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.gamma[adapter_name] = float(config.gamma) if config.sparse else 0.0
        self.sparse[adapter_name] = config.sparse
        self.threshold_group[adapter_name] = group
        self.threshold_param[adapter_name] = config.threshold_param
        self.bandwidth[adapter_name] = config.bandwidth
        self.reduction[adapter_name] = config.threshold_reduction
        # The fused path folds ΔW into the weight it reads; a quantized weight takes the reference path.
        self.fused[adapter_name] = config.fused and not residual.is_quantized(self.get_base_layer())
        self.init_threshold[adapter_name] = config.init_threshold
        self.jumplora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        lora_A = torch.empty(r, self.in_features, device=weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        lora_B = torch.zeros(self.out_features, r, device=weight.device, dtype=dtype)
        if not config.init_lora_weights:
            nn.init.normal_(lora_B, std=1.0 / r)
        self.jumplora_A[adapter_name] = nn.Parameter(lora_A)
        self.jumplora_B[adapter_name] = nn.Parameter(lora_B)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        # After the move: PEFT's move casts every adapter tensor to the base weight's dtype, which for a
        # bf16/fp16 model would replace the shared float32 θ by a per-layer copy (and round it).
        self.jumplora_theta[adapter_name] = theta
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # -- the math --------------------------------------------------------------------------------
    def theta(self, adapter: str) -> torch.Tensor:
        """θ as a one-element float32 tensor (differentiable in the raw parameter)."""
        raw = self.jumplora_theta[adapter]
        return raw.exp() if self.threshold_param[adapter] == "log" else raw

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = B·A (unscaled, ungated), in the (out, in) layout of ``nn.Linear``; in the factors' float32
        under autocast, so the gate, the θ-gradient and the merged update never see a bf16 ΔW."""
        lora_B = self.jumplora_B[adapter]
        with kernels.full_precision(lora_B):
            return lora_B @ self.jumplora_A[adapter]

    def support(self, adapter: str) -> torch.Tensor:
        """Boolean mask of the entries the merge keeps: |ΔW| > θ (all True for a dense adapter)."""
        with torch.no_grad():
            delta = self.delta_weight(adapter)
            if not self.sparse[adapter]:
                return torch.ones_like(delta, dtype=torch.bool)
            return delta.abs() > self.theta(adapter)

    def effective_delta(self, adapter: str, gamma: float | None = None) -> torch.Tensor:
        """s·ΔW_eff, differentiable (θ through the straight-through estimator)."""
        gamma = self.gamma[adapter] if gamma is None else gamma
        delta = self.delta_weight(adapter)
        if gamma == 0.0 or not self.sparse[adapter]:
            return delta * self.scaling[adapter]
        gated = jumprelu(delta, self.theta(adapter), self.bandwidth[adapter], self.reduction[adapter])
        eff = gated if gamma == 1.0 else gamma * gated + (1.0 - gamma) * delta
        return eff * self.scaling[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """What the end-of-task merge adds to W: s·(ΔW ⊙ 1[|ΔW|>θ]), in the base weight's layout."""
        with torch.no_grad():
            delta = self.delta_weight(adapter)
            if self.sparse[adapter]:
                delta = delta * (delta.abs() > self.theta(adapter))
            delta = delta * self.scaling[adapter]
        return delta.t() if self._fan_in_fan_out else delta

    @property
    def _fan_in_fan_out(self) -> bool:
        return weight_is_transposed(self.get_base_layer())


class Linear(nn.Module, JumpLoraLayer):
    """JumpLoRA on a linear layer (``nn.Linear`` or transformers' ``Conv1D``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: JumpLoraConfig,
        theta: nn.Parameter,
        group: str,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        JumpLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, theta, group, inference_mode=config.inference_mode)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Adapters saved before θ became 1-D hold a 0-dim θ: read it as the one-element θ it is."""
        for key in [k for k in state_dict if k.startswith(prefix + "jumplora_theta.")]:
            if state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _base_weight_out_in(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return weight.t() if self._fan_in_fan_out else weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.jumplora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)

        if len(active) == 1:
            adapter = active[0]
            gamma = self.gamma[adapter]
            dropout = self.jumplora_dropout[adapter]
            lora_A, lora_B = self.jumplora_A[adapter], self.jumplora_B[adapter]
            if gamma == 0.0 or not self.sparse[adapter]:
                result = self.base_layer(x, *args, **kwargs)
                h = dropout(x.to(lora_A.dtype)) @ lora_A.t()
                return result + ((h @ lora_B.t()) * self.scaling[adapter]).to(result.dtype)
            if self.fused[adapter] and isinstance(dropout, nn.Identity):
                base = self.get_base_layer()
                return _FusedJumpLoraLinear.apply(
                    x,
                    self._base_weight_out_in(),
                    base.bias,
                    lora_A,
                    lora_B,
                    self.jumplora_theta[adapter],
                    self.threshold_param[adapter] == "log",
                    self.scaling[adapter],
                    gamma,
                    self.bandwidth[adapter],
                    self.reduction[adapter],
                )
        return self.forward_reference(x, *args, **kwargs)

    def forward_reference(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The straightforward formulation: base output + x·(s·ΔW_eff)ᵀ for every active adapter."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.jumplora_A:
                continue
            update = self.effective_delta(adapter)
            x_in = self.jumplora_dropout[adapter](x.to(update.dtype))
            result = result + F.linear(x_in, update).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add s·(ΔW ⊙ 1[|ΔW|>θ]) of each adapter into the base weight (γ = 1 whatever the schedule)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.jumplora_A:
                continue
            if residual.is_quantized(base):  # never into a quantized weight: an exact float32 residual
                residual.add_to_residual(base, self.get_delta_weight(adapter), check_finite=safe_merge)
                self.merged_adapters.append(adapter)
                continue
            delta = self.get_delta_weight(adapter).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs in the merged weights of adapter {adapter!r}")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.jumplora_A and residual.is_quantized(base):
                residual.add_to_residual(base, self.get_delta_weight(adapter), sign=-1.0)
            elif adapter in self.jumplora_A:
                base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)

    def __repr__(self) -> str:
        return "jumplora." + super().__repr__()
