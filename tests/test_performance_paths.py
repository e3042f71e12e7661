"""The fast paths of the JumpLoRA layer give the straightforward formulation's numbers (no timing here)."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from jumplora.adapters import (
    JumpLoraConfig,
    init_thresholds_to_budget,
    jumplora_layers,
    jumprelu,
    set_gamma,
)


def make_layer(gamma: float, *, reduction: str = "mean", bias: bool = True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 24, bias=bias)).to(dtype)
    cfg = JumpLoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False, bandwidth=0.05,
        threshold_reduction=reduction,
    )  # fmt: skip
    pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False)
    init_thresholds_to_budget(pm, target_density=0.3)
    set_gamma(pm, gamma)
    return pm, next(m for _, m in jumplora_layers(pm))


def textbook(layer, x: torch.Tensor, gamma: float) -> torch.Tensor:
    """x·Wᵀ + b + x·(s·ΔW_eff)ᵀ written out from the equations (autograd does the backward)."""
    a, b = layer.jumplora_A["default"], layer.jumplora_B["default"]
    delta = b @ a
    gated = jumprelu(delta, layer.theta("default"), layer.bandwidth["default"], layer.reduction["default"])
    eff = gamma * gated + (1 - gamma) * delta
    base = layer.base_layer
    return nn.functional.linear(x, base.weight, base.bias) + x @ (layer.scaling["default"] * eff).t()


def grads(layer, x, out, weight_too=False):
    params = [layer.jumplora_A["default"], layer.jumplora_B["default"], layer.jumplora_theta["default"]]
    if weight_too:
        params.append(layer.base_layer.weight)
    wrt = [x, *params]
    g = torch.autograd.grad(out.sin().sum(), wrt, allow_unused=True)
    return [torch.zeros_like(w, dtype=torch.float64) if t is None else t.double() for t, w in zip(g, wrt, strict=True)]


def assert_grads_close(got, want):
    """x, A, B (and W) in float64; θ is a float32 parameter whose STE band is evaluated in float32."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        tol = {"rtol": 1e-5, "atol": 1e-7} if i == 3 else {"rtol": 1e-9, "atol": 1e-12}
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [(3, 7), (4, 9)])  # fewer / more tokens than outputs: W_eff rebuilt / kept
def test_fast_path_matches_textbook_in_float64(gamma, reduction, bias, tokens):
    pm, layer = make_layer(gamma, reduction=reduction, bias=bias)
    x = torch.randn(*tokens, 40, dtype=torch.float64, requires_grad=True)
    fast = pm(x)
    ref = textbook(layer, x, gamma)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(layer, x, fast), grads(layer, x, ref))


def test_theta_gradient_is_exercised():
    """The budget init puts entries inside the STE band, so the θ-gradient comparison above is not 0 = 0."""
    _, layer = make_layer(0.5)
    delta = layer.delta_weight("default").detach()
    theta = layer.theta("default").detach()
    assert int(((delta.abs() - theta).abs() < layer.bandwidth["default"] / 2).sum()) > 0
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    g_theta = grads(layer, x, layer(x))[3]
    assert g_theta.abs() > 0


def test_trainable_base_weight_gets_the_textbook_gradient():
    pm, layer = make_layer(0.6)
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    got = grads(layer, x, pm(x), weight_too=True)
    want = grads(layer, x, textbook(layer, x, 0.6), weight_too=True)
    assert_grads_close(got, want)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_fused_path_keeps_no_weight_sized_tensor_for_backward(gamma):
    """Only x and references to parameters are saved; the textbook graph keeps ΔW-sized tensors."""
    pm, layer = make_layer(gamma, dtype=torch.float32)
    params = {p.data_ptr() for p in pm.parameters()} | {layer.theta("default").data_ptr()}
    x = torch.randn(2, 40, requires_grad=True)

    def new_saved(fn) -> list[torch.Tensor]:
        saved: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return [t for t in saved if t.data_ptr() not in params and t.data_ptr() != x.data_ptr()]

    weight_numel = layer.base_layer.weight.numel()
    fast = new_saved(lambda: pm(x))
    assert all(t.numel() < weight_numel for t in fast), [tuple(t.shape) for t in fast]
    ref = new_saved(lambda: textbook(layer, x, gamma))
    assert any(t.numel() >= weight_numel for t in ref)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_fused_path_keeps_w_eff_only_when_x_is_larger(gamma):
    """With at least as many tokens as output features, W_eff (no larger than x) is kept for ∂L/∂x."""
    pm, layer = make_layer(gamma, dtype=torch.float32)
    weight = layer.base_layer.weight
    for tokens, kept in ((23, False), (24, True), (60, True)):
        x = torch.randn(tokens, 40, requires_grad=True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, into=saved: into.append(t) or t, lambda t: t):
            out = pm(x)
        others = (weight.data_ptr(), x.data_ptr())
        w_eff = [t for t in saved if t.shape == weight.shape and t.data_ptr() not in others]
        assert len(w_eff) == int(kept)
        if kept:
            torch.testing.assert_close(w_eff[0], weight + layer.effective_delta("default").detach())
        out.sum().backward()  # the kept W_eff serves the backward
        assert torch.isfinite(x.grad).all()


def test_gamma_zero_never_builds_delta_w(monkeypatch):
    """The dense warm-up is plain LoRA: no B·A product (the fused Function is not called)."""
    from jumplora.adapters import layer as layer_module

    pm, _ = make_layer(0.0, dtype=torch.float32)
    called = []
    monkeypatch.setattr(layer_module._FusedJumpLoraLinear, "apply", lambda *a: called.append(1))
    pm(torch.randn(3, 40)).sum().backward()
    assert not called


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_bf16_base_with_float32_adapter_runs_and_is_close(gamma):
    """PEFT keeps adapter weights in float32 on a bf16 model; the fused path mixes the two."""
    pm32, layer32 = make_layer(gamma, dtype=torch.float32, seed=3)
    pm16, layer16 = make_layer(gamma, dtype=torch.float32, seed=3)
    layer16.base_layer.to(torch.bfloat16)
    x = torch.randn(4, 40)
    out16 = pm16(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    out16.float().square().sum().backward()
    pm32(x.bfloat16().float()).square().sum().backward()
    a16, a32 = layer16.jumplora_A["default"], layer32.jumplora_A["default"]
    assert a16.dtype == torch.float32 and torch.isfinite(a16.grad).all()
    torch.testing.assert_close(out16.float(), pm32(x.bfloat16().float()), rtol=0.05, atol=0.05)
    cos = nn.functional.cosine_similarity(a16.grad.flatten(), a32.grad.flatten(), dim=0)
    assert cos > 0.98
