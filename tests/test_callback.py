"""`JumpLoraCallback` with a real `transformers.Trainer`: density near its target, merge = γ=1 adapter."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from jumplora import JumpLoraCallback, JumpLoraConfig
from jumplora.adapters import sparsity_stats

VOCAB = 64


def tiny_classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=2)  # fmt: skip
    return BertForSequenceClassification(cfg)


def dataset(n: int = 64) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, 8), generator=gen)
    return [{"input_ids": ids[i], "labels": int(ids[i, 0] < VOCAB // 2)} for i in range(n)]


def train(tmp_path, callbacks: list, steps: int = 30) -> peft.PeftModel:
    model = peft.get_peft_model(tiny_classifier(), JumpLoraConfig(r=4, target_modules=["query", "value"]))
    args = TrainingArguments(str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=10, use_cpu=True,
                             disable_tqdm=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks).train()
    return model


def test_trainer_with_callback_holds_density_and_merges_exactly(tmp_path):
    callback = JumpLoraCallback()
    model = train(tmp_path, [callback])
    density, _ = sparsity_stats(model)
    target = callback.sparsifier.overall_target()
    assert 0.5 * target <= density <= 2 * target, (density, target)
    assert callback.sparsifier.gamma == 1.0 and callback.sparsifier.initialised_at is not None
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        adapter_out = model(input_ids=ids).logits
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_out, rtol=1e-5, atol=1e-5)


def test_trainer_without_callback_cannot_merge_silently(tmp_path):
    model = train(tmp_path, [], steps=3)
    with pytest.raises(ValueError, match="JumpLoraCallback"):
        model.merge_and_unload()


def _trainer(out, steps: int, callback: JumpLoraCallback, **kwargs) -> Trainer:
    model = peft.get_peft_model(tiny_classifier(), JumpLoraConfig(r=4, target_modules=["query", "value"]))
    args = TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="steps", save_steps=5, logging_steps=10, use_cpu=True,
                             disable_tqdm=True, seed=0, **kwargs)  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback])


def _adapter_state(model: peft.PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "jumplora_" in k}


@pytest.mark.parametrize("restore_flag", [False, True])
def test_trainer_resume_with_callback_equals_an_uninterrupted_run(tmp_path, restore_flag):
    """Stopped after step 5 (mid-ramp, controller on) and resumed in a fresh Trainer: same adapter, θ, state."""
    whole = JumpLoraCallback()
    uninterrupted = _trainer(tmp_path / "a", 12, whole)
    uninterrupted.train()
    assert (tmp_path / "a" / "checkpoint-5").is_dir() and whole.sparsifier.initialised_at is not None

    resumed_callback = JumpLoraCallback()
    resumed = _trainer(tmp_path / "a", 12, resumed_callback, restore_callback_states_from_checkpoint=restore_flag)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    sparsifier = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, JumpLoraCallback)).sparsifier

    expected, got = _adapter_state(uninterrupted.model), _adapter_state(resumed.model)
    assert expected.keys() == got.keys() and any("theta" in k for k in got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)
    state, whole_state = sparsifier.state_dict(), whole.sparsifier.state_dict()
    for key in ("multipliers", "scales"):
        assert state.pop(key) == pytest.approx(whole_state.pop(key), rel=1e-5)
    assert state == whole_state  # initialised_at, finished, gamma
    assert len(resumed.optimizer.param_groups) == len(uninterrupted.optimizer.param_groups) == 3
    assert resumed.optimizer.param_groups[-1]["lr"] == whole.sparsifier.theta_lr
