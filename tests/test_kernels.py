"""The Triton kernels give the torch ops' numbers (Triton's CPU interpreter here; CUDA with TRITON_INTERPRET=0)."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from test_performance_paths import textbook
from torch import nn

from jumplora.adapters import JumpLoraConfig, init_thresholds_to_budget, jumplora_layers, kernels, set_gamma

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.triton_interpreted() else "cpu"
if DEVICE == "cpu" and not kernels.triton_interpreted():
    pytest.skip("no GPU and Triton's interpreter is off", allow_module_level=True)


def tie_free_theta(delta: torch.Tensor, density: float) -> float:
    """A threshold halfway between two neighbouring |ΔW| values, so no entry sits on it (a tie would flip
    with the last bit of exp(log θ), which the two backends compute differently)."""
    mags = delta.abs().flatten().sort(descending=True).values
    k = max(1, int(density * mags.numel()))
    return float((mags[k - 1] + mags[k]) / 2)


def make_operands(n_out, n_in, r, dtype, transposed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (n_in, n_out) if transposed else (n_out, n_in)
    weight = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    weight = weight.t() if transposed else weight  # GPT-2's Conv1D hands the kernel a transposed view
    lora_A = (torch.randn(r, n_in, generator=gen) * 0.3).to(DEVICE)
    lora_B = (torch.randn(n_out, r, generator=gen) * 0.3).to(DEVICE)
    return weight, lora_A, lora_B


def raw_theta(theta: float, log_theta: bool) -> torch.Tensor:
    value = torch.tensor(theta, dtype=torch.float32)
    return (value.log() if log_theta else value).to(DEVICE)


SHAPES = [(70, 100, 4, False), (64, 128, 8, False), (50, 33, 8, True), (130, 65, 16, False)]


@pytest.mark.parametrize(("n_out", "n_in", "r", "transposed"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log_theta", [True, False])
@pytest.mark.parametrize("gamma", [0.35, 1.0])
def test_effective_weight_matches_torch_ops(n_out, n_in, r, transposed, dtype, log_theta, gamma):
    weight, lora_A, lora_B = make_operands(n_out, n_in, r, dtype, transposed)
    theta = raw_theta(tie_free_theta(lora_B @ lora_A, 0.3), log_theta)
    with kernels.use_backend("torch"):
        want = kernels.effective_weight(weight, lora_A, lora_B, theta, log_theta, 4.0, gamma)
    with kernels.use_backend("triton"):
        got = kernels.effective_weight(weight, lora_A, lora_B, theta, log_theta, 4.0, gamma)
    assert got.dtype == dtype and got.shape == (n_out, n_in) and got.is_contiguous()
    # torch ops round the update to W's dtype before the add; the kernel adds in float32 and rounds once
    tol = {"rtol": 1e-6, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 3e-2}
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if dtype == torch.float32:  # the gate is exercised: at γ = 1 exactly the open entries change
        changed = got != weight
        open_gate = (lora_B @ lora_A).abs() > tie_free_theta(lora_B @ lora_A, 0.3)
        assert torch.equal(changed, open_gate) if gamma == 1.0 else changed.all()


@pytest.mark.parametrize(("n_out", "n_in", "r", "transposed"), SHAPES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log_theta", [True, False])
@pytest.mark.parametrize("gamma", [0.35, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_update_grad_matches_torch_ops(n_out, n_in, r, transposed, grad_dtype, log_theta, gamma, reduction):
    _, lora_A, lora_B = make_operands(n_out, n_in, r, torch.float32, transposed)
    grad_w_eff = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(1)).to(DEVICE, grad_dtype)
    delta = lora_B @ lora_A
    theta_value = tie_free_theta(delta, 0.3)
    bandwidth = 0.3 * theta_value  # wide enough that many entries are in the band
    theta = raw_theta(theta_value, log_theta)
    args = (grad_w_eff, lora_A, lora_B, theta, log_theta, 4.0, gamma, bandwidth, reduction, True)
    with kernels.use_backend("torch"):
        want_d, want_c, want_theta = kernels.update_grad(*args)
    with kernels.use_backend("triton"):
        got_d, got_c, got_theta = kernels.update_grad(*args)
    torch.testing.assert_close(got_d * got_c, want_d * want_c, rtol=1e-6, atol=1e-6)
    in_band = ((delta.abs() - theta_value).abs() < bandwidth / 2).sum()
    assert in_band > 10 and want_theta.abs() > 0
    assert got_theta.shape == theta.shape and got_theta.dtype == torch.float32
    torch.testing.assert_close(got_theta, want_theta, rtol=1e-4, atol=1e-9)


def test_update_grad_without_theta():
    _, lora_A, lora_B = make_operands(40, 24, 4, torch.float32, False)
    grad = torch.randn(40, 24).to(DEVICE)
    theta = raw_theta(tie_free_theta(lora_B @ lora_A, 0.5), True)
    with kernels.use_backend("triton"):
        got_d, got_c, got_theta = kernels.update_grad(grad, lora_A, lora_B, theta, True, 2.0, 1.0, 1e-3, "mean", False)
    assert got_theta is None
    open_gate = (lora_B @ lora_A).abs() > theta.exp()
    torch.testing.assert_close(got_d * got_c, 2.0 * grad * open_gate)


def make_layer(gamma: float, threshold_param: str, reduction: str = "mean", seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 72)).to(DEVICE)
    cfg = JumpLoraConfig(
        r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False, bandwidth=0.05,
        threshold_param=threshold_param, threshold_reduction=reduction,
    )  # fmt: skip
    pm = peft.get_peft_model(model, cfg)
    init_thresholds_to_budget(pm, target_density=0.3)
    set_gamma(pm, gamma)
    return pm, next(m for _, m in jumplora_layers(pm))


@pytest.mark.parametrize("gamma", [0.5, 1.0])
@pytest.mark.parametrize("threshold_param", ["log", "direct"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_layer_on_triton_matches_the_textbook(gamma, threshold_param, reduction):
    pm, layer = make_layer(gamma, threshold_param, reduction)
    x = torch.randn(4, 9, 96, device=DEVICE, requires_grad=True)
    params = [x, layer.jumplora_A["default"], layer.jumplora_B["default"], layer.jumplora_theta["default"]]
    with kernels.use_backend("triton"):
        fast = pm(x)
        got = torch.autograd.grad(fast.sin().sum(), params)
    ref = textbook(layer, x, gamma)
    want = torch.autograd.grad(ref.sin().sum(), params)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert want[3].abs() > 0  # θ-gradient present, so the comparison below is not 0 = 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5)


def test_bf16_model_step_is_the_same_on_both_backends(tiny_bert_config):
    """A bf16 BERT with float32 adapters (PEFT's default): one training step, torch ops vs kernels."""
    from transformers import BertModel

    results = []
    probe = torch.randn(3, 11, tiny_bert_config.hidden_size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = BertModel(tiny_bert_config).to(DEVICE, torch.bfloat16)
        cfg = JumpLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], init_lora_weights=False)
        pm = peft.get_peft_model(model, cfg)
        init_thresholds_to_budget(pm)
        set_gamma(pm, 0.5)
        ids = torch.randint(1000, 2000, (3, 11), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        with kernels.use_backend(backend):
            hidden = pm(input_ids=ids).last_hidden_state.float()
            loss = (hidden * probe).sum()  # not mean(h²): after a LayerNorm that is flat in the weights
            loss.backward()
        grads = {n: p.grad.float().clone() for n, p in pm.named_parameters() if p.grad is not None}
        results.append((loss.detach().float(), grads))
    (loss_t, grads_t), (loss_k, grads_k) = results
    torch.testing.assert_close(loss_k, loss_t, rtol=2e-2, atol=1e-3)
    assert grads_t.keys() == grads_k.keys()
    # bf16 activations make single tiny gradients (a first-layer query) noise; compare the whole direction
    flat_t = torch.cat([g.flatten() for n, g in grads_t.items() if "theta" not in n])
    flat_k = torch.cat([grads_k[n].flatten() for n in grads_t if "theta" not in n])
    cos = nn.functional.cosine_similarity(flat_t, flat_k, dim=0)
    assert cos > 0.99
    thetas = [n for n in grads_t if "theta" in n]
    assert thetas and all(grads_t[n].abs() > 0 for n in thetas)
    for n in thetas:
        torch.testing.assert_close(grads_k[n], grads_t[n], rtol=0.1, atol=0.0)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_bf16_model_with_adapters_in_either_dtype(adapter_dtype):
    """PEFT's autocast_adapter_dtype=False leaves A and B in bf16: the kernels' outputs follow their dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 72)).to(DEVICE, torch.bfloat16)
    cfg = JumpLoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=adapter_dtype == torch.float32)
    init_thresholds_to_budget(pm, target_density=0.3)
    set_gamma(pm, 0.5)
    layer = next(m for _, m in jumplora_layers(pm))
    assert layer.jumplora_A["default"].dtype == adapter_dtype
    x = torch.randn(4, 30, 96, device=DEVICE, dtype=torch.bfloat16)
    params = [layer.jumplora_A["default"], layer.jumplora_B["default"], layer.jumplora_theta["default"]]
    results = []
    for backend in ("torch", "triton"):
        with kernels.use_backend(backend):
            out = pm(x)
            results.append((out.float(), torch.autograd.grad(out.float().square().sum(), params)))
    (out_t, grads_t), (out_k, grads_k) = results
    # bf16 adapters: torch ops round B·A to bf16 before comparing it with θ, the kernels do not, so a few
    # entries within bf16 rounding of θ land on the other side of the gate
    atol = 2e-2 if adapter_dtype == torch.float32 else 1e-1
    torch.testing.assert_close(out_k, out_t, rtol=2e-2, atol=atol)
    for g_t, g_k in zip(grads_t, grads_k, strict=True):
        assert g_k.dtype == g_t.dtype
        cos = nn.functional.cosine_similarity(g_t.float().flatten(), g_k.float().flatten(), dim=0)
        assert cos > 0.98 if g_t.numel() > 1 else torch.allclose(g_k, g_t, rtol=0.1)


def test_backend_choice():
    cpu = torch.zeros(1)
    assert kernels._backend_for(cpu) == "torch"
    with kernels.use_backend("torch"):
        assert kernels._backend_for(cpu) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"), kernels.use_backend("cuda"):
        pass


def test_a_failing_kernel_falls_back_to_torch_ops_once(monkeypatch):
    """Auto choice: a kernel that fails on this machine (driver, architecture) warns and is not retried."""
    weight, lora_A, lora_B = make_operands(20, 12, 4, torch.float32, False)
    theta = raw_theta(tie_free_theta(lora_B @ lora_A, 0.3), True)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(kernels, "_effective_weight_triton", broken)
    monkeypatch.setattr(kernels, "_triton_failure", None)
    monkeypatch.setattr(kernels.torch.Tensor, "is_cuda", property(lambda self: True))  # "auto" picks Triton
    with pytest.warns(RuntimeWarning, match="using torch ops instead"):
        got = kernels.effective_weight(weight, lora_A, lora_B, theta, True, 2.0, 1.0)
    again = kernels.effective_weight(weight, lora_A, lora_B, theta, True, 2.0, 1.0)
    assert len(calls) == 1 and kernels._backend_for(weight) == "torch"
    with kernels.use_backend("torch"):
        want = kernels.effective_weight(weight, lora_A, lora_B, theta, True, 2.0, 1.0)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="no kernel image"):
        kernels.effective_weight(weight, lora_A, lora_B, theta, True, 2.0, 1.0)


COMPILE_SCRIPT = r"""
import itertools, os
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from jumplora.adapters import kernels as K

ints = dict.fromkeys(("n_out", "n_in", "sa0", "sa1", "sb0", "sb1"), "i32")
consts = dict.fromkeys(("LOG_THETA", "R", "BO", "BI"), "constexpr")
cases = [(90, "bf16", True), (90, "bf16", False), (90, "fp32", True), (90, "fp16", True), (80, "bf16", True)]
for capability, dtype, log_theta in cases:
    target = GPUTarget("cuda", capability, 32)
    sig = {"w_ptr": f"*{dtype}", "a_ptr": "*fp32", "b_ptr": "*fp32", "theta_ptr": "*fp32", "out_ptr": f"*{dtype}",
           **ints, "sw0": "i32", "sw1": "i32", "scaling": "fp32", "keep_closed": "fp32", **consts}
    src = ASTSource(K._effective_weight_kernel, sig, {"LOG_THETA": log_theta, "R": 8, "BO": 64, "BI": 64})
    assert triton.compile(src, target=target).asm["cubin"]
    sig = {"g_ptr": f"*{dtype}", "a_ptr": "*fp32", "b_ptr": "*fp32", "theta_ptr": "*fp32", "gd_ptr": "*fp32",
           "part_ptr": "*fp32", **ints, "sg0": "i32", "sg1": "i32", "scaling": "fp32", "keep_closed": "fp32",
           "inv_bandwidth": "fp32", "theta_coef": "fp32", **consts, "NEED_THETA": "constexpr"}
    src = ASTSource(K._update_grad_kernel, sig,
                    {"LOG_THETA": log_theta, "NEED_THETA": True, "R": 8, "BO": 64, "BI": 64})
    assert triton.compile(src, target=target).asm["cubin"]
print("compiled", len(cases) * 2)
"""


def test_kernels_compile_to_gpu_code_without_a_gpu():
    """The interpreter checks the kernels' arithmetic; this checks that Triton's compiler accepts them and
    produces machine code for Hopper (sm_90) and Ampere (sm_80), which the interpreter never tries."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("compiled 10")
