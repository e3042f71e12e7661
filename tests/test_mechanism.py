"""The mechanism study's features: the gold-answer NLL matrix L, the controls' defining properties, the θ path."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import peft
import pytest
import torch
from torch import nn

from jumplora import ContinualTrainer
from jumplora.adapters import (
    JumpLoraConfig,
    Sparsifier,
    jumplora_layers,
    merge_controlled,
    norm_match_scales,
    random_masks,
    topk_masks,
)
from jumplora.config import ConfigError, RunConfig
from jumplora.data import resolve_data_dir
from jumplora.metrics import nll_metrics
from jumplora.train.evaluate import NllSums

#: The study's density frontier (0.25 % … 25 %; None = the LoRA budget).
FRONTIER = (0.0025, 0.005, 0.01, 0.02, None, 0.10, 0.25)


def trained_like(seed: int = 0, sparse: bool = False, **config) -> nn.Module:
    """Two linear layers in one threshold group, B drawn at random so ΔW ≠ 0 (as after training)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 40))
    cfg = JumpLoraConfig(r=4, target_modules=["0", "1"], init_lora_weights=False, sparse=sparse, **config)
    return peft.get_peft_model(model, cfg)


def deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.delta_weight("default").detach().float() for name, layer in jumplora_layers(model)}


@pytest.mark.parametrize("density", FRONTIER)
def test_topk_and_random_masks_hit_the_density_exactly(density):
    model = trained_like()
    entries = 64 * 48 + 48 * 40
    expected = 4 * (64 + 48) + 4 * (48 + 40) if density is None else round(density * entries)
    top = topk_masks(model, density)
    rand = random_masks(model, density, torch.Generator().manual_seed(0))
    assert sum(int(m.sum()) for m in top.values()) == expected
    assert sum(int(m.sum()) for m in rand.values()) == expected
    # top-k keeps the largest |ΔW| of the group: every kept entry ≥ every dropped one
    d = deltas(model)
    kept = torch.cat([d[n].abs()[top[n]] for n in d])
    dropped = torch.cat([d[n].abs()[~top[n]] for n in d])
    assert kept.min() >= dropped.max()


def test_random_mask_is_not_the_topk_and_is_reproducible():
    model = trained_like()
    a = random_masks(model, 0.1, torch.Generator().manual_seed(3))
    b = random_masks(model, 0.1, torch.Generator().manual_seed(3))
    top = topk_masks(model, 0.1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    overlap = sum(int((a[n] & top[n]).sum()) for n in a) / sum(int(top[n].sum()) for n in a)
    assert overlap < 0.3  # ≈ the density (0.1) by chance; the top-k would give 1


def test_masked_merge_adds_exactly_the_kept_entries():
    model = trained_like()
    before = {n: layer.get_base_layer().weight.detach().clone() for n, layer in jumplora_layers(model)}
    d, masks = deltas(model), topk_masks(model, 0.05)
    merged = merge_controlled(model, masks)
    modules = dict(merged.model.named_modules())
    for name, delta in d.items():
        expected = 8.0 * delta * masks[name]  # scaling = lora_alpha / r = 32 / 4
        assert torch.allclose(modules[name].weight - before[name], expected, atol=1e-6)
        assert torch.equal(merged.supports[name], masks[name])
    assert not any(True for _ in jumplora_layers(merged.model))  # the adapter is gone


def test_norm_matched_merge_is_dense_with_the_topk_norm():
    model = trained_like()
    d, masks = deltas(model), topk_masks(model, 0.02)
    merged = merge_controlled(model, masks, norm_match_scales(model, masks))
    for name, delta in d.items():
        update = merged.updates[name]
        assert torch.count_nonzero(update) == update.numel()  # dense
        assert float(update.norm()) == pytest.approx(8.0 * float((delta * masks[name]).norm()), rel=1e-5)
        assert merged.supports[name].all()


def test_falling_target_path_goes_from_the_budget_to_the_target():
    model = trained_like(sparse=True, target_density=0.01, target_path="falling", density_control="dual")
    sparsifier = Sparsifier(model, 100)
    group = next(iter(sparsifier.groups.values()))
    budget = (4 * (64 + 48) + 4 * (48 + 40)) / (64 * 48 + 48 * 40)
    targets = []
    for step in range(100):
        sparsifier.before_step(step)
        targets.append(group.target)
        sparsifier.after_step(step)
    assert targets[0] == pytest.approx(budget) and targets[20] == pytest.approx(budget)  # ramp starts at 20 %
    assert targets[50] == pytest.approx(math.sqrt(budget * 0.01))  # geometric half-way
    assert targets[80] == pytest.approx(0.01) and targets[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in itertools.pairwise(targets))
    flat = Sparsifier(trained_like(sparse=True, target_density=0.01, density_control="dual"), 100)
    flat.before_step(30)
    assert next(iter(flat.groups.values())).target == 0.01


def test_controls_are_run_options_with_one_clear_error():
    config = RunConfig.from_flat(jumplora=False, merge_mask="posthoc-topk", target_density=0.01)
    assert config.adapter.control and config.label == "inclora+mask-posthoc-topk"
    assert not config.adapter.to_peft(["query"]).sparse  # trained densely
    with pytest.raises(ConfigError, match="drop --jumplora"):
        RunConfig.from_flat(jumplora=True, merge_mask="random")
    with pytest.raises(ConfigError, match="does not combine"):
        RunConfig.from_flat(jumplora=False, norm_match=True, merge_mask="random")
    for density in FRONTIER:
        RunConfig.from_flat(jumplora=True, target_density=density)


def test_nll_metrics_known_answer():
    L = [[1.0, 3.0, 3.0], [2.0, 0.5, 3.0], [2.5, 1.5, 0.2]]
    m = nll_metrics(L, zero_shot=[3.0, 2.0, 4.0])
    assert m["final"] == pytest.approx((2.5 + 1.5 + 0.2) / 3)
    assert m["learned"] == pytest.approx((1.0 + 0.5 + 0.2) / 3)
    assert m["bwt"] == pytest.approx(((2.5 - 1.0) + (1.5 - 0.5)) / 2)  # positive: forgot
    assert m["forgetting"] == pytest.approx(((2.5 - 1.0) + (1.5 - 0.5)) / 2)
    assert m["fwt"] == pytest.approx(((3.0 - 2.0) + (3.0 - 4.0)) / 2)


def test_nll_sums_mean_and_standard_error():
    values = [0.5, 1.5, float("nan"), 2.0, 4.0]
    sums = NllSums()
    sums.add(values[:2])
    sums.add(values[2:])
    finite = np.array([0.5, 1.5, 2.0, 4.0])
    summary = NllSums.summary(*sums.sums())
    assert summary["gold_nll"] == pytest.approx(finite.mean())
    assert summary["gold_nll_se"] == pytest.approx(finite.std(ddof=1) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("control", [{"merge_mask": "posthoc-topk"}, {"norm_match": True}])
def test_control_run_records_L_and_hits_its_density(tmp_path, control):
    config = RunConfig.from_flat(
        out=str(tmp_path / "run"), tasks=["dbpedia", "amazon"], data_dir=str(resolve_data_dir()), max_train=16,
        max_eval=16, max_length=48, batch_size=8, eval_batch_size=16, target_density=0.01, plots=False,
        save_predictions=True, jumplora=False, **control,
    )  # fmt: skip
    results = ContinualTrainer(config, quiet=True).run()
    densities = [task["density"] for task in results["per_task"]]
    expected = 1.0 if "norm_match" in control else 0.01
    assert densities == pytest.approx([expected, expected], abs=1e-4)
    L, se = np.array(results["nll_matrix"], dtype=float), np.array(results["nll_se_matrix"], dtype=float)
    assert L.shape == (2, 2) and (L > 0).all() and (se > 0).all()
    assert results["nll_metrics"]["bwt"] == pytest.approx(L[1, 0] - L[0, 0])
    saved = [json.loads(line) for line in (tmp_path / "run" / "predictions").glob("01-*").__next__().open()]
    dbpedia = [r["gold_nll"] for r in saved if r["task"] == "dbpedia"]
    assert np.mean(dbpedia) == pytest.approx(L[0, 0], rel=1e-5)
