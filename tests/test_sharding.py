"""Sharded runs (``--shard fsdp2``): the same θ, kept entries and merged weights as one unsharded process.

The fast tests check the pieces in one process: the global radix select against ``kthvalue``, θ's
one-element shape (and old 0-dim θ still loading), and every way of asking for a backend jumplora does
not run being refused with exit 2. The slow tests are real 2-process gloo runs on the CPU
(``accelerate launch --multi_gpu --num_processes 2``, as tests/test_multiprocess.py) of a tiny LLaMA on
cb → rte, through tests/sharded_worker.py, which dumps each process's block of every merged weight.

Equivalence set-up: one process with batch 4 and ``--grad-accum 2`` sees, per optimizer step, exactly
the two batches of 4 that the two processes see (Accelerate hands batch 2k to rank 0 and 2k+1 to rank
1), and averaging two micro-batch losses is what averaging the processes' gradients does, token-mean
losses included. Observed on this machine: θ, masks and merged weights bit-identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jumplora.adapters.sharded import kth_smallest, threshold_keeping
from jumplora.adapters.sparsity import _threshold_keeping
from jumplora.data import resolve_data_dir
from jumplora.run.trainer import RUNNER_TYPES
from jumplora.sharding import resolve_shard

WORKER = Path(__file__).with_name("sharded_worker.py")


# -- one process -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_radix_select_is_kthvalue(seed):
    gen = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(n, generator=gen).abs() for n in (37, 1, 200)]
    chunks.append(chunks[0][:5].clone())  # ties across chunks
    chunks.append(torch.zeros(3))  # exact zeros (a fresh B)
    values = torch.cat(chunks)
    for k in (1, 2, 50, values.numel() - 1, values.numel()):
        assert kth_smallest(chunks, k, None) == torch.kthvalue(values, k).values
    for keep in (0, 1, 17, 120, values.numel()):
        assert threshold_keeping(chunks, keep, values.numel(), None) == _threshold_keeping(values, keep)


def test_theta_is_one_element_and_old_zero_dim_theta_loads(tiny_llama):
    import peft

    from jumplora import JumpLoraConfig
    from jumplora.training_state import adapter_tensors, load_adapter_tensors

    model = peft.get_peft_model(tiny_llama, JumpLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tensors = adapter_tensors(model)
    thetas = [k for k in tensors if "jumplora_theta" in k]
    assert thetas and all(tensors[k].shape == (1,) for k in thetas)
    old = {k: (v.reshape(()) if k in thetas else v).clone() for k, v in tensors.items()}
    for k in thetas:
        old[k].fill_(-3.0)
    load_adapter_tensors(model, old, "an old checkpoint")  # mid-task checkpoints written before the change
    assert all(float(p.detach()) == -3.0 for n, p in model.named_parameters() if "jumplora_theta" in n)
    old = {k: (v.reshape(()) if k in thetas else v).clone().fill_(-2.0) for k, v in tensors.items()}
    peft.set_peft_model_state_dict(model, {k.replace(".default", ""): v for k, v in old.items()})  # saved adapters
    assert all(float(p.detach()) == -2.0 for n, p in model.named_parameters() if "jumplora_theta" in n)


@pytest.mark.parametrize(
    ("env", "shard", "runner", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, "none", "continual", "zero0"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "none", "continual", "fsdp1"),
        ({}, "fsdp2", "independent", "independent"),
        ({}, "fsdp2", "continual+bf16", "mixed-precision"),
    ],
)
def test_backends_not_run_as_asked_are_refused(monkeypatch, env, shard, runner, message):
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runner, _, precision = runner.partition("+")
    with pytest.raises(ValueError, match=message):
        resolve_shard(shard, runner, precision or "no", RUNNER_TYPES[runner].shard_refusal)


def test_fsdp2_from_accelerate_config_is_chosen(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert resolve_shard("none", "continual") == "fsdp2"


def test_cli_refuses_an_unsupported_shard(tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "jumplora.cli", "run", "--out", str(out), "--model", tiny_model, "--shard", "fsdp1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "shard" in proc.stderr and "fsdp1" in proc.stderr
    assert not out.exists()


# -- two processes -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, minilm_path) -> str:
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=101, eos_token_id=102,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True, eos_token="[SEP]", bos_token="[CLS]")
    tokenizer.save_pretrained(folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUMPLORA_TEST_", "ACCELERATE_"))}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _launch(
    args: list[str], processes: int, env: dict[str, str] | None = None, mode: tuple[str, ...] = ("--multi_gpu",)
) -> subprocess.CompletedProcess:
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ] if processes > 1 else [sys.executable]  # fmt: skip
    return subprocess.run([*launcher, *args], env=env or _env(), capture_output=True, text=True, timeout=300)


def _worker(
    out: Path, model: str, shard: str, batch: int, accum: int, processes: int, device: str = "cpu", **launch
) -> None:
    args = [str(WORKER), str(out), model, str(resolve_data_dir()), shard, str(batch), str(accum), device]
    proc = _launch(args, processes, **launch)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _assembled(run: Path) -> dict[str, torch.Tensor]:
    """Every base weight, its row blocks put together from each process's dump."""
    parts = [load_file(str(p)) for p in sorted(run.glob("rank*.safetensors"))]
    out = {}
    for name in (k for k in parts[0] if not k.endswith("::first_row")):
        blocks = sorted((int(p[f"{name}::first_row"]), p[name]) for p in parts)
        out[name] = torch.cat([block for _, block in blocks])
    return out


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tmp_path, tiny_llama_dir):
    """FSDP2 asked for the ecosystem's way (accelerate launch --use_fsdp --fsdp_version 2, no --shard)."""
    one, two = tmp_path / "one", tmp_path / "two"
    _worker(one, tiny_llama_dir, "none", 4, 2, processes=1)
    _worker(two, tiny_llama_dir, "none", 4, 1, processes=2, mode=("--use_fsdp", "--fsdp_version", "2"))
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["config"]["shard"] == "fsdp2" and r1["complete"] and r2["complete"]
    assert len(list(two.glob("rank*.safetensors"))) == 2

    assert_same_theta_and_densities(one, two, r1, r2)

    # the stored updates
    for name in json.loads((one / "checkpoint" / "state.json").read_text())["updates"]:
        a, b = load_file(str(one / "checkpoint" / name)), load_file(str(two / "checkpoint" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the merged weights, as the processes hold them (row blocks), against the single process's
    w1, w2 = _assembled(one), _assembled(two)
    second = load_file(str(two / "rank1.safetensors"))  # really sharded: process 1 holds rows 16-31 only
    assert int(second["model.layers.0.self_attn.q_proj.weight::first_row"]) == 16
    assert second["model.layers.0.self_attn.q_proj.weight"].shape == (16, 32)
    base = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    changed = 0
    for name, weight in w1.items():
        torch.testing.assert_close(w2[name], weight, rtol=0, atol=1e-6)
        changed += int(not torch.equal(weight, base[name]))
    assert changed == 4  # q_proj and v_proj of both blocks, nothing else
    np.testing.assert_allclose(r2["accuracy_matrix"], r1["accuracy_matrix"])


@pytest.mark.slow
def test_fsdp2_killed_mid_task_resumes_to_the_same_run(tmp_path, tiny_llama_dir):
    """kill -9 of both processes right after a mid-task checkpoint of task 2, then --resume, sharded."""

    def cli(out: Path, *extra: str) -> list[str]:
        return [
            "-m", "jumplora.cli", "run", "--out", str(out), "--tasks", "cb,rte", "--model", tiny_llama_dir,
            "--data-dir", str(resolve_data_dir()), "--max-train", "24", "--max-eval", "8", "--max-length", "64",
            "--batch-size", "4", "--lr", "0.01", "--jumplora", "--cpu", "--quiet", "--log-every", "1",
            "--no-plots", "--checkpoint-every", "1", "--shard", "fsdp2", *extra,
        ]  # fmt: skip

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _launch(cli(straight), 2).returncode == 0
    plugin = ("--plugin", str(Path(__file__).with_name("fault_plugin.py")))  # the kill point's injector
    proc = _launch(cli(killed, *plugin), 2, env={**_env(), "JUMPLORA_TEST_KILL_AT": "step:4"})
    assert proc.returncode != 0
    state = json.loads((killed / "checkpoint" / "state.json").read_text())
    assert state["next_task"] == 1 and state["partial"] is not None
    assert not json.loads((killed / "results.json").read_text())["complete"]
    proc = _launch(cli(killed, "--resume"), 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, killed))
    assert b["complete"]
    assert b["accuracy_matrix"] == a["accuracy_matrix"] and b["zero_shot"] == a["zero_shot"]
    assert [t["thresholds"] for t in b["per_task"]] == [t["thresholds"] for t in a["per_task"]]
    assert [t["density"] for t in b["per_task"]] == [t["density"] for t in a["per_task"]]
    for name in json.loads((straight / "checkpoint" / "state.json").read_text())["updates"]:
        u, v = load_file(str(straight / "checkpoint" / name)), load_file(str(killed / "checkpoint" / name))
        assert u.keys() == v.keys() and all(torch.equal(u[k], v[k]) for k in u)


@pytest.mark.slow
def test_fsdp2_world_size_one_matches_unsharded(tmp_path, tiny_llama_dir):
    """One process, no launcher: --shard fsdp2 makes a world of one and gives the unsharded run bit for bit.
    On a GPU machine this runs on CUDA (bench/gpu.sh runs it there)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    _worker(plain, tiny_llama_dir, "none", 8, 1, processes=1, device=device)
    _worker(sharded, tiny_llama_dir, "fsdp2", 8, 1, processes=1, device=device)
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (plain, sharded))
    assert r2["config"]["shard"] == "fsdp2"
    assert [t["thresholds"] for t in r2["per_task"]] == [t["thresholds"] for t in r1["per_task"]]
    assert [t["density"] for t in r2["per_task"]] == [t["density"] for t in r1["per_task"]]
    w1, w2 = _assembled(plain), _assembled(sharded)
    for name, weight in w1.items():
        torch.testing.assert_close(w2[name], weight, rtol=0, atol=1e-6)


def assert_same_theta_and_densities(one: Path, two: Path, r1: dict, r2: dict) -> None:
    """θ the same on both processes at every log and task end and equal to the single process's; the same
    density per task, something merged but not everything (test_sharding_zero uses it too)."""
    seen = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1] == json.loads((one / "rank0.json").read_text())
    assert [t["thresholds"] for t in r2["per_task"]] == [t["thresholds"] for t in r1["per_task"]]
    assert [t["density"] for t in r2["per_task"]] == [t["density"] for t in r1["per_task"]]
    assert all(0.05 < t["density"] < 0.95 for t in r2["per_task"])
