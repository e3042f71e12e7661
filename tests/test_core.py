"""The core's small pieces in one process: configuration, targets, the divergence check, updates."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import GPT2Model

from jumplora.adapters import JumpLoraConfig, jumplora_layers
from jumplora.adapters.targets import ALL_LINEAR, check_target_modules, is_adaptable, weight_is_transposed
from jumplora.adapters.updates import apply_update, pack_update, unpack_update
from jumplora.config import ConfigError, RunConfig, flat_fields


def test_config_round_trips_through_json_and_flat_names():
    config = RunConfig.from_flat(
        lr=3e-4, tasks=["cb", "rte"], strategy="ella", strategy_args={"lam": "1e6"}, jumplora=True
    )
    assert config.optim.lr == 3e-4 and config.stream.tasks == ["cb", "rte"] and config.adapter.sparse
    assert config.strategy.args == {"lam": 1e6, "past": "dense"}  # coerced, every hyper-parameter recorded
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.flat() == config.flat()
    assert config.replace(seed=3).seed == 3 and config.seed == 0


def test_adapter_part_defaults_are_jumplora_configs():
    """One source for every adapter default: the run's adapter part is JumpLoraConfig's."""
    built = RunConfig().adapter.to_peft(["query"])
    reference = JumpLoraConfig(target_modules=["query"], sparse=False)
    for name in ("r", "lora_alpha", "bandwidth", "sparsify_start", "sparsify_end", "density_control"):
        assert getattr(built, name) == getattr(reference, name), name
    assert built.lora_alpha == 32  # the value every study used (the CLI's and PEFT config's defaults once differed)


def test_every_flat_name_is_unique_and_reaches_a_field():
    names = flat_fields()
    assert len(names) == len(set(names))
    assert {"lr", "jumplora", "model", "strategy", "strategy_args", "targets", "order"} <= set(names)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"theta_lr": 0.0}, "theta_lr must be > 0"),
        ({"seed": -1}, "seed must be in [0, 2**32)"),
        ({"strategy": "ella", "strategy_args": {"lam": "x"}}, "'lam' expects float"),
        ({"runner": "jointly"}, "runner must be one of"),
        ({"nonsense": 1}, "unknown setting 'nonsense'"),
    ],
)
def test_bad_values_are_config_errors(values, needle):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat(**values)
    assert needle in str(err.value)


def test_all_linear_reaches_peft_as_its_shorthand(tiny_bert):
    """``--targets all-linear`` used to become the set {"all-linear"}, which PEFT does not expand."""
    assert check_target_modules(tiny_bert, ["all-linear"]) == ALL_LINEAR
    model = peft.get_peft_model(tiny_bert, RunConfig.from_flat(targets=["all-linear"]).adapter.to_peft(ALL_LINEAR))
    names = {name.rsplit(".", 1)[-1] for name, _ in jumplora_layers(model)}
    assert {"query", "key", "value", "dense"} <= names


def test_targets_are_checked_by_type(tiny_gpt2, tiny_bert):
    conv = tiny_gpt2.transformer.h[0].attn.c_attn
    assert is_adaptable(conv) and weight_is_transposed(conv)
    assert not weight_is_transposed(tiny_bert.encoder.layer[0].attention.self.query)
    with pytest.raises(ValueError, match="adapters go on linear layers only"):
        check_target_modules(tiny_bert, ["word_embeddings"])
    with pytest.raises(ValueError, match=r"target modules \['qkv'\]"):
        check_target_modules(tiny_bert, ["query", "qkv"])


def test_packed_update_applies_and_removes_on_conv1d(tiny_gpt2):
    model: GPT2Model = tiny_gpt2.transformer
    conv = model.h[0].attn.c_attn  # weight (in, out); updates are (out, in)
    before = conv.weight.detach().clone()
    update = torch.randn(conv.weight.shape[1], conv.weight.shape[0])
    mask = update.abs() > 1.0
    packed = pack_update({"h.0.attn.c_attn": update * mask}, {"h.0.attn.c_attn": mask})
    assert torch.equal(unpack_update(packed)["h.0.attn.c_attn"], update * mask)
    apply_update(model, packed)
    torch.testing.assert_close(conv.weight - before, (update * mask).t())
    apply_update(model, packed, sign=-1)
    torch.testing.assert_close(conv.weight, before)


def test_a_diverged_update_is_a_numerical_fault(tmp_path, tiny_model):
    """A merged update far out of the base weights' scale stops the run (exit 3 in the CLI)."""
    from jumplora import ContinualTrainer
    from jumplora.data import resolve_data_dir
    from jumplora.train.merge import merge_task
    from jumplora.train.numerics import NumericalError

    config = RunConfig.from_flat(
        out=str(tmp_path / "run"), tasks=["cb"], model=tiny_model, data_dir=str(resolve_data_dir()), max_train=8,
        max_eval=8, max_length=32, cpu=True, jumplora=False,
    )  # fmt: skip
    trainer = ContinualTrainer(config, quiet=True)
    trainer.prepare()
    setup = trainer.setup
    peft_model = setup.new_adapter(setup.base_model, 0)
    with torch.no_grad():
        for _, layer in jumplora_layers(peft_model):
            layer.jumplora_B["default"].fill_(1e4)
    with pytest.raises(NumericalError, match=r"task 'cb' \(index 0\): the merged update of .*\(diverged"):
        merge_task(peft_model, config.adapter, seed=config.task_seed(0), sharded=False, label="task 'cb' (index 0)")


def test_strategy_context_holds_the_tasks_so_far_only(tmp_path, tiny_model):
    """No CL protocol lets a strategy see a later task's data: the context stops at the current task."""
    from jumplora import ContinualTrainer
    from jumplora.data import resolve_data_dir

    config = RunConfig.from_flat(
        out=str(tmp_path / "run"), tasks=["cb", "rte"], model=tiny_model, data_dir=str(resolve_data_dir()),
        max_train=8, max_eval=8, max_length=32, cpu=True,
    )  # fmt: skip
    setup = ContinualTrainer(config, quiet=True).prepare()
    first, second = setup.context(None, 0), setup.context(None, 1)
    assert [len(f) for f in first.train_features] == [8]
    assert [len(f) for f in second.train_features] == [8, 8] and second.num_tasks == 2
    assert second.train_features[0] is setup.tasks[0].train_features
