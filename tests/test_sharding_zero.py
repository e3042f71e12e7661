"""Sharded runs with DeepSpeed ZeRO-3 (``--shard zero3``): the same θ, kept entries and merged weights as one
unsharded process.

DeepSpeed is an optional dependency (``pip install 'jumplora[deepspeed]'``, in ``dev`` too), so the tests that
run it skip where it is not installed; the refusals run everywhere (ZeRO-1/2: tests/test_sharding_zero12.py).
The slow tests are real 2-process gloo runs on the CPU of a tiny LLaMA on cb → rte: the equivalence test asks
for ZeRO-3 the ecosystem's way (``accelerate launch --use_deepspeed --zero_stage 3 --num_processes 2``, no
``--shard``) through tests/sharded_worker.py, set up like the FSDP2 test (tests/test_sharding.py: one process
with batch 4 and ``--grad-accum 2`` sees what the two see); the kill-and-resume test uses ``--shard zero3``
under ``accelerate launch --multi_gpu``.
The tiny LLaMA's MLP is 63 wide and up_proj is adapted too: its 63 rows are split by ZeRO-3's flat halves in
the middle of row 31, which the merge and the budget select must handle.

All runs take the JumpLoRA layers' reference path (ZeRO-3 always does, see ``sharding.fit_adapter``).
Observed on this machine: against ZeRO-3 in one process, everything bit-identical; against the unsharded
process, θ and the kept entries identical and the stored updates and merged weights within 2.1e-6. Not
bit-equal there because DeepSpeed wraps each module's inputs and outputs in autograd nodes, which regroups
the sums of the residual stream's gradient branches (bench/zero3_cpu_probe.py); AdamW then carries the
last-bit differences of the adapter's gradients into its steps. The merge itself is bit-equal to the
unsharded merge (the one-process test below).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jumplora.data import resolve_data_dir
from jumplora.sharding import fit_adapter, resolve_shard

WORKER = Path(__file__).with_name("sharded_worker.py")
TARGETS = "q_proj,v_proj,up_proj"


# -- refusals (no DeepSpeed needed) ---------------------------------------------------------------------
@pytest.fixture
def launcher_env(monkeypatch):
    """A clean environment with DeepSpeed findable (whether or not it is installed): set(key=value, ...)."""
    import importlib.util

    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    real = importlib.util.find_spec
    findable = lambda name, *a: object() if name == "deepspeed" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", findable)
    return lambda **env: [monkeypatch.setenv(k, v) for k, v in env.items()]


def test_zero3_from_accelerate_launch_is_chosen(launcher_env):
    launcher_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
                 ACCELERATE_DEEPSPEED_ZERO3_INIT="true", ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="none")  # fmt: skip
    assert resolve_shard("none", "continual") == "zero3"
    assert resolve_shard("zero3", "continual") == "zero3"
    with pytest.raises(ValueError, match="conflicts"):
        resolve_shard("fsdp2", "continual")


@pytest.mark.parametrize(
    "setting",
    [
        {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"},
        {"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"},
        {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"},
        {"ACCELERATE_GRADIENT_CLIPPING": "1.0"},
    ],
)
def test_accelerate_zero3_settings_jumplora_would_not_apply_are_refused(launcher_env, setting):
    launcher_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3", **setting)
    (key,) = setting
    with pytest.raises(ValueError, match=key):
        resolve_shard("none", "continual")


def test_zero3_without_deepspeed_is_refused_before_loading(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ValueError, match=r"jumplora\[deepspeed\]"):
        resolve_shard("zero3", "continual")


def test_zero3_takes_the_reference_path_and_fsdp2_keeps_the_fused_one():
    from jumplora import JumpLoraConfig

    assert fit_adapter(JumpLoraConfig(r=4, target_modules=["q_proj"]), "fsdp2").fused
    assert not fit_adapter(JumpLoraConfig(r=4, target_modules=["q_proj"]), "zero3").fused


# -- one process, ZeRO-3 at world size one --------------------------------------------------------------
def _odd_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=63, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=101, eos_token_id=102,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture
def world_of_one():
    """A gloo process group of one for this test only (ZeRO-3 needs one; later tests must not see it)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    had_local_rank = "LOCAL_RANK" in os.environ
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None:  # DeepSpeed's groups on this one go with it
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    if not had_local_rank:  # ZeRO-3 sets it for a world of one; the launches of later tests must not inherit it
        os.environ.pop("LOCAL_RANK", None)


def test_zero3_merge_into_the_shards_is_bit_equal_to_the_plain_merge(world_of_one):
    """Budget θ by the global select and the merge into ``ds_tensor``, against the gathered rule."""
    pytest.importorskip("deepspeed")
    import peft

    from jumplora import JumpLoraConfig
    from jumplora.adapters import sharded_zero
    from jumplora.adapters.sparsity import init_thresholds_to_budget, merge_and_discard
    from jumplora.sharding import shard_base_model

    plain = _odd_llama()
    zero = shard_base_model(copy.deepcopy(plain), torch.device("cpu"), "zero3")
    up_proj = zero.model.layers[0].mlp.up_proj.weight
    assert sharded_zero.is_zero_param(up_proj) and up_proj.numel() == 0  # partitioned: only ds_tensor holds it
    results = []
    for model in (plain, zero):
        config = fit_adapter(JumpLoraConfig(r=4, target_modules=TARGETS.split(","), gamma=1.0), "zero3")
        torch.manual_seed(1)
        peft_model = peft.get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "jumplora_B" in name:
                    param.normal_(0, 0.1)
        theta = init_thresholds_to_budget(peft_model)
        merged = merge_and_discard(peft_model, keep_updates=True)
        results.append((theta, merged))
    (theta1, m1), (theta2, m2) = results
    assert theta1 == theta2
    assert all(torch.equal(m1.supports[k], m2.supports[k]) for k in m1.supports)
    for name, param in plain.named_parameters():
        held = dict(zero.named_parameters())[name]
        torch.testing.assert_close(sharded_zero.local_weight(held), param.detach().reshape(-1), rtol=0, atol=0)


# -- two processes --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_llama_dir(tmp_path_factory, minilm_path) -> str:
    folder = tmp_path_factory.mktemp("odd_llama")
    _odd_llama().save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True, eos_token="[SEP]", bos_token="[CLS]")
    tokenizer.save_pretrained(folder)
    return str(folder)


def _run_worker(
    out: Path, model: str, shard: str, batch: int, accum: int, processes: int, device: str = "cpu", **launch
) -> None:
    from test_sharding import _launch

    data = str(resolve_data_dir())
    args = [str(WORKER), str(out), model, data, shard, str(batch), str(accum), device, "reference", TARGETS]
    proc = _launch(args, processes, **launch)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _assembled(run: Path) -> dict[str, torch.Tensor]:
    """Every base weight, flattened, put together from each process's dump (row blocks or ZeRO-3 flat slices)."""
    parts = [load_file(str(p)) for p in sorted(run.glob("rank*.safetensors"))]
    out = {}
    for name in (k for k in parts[0] if "::" not in k):
        key = f"{name}::first_element" if f"{name}::first_element" in parts[0] else f"{name}::first_row"
        blocks = sorted((int(p[key]), p[name].reshape(-1)) for p in parts)
        out[name] = torch.cat([block for _, block in blocks])
    return out


def _assert_bit_identical(run: Path, other: Path) -> None:
    """θ at every log, densities, stored updates and merged weights all bit-identical."""
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (run, other))
    assert json.loads((run / "rank0.json").read_text()) == json.loads((other / "rank0.json").read_text())
    assert [t["density"] for t in r1["per_task"]] == [t["density"] for t in r2["per_task"]]
    for name in json.loads((run / "checkpoint" / "state.json").read_text())["updates"]:
        a, b = load_file(str(run / "checkpoint" / name)), load_file(str(other / "checkpoint" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    w1, w2 = _assembled(run), _assembled(other)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow
def test_zero3_two_processes_match_one_process(tmp_path, odd_llama_dir):
    pytest.importorskip("deepspeed")
    from test_sharding import assert_same_theta_and_densities
    one, one_zero3, two = tmp_path / "one", tmp_path / "one_zero3", tmp_path / "two"
    _run_worker(one, odd_llama_dir, "none", 4, 2, processes=1)
    _run_worker(one_zero3, odd_llama_dir, "zero3", 4, 2, processes=1)
    # the ecosystem's way (no --shard): accelerate launch's DeepSpeed request, as a GPU user would ask
    _run_worker(two, odd_llama_dir, "none", 4, 1, processes=2, mode=("--use_deepspeed", "--zero_stage", "3"))
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["config"]["shard"] == "zero3" and r1["complete"] and r2["complete"]
    _assert_bit_identical(one_zero3, two)

    assert_same_theta_and_densities(one, two, r1, r2)

    # the stored updates (to fp32 rounding)
    for name in json.loads((one / "checkpoint" / "state.json").read_text())["updates"]:
        a, b = load_file(str(one / "checkpoint" / name)), load_file(str(two / "checkpoint" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0 if key.endswith("::mask") else 1e-5)

    # the merged weights as the processes hold them (flat halves), against the single process's
    w1, w2 = _assembled(one), _assembled(two)
    second = load_file(str(two / "rank1.safetensors"))  # really partitioned: process 1 holds the second half
    assert int(second["model.layers.0.mlp.up_proj.weight::first_element"]) == 1008  # row 31 of 63, split
    assert second["model.layers.0.mlp.up_proj.weight"].shape == (1008,)
    base = {k: v.reshape(-1) for k, v in load_file(str(Path(odd_llama_dir) / "model.safetensors")).items()}
    changed = 0
    for name, weight in w1.items():
        torch.testing.assert_close(w2[name], weight, rtol=0, atol=1e-5)
        changed += int(not torch.equal(weight, base[name]))
    assert changed == 6  # q_proj, v_proj and up_proj of both blocks, nothing else
    np.testing.assert_allclose(r2["accuracy_matrix"], r1["accuracy_matrix"])


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="on CPU the 2-process test runs ZeRO-3 in one process")
def test_zero3_world_size_one_matches_unsharded_on_cuda(tmp_path, odd_llama_dir):
    """One process, no launcher, on CUDA (bench/gpu.sh; one GPU allows no more): ZeRO-3 over a world of one
    against the unsharded run."""
    pytest.importorskip("deepspeed")
    plain, zero3 = tmp_path / "plain", tmp_path / "zero3"
    _run_worker(plain, odd_llama_dir, "none", 8, 1, processes=1, device="cuda")
    _run_worker(zero3, odd_llama_dir, "zero3", 8, 1, processes=1, device="cuda")
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (plain, zero3))
    assert r2["config"]["shard"] == "zero3" and r2["complete"]
    assert [t["thresholds"] for t in r2["per_task"]] == [t["thresholds"] for t in r1["per_task"]]
    assert [t["density"] for t in r2["per_task"]] == [t["density"] for t in r1["per_task"]]
    w1, w2 = _assembled(plain), _assembled(zero3)
    for name, weight in w1.items():
        torch.testing.assert_close(w2[name], weight, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_zero3_killed_mid_task_resumes_to_the_same_run(tmp_path, odd_llama_dir):
    """kill -9 of both processes right after a mid-task checkpoint of task 2, then --resume under ZeRO-3:
    the first task's stored update goes back into each process's slices (the partial row included)."""
    pytest.importorskip("deepspeed")
    from test_sharding import _env, _launch

    def cli(out: Path, *extra: str) -> list[str]:
        return [
            "-m", "jumplora.cli", "run", "--out", str(out), "--tasks", "cb,rte", "--model", odd_llama_dir,
            "--data-dir", str(resolve_data_dir()), "--max-train", "24", "--max-eval", "8", "--max-length", "64",
            "--batch-size", "4", "--lr", "0.01", "--jumplora", "--cpu", "--quiet", "--log-every", "1",
            "--no-plots", "--checkpoint-every", "1", "--shard", "zero3", "--targets", TARGETS, *extra,
        ]  # fmt: skip

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _launch(cli(straight), 2).returncode == 0
    plugin = ("--plugin", str(Path(__file__).with_name("fault_plugin.py")))  # the kill point's injector
    proc = _launch(cli(killed, *plugin), 2, env={**_env(), "JUMPLORA_TEST_KILL_AT": "step:4"})
    assert proc.returncode != 0
    state = json.loads((killed / "checkpoint" / "state.json").read_text())
    assert state["next_task"] == 1 and state["partial"] is not None
    proc = _launch(cli(killed, "--resume"), 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, killed))
    assert b["complete"] and a["config"]["shard"] == b["config"]["shard"] == "zero3"
    assert b["accuracy_matrix"] == a["accuracy_matrix"] and b["zero_shot"] == a["zero_shot"]
    assert [t["thresholds"] for t in b["per_task"]] == [t["thresholds"] for t in a["per_task"]]
    assert [t["density"] for t in b["per_task"]] == [t["density"] for t in a["per_task"]]
    for name in json.loads((straight / "checkpoint" / "state.json").read_text())["updates"]:
        u, v = load_file(str(straight / "checkpoint" / name)), load_file(str(killed / "checkpoint" / name))
        assert u.keys() == v.keys() and all(torch.equal(u[k], v[k]) for k in u)
