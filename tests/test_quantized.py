"""Quantized frozen bases: updates kept as exact float32 residuals, never merged into quantized weights.

Tiny BERTs (hidden 64: bitsandbytes' 4-bit blocks are 64 wide) quantized by transformers with
bitsandbytes int8 / nf4 and torchao int8 weight-only, all on CPU. The optional packages come with
``pip install -e ".[dev]"`` (the ``quant`` extra); without them these tests skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import BertConfig, BertModel

from jumplora import JumpLoraConfig, merge_and_discard
from jumplora.adapters import init_thresholds_to_budget, jumplora_layers, set_gamma
from jumplora.adapters import residual as res
from jumplora.adapters.updates import apply_update, pack_update
from jumplora.models import ModelLoadError
from jumplora.models.quantize import QUANTIZE_CHOICES, quantization_config

KINDS = [k for k in QUANTIZE_CHOICES if k != "none"]
_PACKAGE = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "torchao-int8": "torchao"}
TARGETS = ["query", "value"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, minilm_path: str) -> str:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny64")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path, local_files_only=True).save_pretrained(folder)
    return str(folder)


def quantized(folder: str, kind: str) -> BertModel:
    pytest.importorskip(_PACKAGE[kind], reason=f"--quantize {kind} needs {_PACKAGE[kind]} (the 'quant' extra)")
    model = BertModel.from_pretrained(folder, quantization_config=quantization_config(kind))
    res.disable_cpu_repack(model)
    return model


def gated_adapter(model: torch.nn.Module, seed: int) -> peft.PeftModel:
    """A fully gated sparse adapter with a non-zero update (B drawn at random), ready to merge."""
    peft_model = peft.get_peft_model(model, JumpLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, sparse=True))
    generator = torch.Generator().manual_seed(seed)
    for _, layer in jumplora_layers(peft_model):
        with torch.no_grad():
            layer.jumplora_B["default"].copy_(torch.randn(layer.jumplora_B["default"].shape, generator=generator))
    set_gamma(peft_model, 1.0)
    init_thresholds_to_budget(peft_model)
    return peft_model


def base_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each target module's output on ``x`` from its quantized weight alone (residual hook off)."""
    out = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            saved = res.residual(module)
            if saved is not None:
                del module._buffers[res.RESIDUAL]
            with torch.no_grad():
                out[name] = module(x)
            if saved is not None:
                module.register_buffer(res.RESIDUAL, saved, persistent=False)
    return out


def test_int8_merge_computes_base_plus_gated_update(tiny_folder: str) -> None:
    model = quantized(tiny_folder, "int8")
    x = torch.randn(3, 5, 64)
    expected_base = base_outputs(model, x)
    codes = {n: m.weight.data.clone() for n, m in model.named_modules() if n in expected_base}
    totals: dict[str, torch.Tensor] = {}
    for task in range(2):  # the second task's update accumulates into the first's residual
        merged = merge_and_discard(gated_adapter(model, seed=task), keep_updates=True)
        model = merged.model
        for name, update in merged.updates.items():
            totals[name] = totals[name] + update if name in totals else update
        modules = dict(model.named_modules())
        for name, update in totals.items():
            module = modules[name]
            assert res.quantization_kind(module) == "bnb-int8"
            assert torch.equal(module.weight.data, codes[name]), "the int8 weight must stay untouched"
            assert torch.equal(res.residual_dense(module), update), "the residual is the exact float32 sum"
            with torch.no_grad():
                got = module(x)
            want = expected_base[name] + x @ update.t()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert 0 < sum(res.residual_nnz(model).values()) < sum(t.numel() for t in totals.values())


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_targets_take_the_reference_path_with_gradients(tiny_folder: str, kind: str) -> None:
    peft_model = gated_adapter(quantized(tiny_folder, kind), seed=0)
    set_gamma(peft_model, 0.5)  # γ > 0: the fused path for a float weight
    layers = list(jumplora_layers(peft_model))
    assert all(not layer.fused["default"] for _, layer in layers)
    x = torch.randn(2, 4, 64, requires_grad=True)
    layer = layers[0][1]
    out = layer(x)
    torch.testing.assert_close(out, layer.forward_reference(x))
    out.square().sum().backward()
    assert layer.jumplora_B["default"].grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize(("step", "layout"), [(5, torch.sparse_csr), (1, torch.strided)])
def test_residual_forward_carries_the_input_gradient(tiny_folder: str, step: int, layout: torch.layout) -> None:
    """Sparse R as CSR; R denser than 1/2 is stored dense (smaller), with the same values and gradient."""
    model = quantized(tiny_folder, "torchao-int8")
    module = model.encoder.layer[0].attention.self.query
    update = torch.zeros(64, 64)
    update[::7, ::step] = torch.randn(update[::7, ::step].shape)
    res.add_to_residual(module, update / 2)
    assert res.residual(module).layout == torch.sparse_csr
    res.add_to_residual(module, update / 2 + (step == 1) * torch.randn(64, 64))  # step 1: now dense
    assert res.residual(module).layout == layout
    update = res.residual_dense(module)
    x = torch.randn(3, 64, requires_grad=True)
    module(x).sum().backward()
    dense = res.dequantized_weight(module) + update
    torch.testing.assert_close(x.grad, dense.sum(0).expand(3, -1), atol=1e-5, rtol=1e-5)


def test_nf4_keeps_learning_after_an_evaluation(tiny_folder: str) -> None:
    """bitsandbytes repacks 4-bit weights for inference on AVX512-BF16 CPUs; training must go on."""
    model = quantized(tiny_folder, "nf4")
    for module in model.modules():  # as loaded, before jumplora touches it
        if res.quantization_kind(module) == "bnb-4bit":
            module.support_avx512bf16_for_cpu = True
    ids = torch.randint(1000, 2000, (4, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the zero-shot evaluation: may repack
    peft_model = peft.get_peft_model(model, JumpLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    peft_model.train()
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad and "jumplora_theta" not in n}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    target, losses = torch.randn(4, 12, 64), []
    for _ in range(5):
        loss = (peft_model(input_ids=ids).last_hidden_state - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(before[n], p) for n, p in params.items()), "every adapter (both layers) learns"
    for module in model.modules():
        if res.quantization_kind(module) == "bnb-4bit":
            assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)


def test_resume_replay_rebuilds_the_residual_exactly(tiny_folder: str) -> None:
    model = quantized(tiny_folder, "nf4")
    packed = []
    for task in range(2):
        merged = merge_and_discard(gated_adapter(model, seed=task), keep_updates=True)
        model = merged.model
        packed.append(pack_update(merged.updates, merged.supports))
    replayed = quantized(tiny_folder, "nf4")
    for tensors in packed:
        apply_update(replayed, tensors)
    fresh = dict(replayed.named_modules())
    for name, module in model.named_modules():
        if res.residual(module) is not None:
            assert torch.equal(res.residual_dense(module), res.residual_dense(fresh[name]))


def test_missing_package_is_one_clear_error(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    missing = {"bitsandbytes"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"--quantize nf4 needs the bitsandbytes package.*jumplora\[quant\]"):
        quantization_config("nf4")


def test_missing_package_on_the_command_line_exits_2_and_writes_nothing(monkeypatch, tmp_path, tiny_folder) -> None:
    import importlib.util

    from typer.testing import CliRunner

    from jumplora.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--tasks", "cb,rte", "--model", tiny_folder,
                                      "--quantize", "torchao-int8", "--cpu", "--quiet"])  # fmt: skip
    assert result.exit_code == 2
    assert "error:" in result.output and "needs the torchao package" in result.output
    assert not out.exists()


def test_export_of_a_quantized_run_is_a_plain_float_model(tmp_path: Path, tiny_folder: str) -> None:
    pytest.importorskip("torchao", reason="--quantize torchao-int8 needs torchao (the 'quant' extra)")
    from jumplora import ContinualTrainer
    from jumplora.config import RunConfig
    from jumplora.export import export_run

    out = tmp_path / "run"
    config = RunConfig.from_flat(out=str(out), model=tiny_folder, tasks=["cb", "rte"], max_train=16, max_eval=8,
                                 max_length=32, batch_size=8, lr=0.01, jumplora=True, cpu=True,
                                 quantize="torchao-int8")  # fmt: skip
    ContinualTrainer(config, quiet=True).run()
    export_run(out, tmp_path / "export")
    exported = BertModel.from_pretrained(tmp_path / "export")
    assert "quantization_config" not in json.loads((tmp_path / "export" / "config.json").read_text())
    assert all(type(m) is torch.nn.Linear for m in exported.modules() if isinstance(m, torch.nn.Linear))
    trained = quantized(tiny_folder, "torchao-int8")
    for update in sorted((out / "checkpoint").glob("update_*.safetensors")):
        from jumplora.io import load_tensors

        apply_update(trained, load_tensors(update))
    ids = torch.randint(1000, 2000, (2, 10))
    with torch.no_grad():
        want, got = trained(input_ids=ids).last_hidden_state, exported(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "kill_at"), [("nf4", "step:6"), ("torchao-int8", "eval:5")])
def test_two_task_stream_resumes_after_kill_to_the_same_run(
    tmp_path: Path, tiny_folder: str, kind: str, kill_at: str
) -> None:
    """kill -9 after task 0's update is committed (mid-task 1, or evaluating after it), resume: the same R."""
    pytest.importorskip(_PACKAGE[kind], reason=f"--quantize {kind} needs {_PACKAGE[kind]} (the 'quant' extra)")
    from test_reliability import assert_same_run, cli, kill_chain, run_args

    reference = tmp_path / "reference"
    proc = cli(run_args(reference, tiny_folder, "inclora", "--quantize", kind))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((reference / "checkpoint" / "state.json").read_text())
    assert all(state["updates"]), "both tasks left an update (the residuals to restore)"
    out = tmp_path / "run"
    stderr = kill_chain(out, run_args(out, tiny_folder, "inclora", "--quantize", kind), [kill_at])
    assert "resuming" in stderr[-1]
    assert_same_run(reference, out)
