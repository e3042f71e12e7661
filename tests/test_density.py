"""Density control: θ init after a real update, the paper's rule kept, STE penalty, dual controller, merge guard,
training plot, PEFT registration on `import jumplora`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from jumplora.adapters import (
    JumpLoraConfig,
    Sparsifier,
    SparsitySchedule,
    init_thresholds_to_budget,
    jumplora_layers,
    merge_and_discard,
    set_gamma,
    sparsity_stats,
    theta_learning_rate,
    threshold_parameters,
)
from jumplora.adapters.model import PACKAGED_MINILM_ID, stable_model_name
from jumplora.config import RunConfig

VOCAB = 64


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertModel(cfg)


def peft_bert(seed: int = 0, **kwargs) -> nn.Module:
    config = JumpLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], **kwargs)
    return peft.get_peft_model(tiny_bert(seed), config)


def make_optimizer(pm: nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    """AdamW with θ in its own group at the controller's learning rate (as the engine builds it)."""
    theta_ids = {id(p) for p in threshold_parameters(pm).values()}
    params = [p for p in pm.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in theta_ids]}]
    groups.append({"params": [p for p in params if id(p) in theta_ids], "lr": theta_learning_rate(pm) or lr})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def task_loss(pm: nn.Module, step: int) -> torch.Tensor:
    """A regression task on random tokens: pull the hidden states towards a fixed random target."""
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (4, 8), generator=gen)
    target = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(99))
    return (pm(input_ids=ids).last_hidden_state - target).pow(2).mean()


def train(pm: nn.Module, steps: int, lr: float = 1e-2) -> Sparsifier:
    sparsifier = Sparsifier(pm, steps)
    optimizer = make_optimizer(pm, lr)
    for step in range(steps):
        sparsifier.before_step(step)
        loss = task_loss(pm, step)
        term = sparsifier.loss_term()
        (loss if term is None else loss + term).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sparsifier.after_step(step)
    sparsifier.finish()
    return sparsifier


# -- 1. θ is never set from an all-zero update ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "dual"])
@pytest.mark.parametrize("steps", [1, 2])
def test_very_short_task_sets_theta_from_a_trained_update(steps, mode):
    pm = peft_bert(sparsify_start=0.0, sparsify_end=0.5, density_control=mode)
    sparsifier = train(pm, steps)
    assert sparsifier.initialised_at == (steps if steps == 1 else 1)  # 1 step: at finish(); else after step 1
    density, _ = sparsity_stats(pm)
    target = sparsifier.overall_target()
    assert density < 0.6  # not 100 % from a θ of 1e-38 set on the all-zero update
    if mode == "dual" or steps == 1:  # 'none' drifts with the second step's growth of ΔW
        assert 0.5 * target <= density <= 2 * target, (density, target)


def test_init_waits_for_the_first_optimizer_step():
    pm = peft_bert(sparsify_start=0.0)
    sparsifier = Sparsifier(pm, 10)
    assert sparsifier.before_step(0) == 0.0 and sparsifier.initialised_at is None
    sparsifier.before_step(1)
    assert sparsifier.initialised_at == 1


# -- 2. 'none' is the paper's rule, bit for bit -----------------------------------------------------------


def test_none_reproduces_the_paper_rule():
    """The rule before density control: θ budget-matched at the ramp start, γ on the schedule, task loss only."""
    steps = 12
    ours = peft_bert(seed=1, density_control="none")
    sparsifier = train(ours, steps)
    reference = peft_bert(seed=1, density_control="none")
    schedule = SparsitySchedule(steps, 0.2, 0.8)
    optimizer = make_optimizer(reference)
    for step in range(steps):
        if step == schedule.start_step:
            init_thresholds_to_budget(reference)
        set_gamma(reference, schedule.gamma(step) if step >= schedule.start_step else 0.0)
        task_loss(reference, step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    set_gamma(reference, 1.0)
    assert sparsifier.initialised_at == schedule.start_step and sparsifier.theta_lr is None
    assert sparsifier.loss_term() is None and sparsifier.log_state()["multiplier"] is None
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(a, b), name


# -- 3. the controlled modes --------------------------------------------------------------------------------


def test_l0_penalty_reaches_only_theta_through_the_rectangle_kernel():
    pm = peft_bert(density_control="l0", l0_lambda=0.5, bandwidth=0.05)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in jumplora_layers(pm):
            layer.jumplora_B["default"].normal_(0, 0.5)
    sparsifier = Sparsifier(pm, 10)
    sparsifier.before_step(2)
    term = sparsifier.loss_term()
    term.backward()
    layers = [m for _, m in jumplora_layers(pm)]
    assert all(m.jumplora_A["default"].grad is None and m.jumplora_B["default"].grad is None for m in layers)
    theta = layers[0].theta("default").detach()
    magnitudes = torch.cat([m.delta_weight("default").detach().abs().flatten() for m in layers])
    density = float((magnitudes > theta).float().mean())
    band = float(((magnitudes - theta).abs() < 0.05 / 2).float().mean())
    assert float(term.detach()) == pytest.approx(0.5 * density)
    raw = threshold_parameters(pm)["global"]
    # d/d log θ of λ·density ≈ λ·(−(1/ε)·mean K)·θ
    assert float(raw.grad) == pytest.approx(-0.5 * band / 0.05 * float(theta), rel=1e-5)
    assert band > 0


@pytest.mark.parametrize("steps", [10, 200])
def test_dual_holds_the_target_on_short_and_long_tasks(steps):
    pm = peft_bert(density_control="dual")
    sparsifier = train(pm, steps)
    density, _ = sparsity_stats(pm)
    target = sparsifier.overall_target()
    assert 0.5 * target <= density <= 2 * target, (density, target)
    state = sparsifier.log_state()
    assert state["gamma"] == 1.0 and state["multiplier"] is not None and state["density"] == density


def test_without_control_the_density_drifts():
    """The measured problem the controller solves (same task and seed as the test above)."""
    pm = peft_bert(density_control="none")
    sparsifier = train(pm, 10)
    assert sparsity_stats(pm)[0] > 2 * sparsifier.overall_target()


def test_explicit_target_density_and_state_round_trip():
    pm = peft_bert(density_control="dual", target_density=0.2)
    sparsifier = Sparsifier(pm, 20)
    optimizer = make_optimizer(pm)
    for step in range(8):
        sparsifier.before_step(step)
        (task_loss(pm, step) + (sparsifier.loss_term() or 0)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sparsifier.after_step(step)
    assert sparsifier.overall_target() == pytest.approx(0.2)
    state = json.loads(json.dumps(sparsifier.state_dict()))
    again = Sparsifier(pm, 20)
    again.load_state_dict(state)
    assert again.state_dict() == sparsifier.state_dict()
    assert again.gamma == sparsifier.gamma and again.controlling


def test_bad_density_control_is_refused():
    with pytest.raises(ValueError, match="density_control"):
        JumpLoraConfig(density_control="pid")


# -- merge guard ---------------------------------------------------------------------------------------------


def test_merge_refuses_a_partly_gated_or_uninitialised_adapter():
    pm = peft_bert()
    with torch.no_grad():
        for _, layer in jumplora_layers(pm):
            layer.jumplora_B["default"].normal_(0, 0.5)
    set_gamma(pm, 1.0)
    with pytest.raises(ValueError, match="placeholder"):
        merge_and_discard(pm)
    init_thresholds_to_budget(pm)
    set_gamma(pm, 0.5)
    with pytest.raises(ValueError, match=r"γ = 0\.5"):
        pm.merge_and_unload()
    with pytest.warns(UserWarning, match="force=True"):
        merge_and_discard(pm, force=True)


# -- training plot --------------------------------------------------------------------------------------------


def test_training_plot_shows_target_and_controller(tmp_path, monkeypatch):
    from jumplora.metrics import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    records = [
        {"task": "a", "task_index": 0, "global_step": s, "loss": 1.0, "gamma": 0.5, "theta": {"global": 1e-3},
         "density": 0.05 + 0.01 * s, "target_density": 0.04, "multiplier": 0.1 * s, "density_penalty": 0.2}
        for s in range(1, 6)
    ]  # fmt: skip
    plots.plot_training_curves(records, tmp_path / "t.png")
    labels = {line.get_label() for ax in figures[0].axes for line in ax.get_lines()}
    assert {"density", "target", "multiplier"} <= labels
    bare = [{k: v for k, v in r.items() if k not in ("target_density", "multiplier", "density_penalty")}
            for r in records]  # fmt: skip
    plots.plot_training_curves(bare, tmp_path / "u.png")
    bare_labels = {line.get_label() for ax in figures[1].axes for line in ax.get_lines()}
    assert "density" in bare_labels and not {"target", "multiplier", "density penalty"} & bare_labels


# -- PEFT registration on `import jumplora` ----------------------------------------------------------------


def test_import_jumplora_registers_the_peft_method(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_bert().save_pretrained(base_dir)
    pm = peft.get_peft_model(BertModel.from_pretrained(base_dir), JumpLoraConfig(r=4, target_modules=["query"]))
    pm.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir)  # a user's own folder is its name
    script = textwrap.dedent(f"""
        import jumplora, peft
        from transformers import BertModel
        config = peft.PeftConfig.from_pretrained({str(adapter_dir)!r})
        assert type(config).__name__ == "JumpLoraConfig", type(config)
        model = peft.PeftModel.from_pretrained(BertModel.from_pretrained({str(base_dir)!r}), {str(adapter_dir)!r})
        auto = peft.AutoPeftModel.from_pretrained({str(adapter_dir)!r})
        for m in (model, auto):
            assert any(type(x).__name__ == "Linear" and hasattr(x, "jumplora_A") for x in m.modules())
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_packaged_minilm_saves_under_its_hub_id(minilm_path):
    assert stable_model_name(minilm_path) == PACKAGED_MINILM_ID
    assert stable_model_name("/no/such/folder") == "/no/such/folder"
    assert stable_model_name(None) is None


def test_controller_theta_lr_only_under_control():
    assert theta_learning_rate(peft_bert(density_control="none")) is None
    assert theta_learning_rate(peft_bert(density_control="dual", controller_theta_lr=0.03)) == 0.03
    assert math.isclose(theta_learning_rate(peft_bert(density_control="l0")), JumpLoraConfig().controller_theta_lr)


def test_theta_gradient_added_after_backward_equals_the_loss_term():
    """The engine adds the density term's θ-gradient after the model's backward (DDP-safe); it is the
    gradient the term gives inside the loss."""
    from jumplora.train.loop import add_theta_gradient

    grads = []
    for inside in (True, False):
        pm = peft_bert(seed=3, density_control="dual", sparsify_start=0.0)
        sparsifier = Sparsifier(pm, 10)
        optimizer = make_optimizer(pm)
        for step in range(3):  # past the θ init, with the controller on
            sparsifier.before_step(step)
            loss, term = task_loss(pm, step), sparsifier.loss_term()
            if term is not None and inside:
                (loss + term).backward()
            else:
                loss.backward()
                if term is not None:
                    add_theta_gradient(pm, term, RunConfig().optim.grad_accum)
            grad = threshold_parameters(pm)["global"].grad
            grads.append(0.0 if grad is None else float(grad))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sparsifier.after_step(step)
    inside_grads, after_grads = grads[:3], grads[3:]
    assert after_grads == pytest.approx(inside_grads, rel=1e-6, abs=1e-12) and any(g != 0 for g in inside_grads)
