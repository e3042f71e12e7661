"""bf16 compute on CPU (``--mixed-precision bf16`` / ``auto``): exact merges, float32 state, a whole run."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jumplora import JumpLoraConfig, merge_and_discard
from jumplora.adapters import init_thresholds_to_budget, jumplora_layers, set_gamma
from jumplora.precision import resolve_precision

VOCAB = 64


def tiny_llama_with_sparse_adapter(seed: int = 0) -> peft.PeftModel:
    """A tiny LLaMA with a fully gated JumpLoRA adapter whose update is ~1e-3 of W (as after a short task)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = peft.get_peft_model(LlamaForCausalLM(config), JumpLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in jumplora_layers(model):
            layer.jumplora_B["default"].normal_(0, 2e-3)
    init_thresholds_to_budget(model)
    set_gamma(model, 1.0)
    return model


def exact_merge(model: peft.PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(W, W + s·ΔW⊙1[|ΔW|>θ]) in float64 from the float32 factors: what a merge should give."""
    merged = {}
    with torch.no_grad():
        for name, layer in jumplora_layers(model):
            a, b = layer.jumplora_A["default"].double(), layer.jumplora_B["default"].double()
            delta = b @ a
            keep = delta.abs() > layer.theta("default").double()
            base = layer.get_base_layer().weight.double()
            merged[name.removeprefix("base_model.model.")] = (base, base + layer.scaling["default"] * delta * keep)
    return merged


def merge_error(model: torch.nn.Module, exact: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Largest ‖merged − exact‖ / ‖exact − W‖ over the targeted weights: float32 gives ~1e-7, a bf16 ΔW ~1e-3."""
    modules = dict(model.named_modules())
    worst = 0.0
    for name, (base, want) in exact.items():
        got = modules[name].weight.detach()
        assert got.dtype == torch.float32
        worst = max(worst, float((got.double() - want).norm() / (want - base).norm()))
    return worst


def test_merge_under_bf16_autocast_equals_the_fp32_merge():
    """The end-of-task merge inside a bf16 autocast region adds exactly what the fp32 merge adds: the base
    stays float32 and ΔW = B·A is formed in float32 (a bf16 B·A would round every kept entry by ~2^-9)."""
    model = tiny_llama_with_sparse_adapter()
    twin = copy.deepcopy(model)
    exact = exact_merge(model)
    plain = merge_and_discard(model).model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = merge_and_discard(twin).model
    assert merge_error(plain, exact) < 1e-5
    assert merge_error(under_bf16, exact) < 1e-5
    for (name, p), (_, q) in zip(plain.named_parameters(), under_bf16.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_fused_layer_under_autocast_keeps_float32_state_and_fp32_direction():
    """Training under bf16 autocast: A, B and θ get float32 gradients that point where the fp32 ones do."""
    grads = {}
    for autocast in (False, True):
        model = tiny_llama_with_sparse_adapter()
        set_gamma(model, 0.5)  # the fused path, θ-gradient included
        ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params.values())
        grads[autocast] = torch.cat([p.grad.flatten() for p in params.values()])
    cosine = torch.nn.functional.cosine_similarity(grads[False], grads[True], dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize(
    ("requested", "force_cpu", "native", "expected"),
    [("auto", True, True, "bf16"), ("auto", True, False, "no"), ("no", True, True, "no"),
     ("bf16", True, False, "bf16")],
)
def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, requested, force_cpu, native, expected):
    monkeypatch.setattr("jumplora.precision.cpu_has_native_bf16", lambda: native)
    chosen = resolve_precision(requested, force_cpu)
    assert chosen.mixed_precision == expected and chosen.requested == requested and chosen.reason


def test_bf16_generative_run_records_its_precision_and_trains(tmp_path, tiny_llama, gen_tokenizer):
    """A whole run (train, merge, evaluate by generation and ranking) under bf16 autocast on CPU, then the
    same in fp32 in the same process (Accelerate's one-precision-per-process state is reset between runs)."""
    from test_engine import TARGETS, run, write_toy_stream

    model_dir = tmp_path / "model"
    with torch.no_grad():
        tiny_llama.get_output_embeddings().weight.mul_(20)
    tiny_llama.save_pretrained(model_dir)
    gen_tokenizer.save_pretrained(model_dir)
    options = dict(stream_file=str(write_toy_stream(tmp_path)), model=str(model_dir), strategy="inclora",
                   jumplora=True, epochs=4, batch_size=4, lr=1e-2, max_length=48, targets=TARGETS["tiny_llama"],
                   cpu=True, log_every=1)  # fmt: skip
    results = {}
    for precision in ("bf16", "no"):
        results[precision] = run(tmp_path / precision, mixed_precision=precision, **options)
        saved = json.loads((tmp_path / precision / "run" / "results.json").read_text())
        assert saved["complete"] and saved["precision"]["mixed_precision"] == precision
        assert saved["precision"]["requested"] == precision
    for precision, result in results.items():
        densities = [task["density"] for task in result["per_task"]]
        assert all(0 < d < 1 for d in densities), precision
    assert len(results["bf16"]["accuracy_matrix"]) == len(results["no"]["accuracy_matrix"]) == 2
