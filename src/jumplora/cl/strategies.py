"""Continual-learning strategies: each adds a loss term and acts at task start and task end.

A strategy never trains and never evaluates; the engine calls it at three points:
``on_task_start`` (the adapter for the task exists), ``loss_term`` (every step) and
``on_task_end`` (after the sparse merge, with the merged updates). State that must survive a
restart lives in ``state_tensors`` / ``load_state_tensors`` (saved with safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from jumplora.adapters import jumplora_layers
from jumplora.adapters.sparsity import MergeResult


@dataclass
class Strategy:
    """Base strategy: a fresh adapter per task, merged at the task's end, no extra loss (IncLoRA)."""

    name: str = "inclora"
    #: True: one adapter trained across the whole stream (merged only at the end).
    shares_adapter: bool = False
    #: True: ``on_task_end`` needs the merged updates (dense tensors; costs memory).
    needs_updates: bool = False

    def on_task_start(self, model: nn.Module, task_index: int) -> None:
        """Called once the task's adapter is on the model."""

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """Extra loss added to the task loss at every step (None: nothing)."""
        return None

    def on_task_end(self, task_index: int, merged: MergeResult | None) -> None:
        """Called after the task's update was merged (``merged`` is None while an adapter is shared)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"strategy {self.name!r} keeps no state, got {sorted(tensors)[:3]}")


@dataclass
class IncLoRA(Strategy):
    """A new adapter per task; earlier ones are frozen, which equals merging them into W."""

    name: str = "inclora"


@dataclass
class SeqLoRA(Strategy):
    """One adapter trained on task after task (the naive sequential fine-tuning baseline)."""

    name: str = "seqlora"
    shares_adapter: bool = True


@dataclass
class ELLA(Strategy):
    """ELLA: penalise the new update where past updates were large, λ·mean_l ‖ΔW_t ⊙ W_past‖²_F.

    ``ΔW_t`` is the effective (scaled, gated) update of the current adapter and ``W_past`` the sum of
    the merged updates of the earlier tasks, per module. The public release's λ = 3e4 suits T5's
    update scale; the right value depends on the model (see docs/RESULTS.md for MiniLM).
    """

    name: str = "ella"
    lam: float = 3e4
    needs_updates: bool = True

    def __post_init__(self) -> None:
        self.w_past: dict[str, torch.Tensor] = {}
        self._device_cache: dict[str, torch.Tensor] = {}

    def on_task_start(self, model: nn.Module, task_index: int) -> None:
        self._device_cache = {}
        for name, layer in jumplora_layers(model):
            if name in self.w_past:
                weight = layer.jumplora_A["default"]
                self._device_cache[name] = self.w_past[name].to(device=weight.device, dtype=weight.dtype)

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        if not self._device_cache:
            return None
        terms = [
            (layer.effective_delta("default") * self._device_cache[name]).square().sum()
            for name, layer in jumplora_layers(model)
            if name in self._device_cache
        ]
        return self.lam * torch.stack(terms).mean()

    def on_task_end(self, task_index: int, merged: MergeResult | None) -> None:
        if merged is None:
            return
        for name, update in merged.updates.items():
            self.w_past[name] = self.w_past[name] + update if name in self.w_past else update.clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"w_past.{name}": t.contiguous() for name, t in self.w_past.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.w_past = {k.removeprefix("w_past."): v for k, v in tensors.items() if k.startswith("w_past.")}


@dataclass
class OLoRA(Strategy):
    """O-LoRA: keep each new A orthogonal to the past A's, λ1·Σ|A_past·A_tᵀ| + λ2·(‖A_t‖² + ‖B_t‖²)."""

    name: str = "olora"
    lam_orth: float = 0.5
    lam_l2: float = 0.0

    def __post_init__(self) -> None:
        self.past_A: dict[str, torch.Tensor] = {}
        self._current: list[tuple[str, nn.Module]] = []
        self._past_on_device: dict[str, torch.Tensor] = {}

    def on_task_start(self, model: nn.Module, task_index: int) -> None:
        self._current = list(jumplora_layers(model))
        self._past_on_device = {}
        for name, layer in self._current:
            if name in self.past_A:
                a = layer.jumplora_A["default"]
                self._past_on_device[name] = self.past_A[name].to(device=a.device, dtype=a.dtype)

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        terms = []
        for name, layer in self._current:
            a_t = layer.jumplora_A["default"]
            if name in self._past_on_device and self.lam_orth:
                terms.append(self.lam_orth * (self._past_on_device[name] @ a_t.t()).abs().sum())
            if self.lam_l2:
                b_t = layer.jumplora_B["default"]
                terms.append(self.lam_l2 * (a_t.square().sum() + b_t.square().sum()))
        return torch.stack(terms).sum() if terms else None

    def on_task_end(self, task_index: int, merged: MergeResult | None) -> None:
        for name, layer in self._current:
            a_t = layer.jumplora_A["default"].detach().float().cpu()
            self.past_A[name] = torch.cat([self.past_A[name], a_t]) if name in self.past_A else a_t.clone()
        self._current = []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"past_A.{name}": t.contiguous() for name, t in self.past_A.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.past_A = {k.removeprefix("past_A."): v for k, v in tensors.items() if k.startswith("past_A.")}


STRATEGIES = {"inclora": IncLoRA, "seqlora": SeqLoRA, "ella": ELLA, "olora": OLoRA}
#: Reference rows the engine runs differently: all tasks jointly, or each task from scratch.
REFERENCE_MODES = ("multitask", "independent")


def make_strategy(
    name: str, *, ella_lambda: float = 3e4, olora_lambda: float = 0.5, olora_l2: float = 0.0
) -> Strategy:
    """Build a strategy by name (clear error for an unknown one)."""
    if name == "ella":
        return ELLA(lam=ella_lambda)
    if name == "olora":
        return OLoRA(lam_orth=olora_lambda, lam_l2=olora_l2)
    if name in STRATEGIES:
        return STRATEGIES[name]()
    known = ", ".join([*STRATEGIES, *REFERENCE_MODES])
    raise ValueError(f"unknown strategy {name!r}; choose one of: {known}")
