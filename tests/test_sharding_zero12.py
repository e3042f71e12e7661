"""Runs with DeepSpeed ZeRO-1/2 (``--shard zero1|zero2``): the adapter's AdamW state (and at stage 2 its gradients)
partitioned over the processes, and the same θ, kept entries and merged weights as one unsharded process.

The base model stays whole on every process; each task's adapter trains through DeepSpeed's ZeRO stage-1/2
optimizer (``jumplora.sharding_zero.AdapterZero``). The refusals run everywhere; the tests that run DeepSpeed
skip where it is not installed (it is in the ``dev`` extra). In one process (a world of one), DeepSpeed's
steps are checked against plain AdamW with writes to θ and A outside the optimizer between steps and θ
without a gradient before the ramp: DeepSpeed would overwrite such writes with its fp32 master copy, and
would count Adam steps for θ before its first gradient. The slow tests are real 2-process gloo runs on the
CPU of tests/test_sharding_zero.py's tiny LLaMA (q/v/up_proj adapted) on cb → rte through
tests/sharded_worker.py, against one unsharded process with the same batches (batch 4 × 2 processes against
batch 4 × ``--grad-accum 2``, as the FSDP2 and ZeRO-3 tests): ZeRO-2 asked for the ecosystem's way
(``accelerate launch --use_deepspeed --zero_stage 2``), ZeRO-1 by ``--shard zero1``. Observed on this machine:
θ at every log, densities, stored updates, masks and merged weights bit-identical to the single process.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sharding_zero import TARGETS, _odd_llama, _run_worker, launcher_env, odd_llama_dir, world_of_one  # noqa: F401

from jumplora.cl import Strategy
from jumplora.sharding import resolve_shard
from jumplora.train.hooks import StepHook, StrategyHook, gradient_readers


# -- refusals and choices (no DeepSpeed needed) ---------------------------------------------------------
@pytest.mark.parametrize("stage", ["1", "2"])
def test_zero12_from_accelerate_launch_is_chosen(launcher_env, stage):  # noqa: F811
    launcher_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=stage,
                 ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="none")  # fmt: skip
    assert resolve_shard("none", "continual") == f"zero{stage}"
    with pytest.raises(ValueError, match="conflicts"):
        resolve_shard("zero3", "continual")


@pytest.mark.parametrize(
    "setting",
    [{"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}],
)
def test_accelerate_zero2_settings_jumplora_would_not_apply_are_refused(launcher_env, setting):  # noqa: F811
    launcher_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2", **setting)
    (key,) = setting
    with pytest.raises(ValueError, match=key):
        resolve_shard("none", "continual")


@pytest.mark.parametrize("shard", ["zero1", "zero2"])
def test_mid_task_checkpoints_under_zero12_are_refused(launcher_env, shard):  # noqa: F811
    assert resolve_shard(shard, "continual", checkpoint_every=0) == shard
    with pytest.raises(ValueError, match=f"--checkpoint-every 3 under --shard {shard}"):
        resolve_shard(shard, "continual", checkpoint_every=3)
    assert resolve_shard("zero3", "continual", checkpoint_every=3) == "zero3"  # its AdamW is jumplora's own


def test_cli_refuses_mid_task_checkpoints_under_zero2(tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "jumplora.cli", "run", "--out", str(out), "--model", tiny_model, "--shard", "zero2",
         "--checkpoint-every", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --checkpoint-every 2 under --shard zero2" in proc.stderr
    assert not out.exists()


def test_hooks_acting_on_gradients_are_named():
    """What ZeRO-2 refuses (the loop raises with these names): it leaves no ``param.grad`` to act on."""

    class Projecting(Strategy):
        name = "projecting"

        def after_backward(self, ctx):
            """Would edit the gradients."""

    class Clipping(StepHook):
        def before_optimizer_step(self):
            """Would read the gradients."""

    hooks = [StrategyHook(Strategy(), None), StepHook(), StrategyHook(Projecting(), None), Clipping()]
    assert gradient_readers(hooks) == ["strategy 'projecting'", "step hook Clipping"]


# -- one process: DeepSpeed's steps against AdamW's --------------------------------------------------------
def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("stage", "max_grad_norm"), [(1, 0.0), (2, 0.0), (2, 0.05)])
def test_zero12_steps_like_adamw_and_keeps_writes_outside_the_optimizer(world_of_one, stage, max_grad_norm):  # noqa: F811
    """Five steps of DeepSpeed's ZeRO optimizer against plain AdamW on the same adapter and batches: γ = 0 for
    two steps (θ has no gradient), then θ and A are written outside the optimizer (as θ's budget init and
    scale tracking do), then γ = 1. Fails if a write is lost to DeepSpeed's master copy (θ and A would jump
    back) or if θ's Adam step count ran during the steps it had no gradient. With a clipping norm below
    every step's gradient norm (0.05), DeepSpeed's clipping against ``clip_grad_norm_``."""
    pytest.importorskip("deepspeed")
    import peft

    from jumplora import JumpLoraConfig
    from jumplora.adapters import set_gamma, threshold_parameters
    from jumplora.adapters.optim import param_groups
    from jumplora.sharding_zero import AdapterZero

    torch.manual_seed(1)
    plain = peft.get_peft_model(_odd_llama(), JumpLoraConfig(r=4, target_modules=TARGETS.split(",")))
    zero = copy.deepcopy(plain)
    adamw = torch.optim.AdamW(param_groups(plain, lr=0.01, theta_lr=0.05), lr=0.01)
    optimizer = torch.optim.AdamW(param_groups(zero, lr=0.01, theta_lr=0.05), lr=0.01)
    adapter_zero = AdapterZero(zero, optimizer, stage, batch_size=4, grad_accum=1, max_grad_norm=max_grad_norm,
                               device=torch.device("cpu"))  # fmt: skip
    batches = torch.randint(0, 30522, (5, 4, 16), generator=torch.Generator().manual_seed(2))
    for step, ids in enumerate(batches):
        for model in (plain, zero):
            set_gamma(model, 0.0 if step < 2 else 1.0)
            if step == 2:
                with torch.no_grad():
                    next(iter(threshold_parameters(model).values())).fill_(-6.5)  # log θ: 8 Adam steps of θ away
                    model.base_model.model.model.layers[0].self_attn.q_proj.jumplora_A["default"].mul_(0.5)
        plain(input_ids=ids, labels=ids).loss.backward()
        theta = next(iter(threshold_parameters(plain).values()))
        assert (theta.grad is None) == (step < 2)  # what AdamW skips
        if max_grad_norm:
            assert torch.nn.utils.clip_grad_norm_(list(_trainable(plain).values()), max_grad_norm) > max_grad_norm
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        adapter_zero.backward(adapter_zero.engine(input_ids=ids, labels=ids).loss)
        adapter_zero.step()
        for name, param in sorted(_trainable(plain).items(), key=lambda item: "theta" not in item[0]):  # θ first
            # clipped: DeepSpeed scales by 1/((norm + 1e-6)/max) where torch scales by max/(norm + 1e-6)
            torch.testing.assert_close(_trainable(zero)[name], param, rtol=0, atol=1e-5 if max_grad_norm else 1e-7,
                                       msg=functools.partial("{}, step {}: {}".format, name, step))  # fmt: skip
    adapter_zero.close()
    assert next(iter(threshold_parameters(zero).values())).item() != -6.5  # θ moved on from the write


# -- two processes ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(tmp_path_factory, odd_llama_dir) -> Path:  # noqa: F811
    """The unsharded single-process run both stages are compared with."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero12") / "one"
    _run_worker(out, odd_llama_dir, "none", 4, 2, processes=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_two_processes_match_one_process(tmp_path, odd_llama_dir, one_process, stage):  # noqa: F811
    from test_sharding import assert_same_theta_and_densities

    two = tmp_path / "two"
    if stage == 2:  # the ecosystem's way (no --shard), as a GPU user with a DeepSpeed habit would ask
        _run_worker(two, odd_llama_dir, "none", 4, 1, processes=2, mode=("--use_deepspeed", "--zero_stage", "2"))
    else:
        _run_worker(two, odd_llama_dir, "zero1", 4, 1, processes=2)
    one = one_process
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["config"]["shard"] == f"zero{stage}" and r1["complete"] and r2["complete"]
    assert_same_theta_and_densities(one, two, r1, r2)

    # DeepSpeed really partitioned: each process's optimizer held about half the adapter; ZeRO-2 left no gradient
    for rank in range(2):
        held = json.loads((two / f"rank{rank}.zero.json").read_text())
        assert held["adapter_elements"] / 2 <= held["partition_elements"] < held["adapter_elements"] / 2 + 8
        assert held["grads_after_backward"] == (0 if stage == 2 else held["adapter_tensors"])

    # the stored updates (to fp32 rounding; masks exactly)
    for name in json.loads((one / "checkpoint" / "state.json").read_text())["updates"]:
        a, b = load_file(str(one / "checkpoint" / name)), load_file(str(two / "checkpoint" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0 if key.endswith("::mask") else 1e-6)

    # the merged weights: whole on each process, each equal to the single process's
    w1 = load_file(str(one / "rank0.safetensors"))
    base = load_file(str(Path(odd_llama_dir) / "model.safetensors"))
    for rank in range(2):
        w2 = load_file(str(two / f"rank{rank}.safetensors"))
        assert w2.keys() == w1.keys()
        changed = 0
        for name in (k for k in w1 if "::" not in k):
            torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-6)
            changed += int(not torch.equal(w2[name], base[name]))
        assert changed == 6  # q_proj, v_proj and up_proj of both blocks, nothing else
    np.testing.assert_allclose(r2["accuracy_matrix"], r1["accuracy_matrix"])
