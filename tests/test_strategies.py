"""Strategies: the registry, each built-in's loss term and state against its formula, replay, the docs example."""

from __future__ import annotations

import copy
import re
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

from jumplora.adapters import JumpLoraConfig, init_thresholds_to_budget, jumplora_layers, merge_and_discard, set_gamma
from jumplora.cl import (
    ELLA,
    Strategy,
    StrategyContext,
    make_strategy,
    register_strategy,
    strategy_help,
    strategy_names,
)
from jumplora.cl import base as cl_base
from jumplora.models import EncoderRankingFamily, PromptExample

ZERO = torch.tensor(0.0)
BUILTINS = ["inclora", "seqlora", "ella", "olora", "replay"]


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A private copy of the registry, so strategies registered by a test do not leak into others."""
    monkeypatch.setattr(cl_base, "_REGISTRY", dict(cl_base._REGISTRY))


def adapter(base: nn.Module, seed: int, gamma: float = 1.0, sparse: bool = True) -> nn.Module:
    """A JumpLoRA adapter with a non-zero update (B random), gated with θ at the LoRA budget unless dense."""
    model = peft.get_peft_model(base, JumpLoraConfig(r=2, target_modules=["query", "value"], sparse=sparse))
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in jumplora_layers(model):
            layer.jumplora_B["default"].normal_(std=0.5)
    if sparse:
        init_thresholds_to_budget(model)
        set_gamma(model, gamma)
    return model


def effective(layer: nn.Module, gamma: float) -> torch.Tensor:
    """s·(γ·ΔW⊙1[|ΔW|>θ] + (1−γ)·ΔW), written out from the method's definition."""
    delta = layer.jumplora_B["default"] @ layer.jumplora_A["default"]
    gated = delta * (delta.abs() > layer.theta("default"))
    return layer.scaling["default"] * (gamma * gated + (1 - gamma) * delta)


def context(model: nn.Module | None, task: int, family=None, features=(), seed: int = 0) -> StrategyContext:
    return StrategyContext(
        model=model, task_index=task, task_name=f"t{task}", num_tasks=3, family=family,
        device=torch.device("cpu"), train_features=features, batch_size=4, seed=seed,
    )  # fmt: skip


# -- registry -----------------------------------------------------------------------------------------
def test_registry_names_and_clear_errors() -> None:
    assert strategy_names()[:5] == BUILTINS
    with pytest.raises(ValueError, match="unknown strategy 'ewc'; choose one of: inclora, seqlora, ella, olora"):
        make_strategy("ewc", {})
    with pytest.raises(ValueError, match=r"'ella': unknown argument 'lambda'; valid arguments: lam, past$"):
        make_strategy("ella", {"lambda": 1})
    with pytest.raises(ValueError, match="unknown argument 'x'; valid arguments: memory_per_task, replay_batch_size"):
        make_strategy("replay", {"x": 1})
    with pytest.raises(ValueError, match="valid arguments: \\(none\\)"):
        make_strategy("inclora", {"lam": 1})


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("ella", {"lam": "1e6"}, {"lam": 1e6}),
        ("ella", {"lam": 2}, {"lam": 2.0}),
        ("olora", {"lam_l2": " 0.25 "}, {"lam_orth": 0.5, "lam_l2": 0.25}),
        ("replay", {"memory_per_task": "7", "weight": "2", "replay_batch_size": 3.0},
         {"memory_per_task": 7, "replay_batch_size": 3, "weight": 2.0}),
    ],
)  # fmt: skip
def test_make_strategy_coerces_to_field_types(name: str, args: dict, expected: dict) -> None:
    hparams = make_strategy(name, args).hparams()
    assert {k: hparams[k] for k in expected} == expected
    assert all(type(hparams[k]) is type(v) for k, v in expected.items())


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("ella", {"lam": "nan"}, "argument 'lam' must be a finite number"),
        ("ella", {"lam": float("inf")}, "argument 'lam' must be a finite number"),
        ("olora", {"lam_orth": "-inf"}, "argument 'lam_orth' must be a finite number"),
        ("ella", {"lam": "abc"}, "argument 'lam' expects float, got 'abc'"),
        ("ella", {"lam": True}, "argument 'lam' expects float"),
        ("replay", {"memory_per_task": "2.5"}, "argument 'memory_per_task' expects int"),
        ("replay", {"memory_per_task": True}, "argument 'memory_per_task' expects int"),
        ("ella", {"lam": -1}, "lam must be >= 0"),
        ("ella", {"past": "ungated"}, "past must be one of merged, dense, got 'ungated'"),
        ("replay", {"weight": -1}, "must be >= 0"),
    ],
)
def test_make_strategy_refuses_bad_values(name: str, args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_strategy(name, args)


def test_register_strategy_checks_fields_bool_coercion_and_names(registry: None) -> None:
    @register_strategy("probe")
    @dataclass
    class Probe(Strategy):
        """Probe."""

        flag: bool = False
        label: str = "a"

    assert make_strategy("probe", {"flag": "Yes", "label": "b"}).hparams() == {"flag": True, "label": "b"}
    assert make_strategy("probe", {"flag": "0"}).hparams()["flag"] is False
    with pytest.raises(ValueError, match="argument 'flag' expects bool, got 'maybe'"):
        make_strategy("probe", {"flag": "maybe"})
    with pytest.raises(ValueError, match="argument 'label' expects str"):
        make_strategy("probe", {"label": 3})
    with pytest.raises(ValueError, match="'ella' is already taken"):
        register_strategy("ella")(Probe)
    with pytest.raises(TypeError, match="field 'sizes' must be float, int, bool or str"):
        register_strategy("bad")(dataclass(type("Bad", (Strategy,), {"__annotations__": {"sizes": list}})))
    with pytest.raises(TypeError, match="needs a @dataclass subclass of Strategy"):
        register_strategy("bad")(int)


def test_strategy_help_lists_every_strategy_with_fields_and_defaults() -> None:
    text = strategy_help()
    for name in BUILTINS:
        assert re.search(rf"^{name}\s+\S", text, re.M), name
    for line in ["lam: float = 30000.0", "lam_orth: float = 0.5", "lam_l2: float = 0.0", "memory_per_task: int = 50",
                 "replay_batch_size: int = 0", "weight: float = 1.0", "[one adapter shared across tasks]"]:  # fmt: skip
        assert line in text
    assert make_strategy("ella").lam == ELLA.__dataclass_fields__["lam"].default == 3e4


# -- the built-ins on a tiny PEFT model -------------------------------------------------------------------
def test_inclora_and_seqlora_add_nothing_and_keep_no_state(tiny_bert: nn.Module) -> None:
    model = adapter(tiny_bert, seed=1)
    for name, lifecycle in [("inclora", "per_task"), ("seqlora", "shared")]:
        strategy = make_strategy(name)
        ctx = context(model, 0)
        strategy.on_task_start(ctx)
        assert strategy.adapter_lifecycle == lifecycle
        assert strategy.loss_term(ctx, {}, ZERO) is None
        strategy.on_task_end(ctx, None)
        assert strategy.state_dict() == {}
        with pytest.raises(ValueError, match="keeps no state"):
            strategy.load_state_dict({"w_past.x": ZERO})


@pytest.mark.parametrize(("gamma", "kind"), [(0.5, "merged"), (1.0, "merged"), (1.0, "dense")])
def test_ella_is_lambda_mean_of_gated_update_times_w_past(tiny_bert: nn.Module, gamma: float, kind: str) -> None:
    ella = make_strategy("ella", {"lam": "2.5", "past": kind})
    past: dict[str, torch.Tensor] = {}
    model = adapter(tiny_bert, seed=1)
    for task in range(2):  # two finished tasks: W_past = their summed merged (γ = 1) or ungated (γ = 0) updates
        ctx = context(model, task)
        ella.on_task_start(ctx)
        assert (ella.loss_term(ctx, {}, ZERO) is None) == (task == 0)
        for name, layer in jumplora_layers(model):
            past[name] = past.get(name, 0) + effective(layer, 1.0 if kind == "merged" else 0.0).detach()
        with warnings.catch_warnings():  # the merge gates fully whatever γ; at γ < 1 it says so, as intended
            warnings.filterwarnings("ignore", message="JumpLoRA merge: adapter 'default' is at γ")
            merged = merge_and_discard(model, keep_updates=True, force=True)
        ella.on_task_end(ctx, merged)
        model = adapter(merged.model, seed=2 + task, gamma=gamma)
    state = ella.state_dict()
    assert set(state) == {f"w_past.{name}" for name in past}
    assert all(torch.allclose(state[f"w_past.{n}"], w, atol=1e-6) for n, w in past.items())

    ctx = context(model, 2)
    ella.on_task_start(ctx)
    term = ella.loss_term(ctx, {}, ZERO)
    layers = dict(jumplora_layers(model))
    expected = 2.5 * torch.stack([(effective(layers[n], gamma) * w).square().sum() for n, w in past.items()]).mean()
    assert float(expected.detach()) > 0
    torch.testing.assert_close(term, expected)
    term.backward()
    assert all(layer.jumplora_B["default"].grad.abs().sum() > 0 for layer in layers.values())

    resumed = ELLA(lam=2.5, past=kind)
    resumed.load_state_dict(state)
    resumed.on_task_start(ctx)
    torch.testing.assert_close(resumed.loss_term(ctx, {}, ZERO), term.detach())
    with pytest.raises(ValueError, match="unexpected state keys"):
        resumed.load_state_dict({"past_A.x": ZERO})


def test_ella_w_past_kinds_agree_without_the_gate(tiny_bert: nn.Module) -> None:
    """Dense LoRA merges its whole update, so only JumpLoRA tells `past=dense` (the default) from `merged`."""
    assert make_strategy("ella").past == "dense"
    states = {}
    for kind in ("merged", "dense"):
        ella, model = make_strategy("ella", {"past": kind}), copy.deepcopy(tiny_bert)
        for task in range(2):
            torch.manual_seed(task)  # the same A (Kaiming, drawn when the adapter is made) for both kinds
            model = adapter(model, seed=1 + task, sparse=False)
            ctx = context(model, task)
            ella.on_task_start(ctx)
            merged = merge_and_discard(model, keep_updates=True, force=True)
            ella.on_task_end(ctx, merged)
            model = merged.model
        states[kind] = ella.state_dict()
    assert states["dense"].keys() == states["merged"].keys() and len(states["dense"]) == 4
    for name, w_past in states["dense"].items():
        assert w_past.abs().sum() > 0
        torch.testing.assert_close(w_past, states["merged"][name])


def test_olora_is_orthogonality_plus_l2_and_stacks_past_a(tiny_bert: nn.Module) -> None:
    olora = make_strategy("olora", {"lam_orth": "0.3", "lam_l2": "0.01"})
    assert make_strategy("olora").loss_term(context(None, 0), {}, ZERO) is None  # λ2 = 0, no past: nothing
    past: dict[str, list[torch.Tensor]] = {}
    model = adapter(tiny_bert, seed=1)
    for task in range(3):
        ctx = context(model, task)
        olora.on_task_start(ctx)
        layers = dict(jumplora_layers(model))
        expected = sum(
            0.01 * (layer.jumplora_A["default"].square().sum() + layer.jumplora_B["default"].square().sum())
            + (0.3 * (torch.cat(past[n]) @ layer.jumplora_A["default"].t()).abs().sum() if n in past else 0)
            for n, layer in layers.items()
        )
        term = olora.loss_term(ctx, {}, ZERO)
        torch.testing.assert_close(term, expected)
        if task == 2:
            break
        for n, layer in layers.items():
            past.setdefault(n, []).append(layer.jumplora_A["default"].detach().clone())
        merged = merge_and_discard(model, keep_updates=True)
        olora.on_task_end(ctx, merged)
        model = adapter(merged.model, seed=2 + task)
    state = olora.state_dict()
    assert set(state) == {f"past_A.{n}" for n in past}
    assert all(torch.equal(state[f"past_A.{n}"], torch.cat(a)) and len(torch.cat(a)) == 4 for n, a in past.items())
    resumed = make_strategy("olora", {"lam_orth": 0.3, "lam_l2": 0.01})
    resumed.load_state_dict(state)
    resumed.on_task_start(ctx)
    torch.testing.assert_close(resumed.loss_term(ctx, {}, ZERO), term)


# -- experience replay --------------------------------------------------------------------------------
@pytest.fixture
def replay_data(tiny_bert: nn.Module, bert_tokenizer) -> tuple[EncoderRankingFamily, list[list[dict]], nn.Module]:
    family = EncoderRankingFamily(bert_tokenizer, max_length=32)
    words = ["bad", "good"]
    tasks = [
        [
            PromptExample(f"task {t}: review {i} says it is {words[i % 2]}", words[i % 2], tuple(words))
            for i in range(20)
        ]
        for t in range(3)
    ]
    return family, [family.encode(examples) for examples in tasks], adapter(tiny_bert, seed=1)


def finish_tasks(strategy: Strategy, data: tuple, tasks: int, seed: int = 0) -> StrategyContext:
    family, features, model = data
    for task in range(tasks):
        strategy.on_task_end(context(model, task, family, features, seed), None)
    return context(model, tasks, family, features, seed)


def test_replay_memory_is_deterministic_per_seed(replay_data: tuple) -> None:
    memories = []
    for seed in [0, 0, 1]:
        replay = make_strategy("replay", {"memory_per_task": 5})
        finish_tasks(replay, replay_data, 2, seed)
        memories.append({t: m.tolist() for t, m in replay.memory.items()})
    assert memories[0] == memories[1] != memories[2]
    assert all(len(set(m)) == 5 and set(m) <= set(range(20)) for m in memories[0].values())
    assert memories[0][0] != memories[0][1]  # each task draws its own examples
    everything = make_strategy("replay", {"memory_per_task": 100})
    finish_tasks(everything, replay_data, 1)
    assert everything.memory[0].tolist() == list(range(20))


def test_replay_loss_term_is_weighted_family_loss_on_the_sampled_examples(replay_data: tuple) -> None:
    family, features, model = replay_data
    replay = make_strategy("replay", {"memory_per_task": 5, "weight": "0.5"})
    first = context(model, 0, family, features)
    assert replay.sample(first) == [] and replay.loss_term(first, {}, ZERO) is None  # no memory yet
    ctx = finish_tasks(replay, replay_data, 2)
    chosen = replay.sample(ctx)
    assert len(chosen) == ctx.batch_size == 4  # replay_batch_size 0: the training batch size
    assert all(i in replay.memory[t].tolist() for t, i in chosen)
    term = replay.loss_term(ctx, {}, ZERO)
    expected = 0.5 * family.loss(model, family.collate([features[t][i] for t, i in chosen]))
    torch.testing.assert_close(term, expected)
    term.backward()
    assert any(layer.jumplora_A["default"].grad.abs().sum() > 0 for _, layer in jumplora_layers(model))
    assert replay.step == 1 and replay.sample(ctx) != chosen  # the next step draws a new batch


def test_replay_state_round_trip_gives_the_same_next_batch(replay_data: tuple) -> None:
    replay = make_strategy("replay", {"memory_per_task": 6, "replay_batch_size": 3})
    ctx = finish_tasks(replay, replay_data, 2)
    for _ in range(3):
        replay.loss_term(ctx, {}, ZERO)
    state = replay.state_dict()
    assert set(state) == {"memory.0", "memory.1", "step"} and all(t.dtype == torch.int64 for t in state.values())
    resumed = make_strategy("replay", {"memory_per_task": 6, "replay_batch_size": 3})
    resumed.load_state_dict(state)
    assert resumed.sample(ctx) == replay.sample(ctx) and len(replay.sample(ctx)) == 3
    torch.testing.assert_close(resumed.loss_term(ctx, {}, ZERO), replay.loss_term(ctx, {}, ZERO))
    with pytest.raises(ValueError, match=r"expected 'step' and memory\.<task> keys"):
        resumed.load_state_dict({"memory.0": state["memory.0"]})


# -- the example of docs/EXTENDING.md ------------------------------------------------------------------
def test_docs_example_strategy_runs_through_the_registry_and_hooks(
    registry: None, monkeypatch: pytest.MonkeyPatch, tiny_bert: nn.Module
) -> None:
    text = (Path(__file__).parents[1] / "docs" / "EXTENDING.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    module = types.ModuleType("extending_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "docs/EXTENDING.md", "exec"), module.__dict__)
    assert "support_l2" in strategy_names() and "lam: float = 1.0" in strategy_help()

    strategy = make_strategy("support_l2", {"lam": "0.5"})
    model = adapter(tiny_bert, seed=1)
    ctx = context(model, 0)
    strategy.on_task_start(ctx)
    assert strategy.loss_term(ctx, {}, ZERO) is None
    merged = merge_and_discard(model, keep_updates=True)
    strategy.on_task_end(ctx, merged)
    model = adapter(merged.model, seed=2)
    ctx = context(model, 1)
    strategy.on_task_start(ctx)
    layers = dict(jumplora_layers(model))
    expected = 0.5 * sum((effective(layers[n], 1.0) * s).square().sum() for n, s in merged.supports.items())
    torch.testing.assert_close(strategy.loss_term(ctx, {}, ZERO), expected)
    resumed = make_strategy("support_l2", {"lam": 0.5})
    resumed.load_state_dict(strategy.state_dict())
    torch.testing.assert_close(resumed.loss_term(ctx, {}, ZERO), expected)


def test_layer_views_are_the_current_adapter_without_peft_keys(tiny_bert: nn.Module) -> None:
    """ctx.layers(): A, B and the effective ΔW of every adapted module, read through the layer's own adapter."""
    model = adapter(tiny_bert, seed=1, gamma=0.5)
    views = context(model, 0).layers()
    layers = list(jumplora_layers(model))
    assert [v.name for v in views] == [name for name, _ in layers] and views
    for view, (_, layer) in zip(views, layers, strict=True):
        assert view.A is layer.jumplora_A["default"] and view.B is layer.jumplora_B["default"]
        torch.testing.assert_close(view.delta(), layer.effective_delta("default"))
        torch.testing.assert_close(view.delta(gamma=0.0), layer.effective_delta("default", gamma=0.0))
    assert context(None, 0).layers() == []
