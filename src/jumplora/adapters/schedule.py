"""Gradual sparsification (γ ramps 0 → 1 over a window of a task's optimizer steps) and density control.

θ is budget-matched when the ramp starts; afterwards ΔW keeps growing and the task loss alone can only
lower θ, so the density drifts up. The controlled modes add a θ-only term through the same straight-through
estimator as JumpReLU SAEs: d/dθ 1[|ΔW| > θ] ≈ −(1/ε)·K((|ΔW| − θ)/ε), K the rectangle kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import sharded
from .config import JumpLoraConfig
from .layer import JumpLoraLayer
from .sparsity import _layers_with, init_thresholds_to_budget, set_gamma, sparsity_stats


@dataclass(frozen=True)
class SparsitySchedule:
    """γ(step) = 0 before ``start``, 1 after ``end``, linear in between (fractions of ``total_steps``)."""

    total_steps: int
    start: float = 0.2
    end: float = 0.8

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")

    @property
    def start_step(self) -> int:
        return round(self.start * self.total_steps)

    @property
    def end_step(self) -> int:
        return round(self.end * self.total_steps)

    def gamma(self, step: int) -> float:
        """γ for the optimizer step about to be taken (``step`` counts steps already done)."""
        if step < self.start_step:
            return 0.0
        if step >= self.end_step:
            return 1.0
        return (step - self.start_step) / (self.end_step - self.start_step)


class _DensitySTE(torch.autograd.Function):
    """Value: the measured density of a group; gradient in θ: −(1/ε)·(fraction of entries in the kernel)."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, density: float, band_per_eps: float) -> torch.Tensor:
        ctx.band_per_eps = band_per_eps
        return torch.full_like(theta, density)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -grad * ctx.band_per_eps, None, None


@dataclass
class _Group:
    layers: list[JumpLoraLayer]
    entries: int
    target: float  # the target now: final_target, or on a falling path a point between start and final
    multiplier: float = 0.0
    start_target: float = 0.0
    final_target: float = 0.0
    density: float | None = None  # measured at the current step (for the penalty and the dual update)
    band_per_eps: float = 0.0
    scale: float | None = None  # mean |ΔW| when θ was last set or tracked
    process_group: Any = None  # the group the base weights are sharded over (None: not sharded)


def theta_learning_rate(model: nn.Module, adapter: str = "default") -> float | None:
    """θ's learning rate under a density controller (None: the optimizer's own, as the paper's rule)."""
    config = _find_config(model, adapter)
    return None if config.density_control == "none" or not config.sparse else config.controller_theta_lr


def _find_config(model: nn.Module, adapter: str) -> JumpLoraConfig:
    for module in (model, *model.modules()):
        config = getattr(module, "peft_config", None)
        if isinstance(config, dict) and isinstance(config.get(adapter), JumpLoraConfig):
            return config[adapter]
    raise ValueError(f"no JumpLoraConfig for adapter {adapter!r} on the model")


class Sparsifier:
    """Drives γ, the budget-matched θ init and the density controller of a model's JumpLoRA adapter.

    Schedule window, target density and control mode come from the adapter's :class:`JumpLoraConfig`
    (a :class:`SparsitySchedule` passed instead of ``total_steps`` overrides the window). Per optimizer
    step: :meth:`before_step`, add :meth:`loss_term` to the loss, backward + optimizer step,
    :meth:`after_step`; :meth:`finish` at the end of the task. θ is first set after at least one optimizer
    step, never from the all-zero update of a fresh adapter.
    """

    def __init__(self, model: nn.Module, total_steps: int | SparsitySchedule, adapter: str = "default") -> None:
        self.model = model
        self.adapter = adapter
        self.config = _find_config(model, adapter)
        cfg = self.config
        self.schedule = (
            total_steps
            if isinstance(total_steps, SparsitySchedule)
            else SparsitySchedule(total_steps, cfg.sparsify_start, cfg.sparsify_end)
        )
        self.mode = cfg.density_control
        self.target_density = cfg.target_density
        self.initialised_at: int | None = None
        self.finished = False
        self.gamma = 0.0
        self.penalty: float | None = None
        self.groups: dict[str, _Group] = {}
        sharded.reshard(model)
        for _, layer in _layers_with(model, adapter):
            if layer.sparse[adapter]:
                group = self.groups.setdefault(layer.threshold_group[adapter], _Group([], 0, 0.0))
                group.layers.append(layer)
        for group in self.groups.values():
            group.process_group = sharded.group_of(group.layers)
            group.entries = sum(m.in_features * m.out_features for m in group.layers)
            budget = sum(m.r[adapter] * (m.in_features + m.out_features) for m in group.layers)
            group.final_target = cfg.target_density if cfg.target_density is not None else budget / group.entries
            group.start_target = budget / group.entries if self.falling else group.final_target
            group.target = group.start_target
        # θ starts at the first target: the LoRA budget on a falling path (init_thresholds_to_budget's None)
        self.init_density = None if self.falling else self.target_density

    def _reshard(self) -> None:
        """FSDP2 units back to their shards before θ or ΔW is read; skipped (no module walk per step) unsharded."""
        if any(group.process_group is not None for group in self.groups.values()):
            sharded.reshard(self.model)

    @property
    def falling(self) -> bool:
        return self.config.target_path == "falling"

    def _set_targets(self, step: int) -> None:
        """A falling path's target: geometric from the start target at the ramp start to the final at its end."""
        if not self.falling:
            return  # a flat target is never recomputed (the shipped path, bit for bit)
        s = self.schedule
        t = min(max((step - s.start_step) / max(s.end_step - s.start_step, 1), 0.0), 1.0)
        for group in self.groups.values():
            group.target = group.start_target ** (1 - t) * group.final_target**t

    @property
    def init_step(self) -> int:
        """The step before which θ is set: the ramp start, but never before the first optimizer step."""
        return max(self.schedule.start_step, 1)

    @property
    def theta_lr(self) -> float | None:
        """θ's learning rate the optimizer should use (None: its own); set only under a controller."""
        return theta_learning_rate(self.model, self.adapter)

    @property
    def controlling(self) -> bool:
        return self.mode != "none" and self.initialised_at is not None and not self.finished and bool(self.groups)

    def before_step(self, step: int) -> float:
        self._reshard()
        self._set_targets(step)
        if self.initialised_at is None and step >= self.init_step:
            init_thresholds_to_budget(self.model, self.adapter, self.init_density)
            self.initialised_at = step
            for group in self.groups.values():
                self._measure(group)
        elif self.controlling:
            self._track_scale()
        self.gamma = self.schedule.gamma(step) if self.initialised_at is not None else 0.0
        set_gamma(self.model, self.gamma, self.adapter)
        return self.gamma

    def loss_term(self) -> torch.Tensor | None:
        """The θ-only density term (None under 'none' or outside the controlled window); no gradient to A, B."""
        if not self.controlling:
            return None
        total = None
        for group in self.groups.values():
            if group.density is None:
                self._measure(group)
            layer0 = group.layers[0]
            smooth = _DensitySTE.apply(layer0.theta(self.adapter), group.density, group.band_per_eps)
            if self.mode == "l0":
                weight = self.config.l0_lambda
            else:
                weight = group.multiplier + self.config.dual_gain * self._error(group)
            term = weight * smooth
            total = term if total is None else total + term
        total = total.sum()  # θ is 1-D (one element): the term is a scalar loss
        self.penalty = float(total.detach())
        return total

    @staticmethod
    def _error(group: _Group) -> float:
        """log(density / target): symmetric in ×k and ÷k, so the controller reacts alike above and below."""
        return math.log(max(group.density, 1.0 / group.entries) / group.target)

    @torch.no_grad()
    def _measure(self, group: _Group) -> None:
        """Density, kernel mass / ε and mean |ΔW| of one threshold group at the current θ and ΔW."""
        layer0 = group.layers[0]
        theta = layer0.theta(self.adapter).detach()
        eps = layer0.bandwidth[self.adapter]
        kept = band = 0
        total = 0.0
        for layer in group.layers:  # a sharded base: this process's rows of ΔW, then summed over processes
            magnitude = sharded.local_delta(layer, self.adapter).abs().float()
            kept += int((magnitude > theta).sum())
            band += int(((magnitude - theta).abs() < eps / 2).sum())
            total += float(magnitude.sum())
        kept, band, total = sharded.sum_over_processes([kept, band, total], group.process_group, theta.device)
        # At least one entry in the kernel: under Adam the sign of θ's gradient is what counts, and a θ that
        # has left every entry behind (an empty kernel) would otherwise never come back.
        group.density, group.band_per_eps = kept / group.entries, max(band, 1) / group.entries / eps
        group.scale = total / group.entries

    @torch.no_grad()
    def _track_scale(self) -> None:
        """θ ← θ·s_now/s_before with s = mean |ΔW| of the group: the optimizer cannot move log θ by more
        than its learning rate per step, while ΔW of a short task grows by 1.3–1.5× per step."""
        for group in self.groups.values():
            before = group.scale
            self._measure(group)
            if before and group.scale > 0:
                raw = group.layers[0].jumplora_theta[self.adapter]
                ratio = torch.tensor(group.scale / before, dtype=raw.dtype, device=raw.device)
                if group.layers[0].threshold_param[self.adapter] == "log":
                    raw.add_(ratio.log())
                else:
                    raw.mul_(ratio)
                self._measure(group)

    def after_step(self, step: int) -> None:
        """Dual ascent, multiplier += dual_lr·log(density/target), from the density measured at this step
        (unclipped: the density is held at the target from both sides)."""
        del step  # the update depends on the measured density only
        for group in self.groups.values():
            if self.mode == "dual" and group.density is not None:
                group.multiplier += self.config.dual_lr * self._error(group)
            group.density = None

    def finish(self) -> None:
        """End of task: make sure θ was initialised and the adapter is fully gated (γ = 1)."""
        self._reshard()
        self._set_targets(self.schedule.total_steps)
        if self.initialised_at is None:
            init_thresholds_to_budget(self.model, self.adapter, self.target_density)
            self.initialised_at = self.schedule.total_steps
        elif self.controlling:
            self._track_scale()  # the last optimizer step grew ΔW too
        self.finished = True
        self.gamma = 1.0
        set_gamma(self.model, 1.0, self.adapter)

    def overall_target(self) -> float | None:
        entries = sum(g.entries for g in self.groups.values())
        return sum(g.target * g.entries for g in self.groups.values()) / entries if entries else None

    def log_state(self) -> dict[str, float | None]:
        """γ, density against its target, and the controller state (for train_log.jsonl and plots)."""
        initialised = self.initialised_at is not None and bool(self.groups)
        multipliers = [g.multiplier for g in self.groups.values()]
        return {
            "gamma": self.gamma,
            "density": sparsity_stats(self.model, self.adapter)[0] if initialised else None,
            "target_density": self.overall_target(),
            "multiplier": sum(multipliers) / len(multipliers) if self.mode == "dual" and multipliers else None,
            "density_penalty": self.penalty,
        }

    def state_dict(self) -> dict:
        return {
            "initialised_at": self.initialised_at,
            "finished": self.finished,
            "gamma": self.gamma,
            "multipliers": {name: g.multiplier for name, g in self.groups.items()},
            "scales": {name: g.scale for name, g in self.groups.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.initialised_at = state["initialised_at"]
        self.finished = state.get("finished", False)
        self.gamma = state["gamma"]
        for name, value in state.get("multipliers", {}).items():
            self.groups[name].multiplier = float(value)
        for name, value in state.get("scales", {}).items():  # the scale tracking continues from here
            self.groups[name].scale = None if value is None else float(value)
        for name, value in state.get("scales", {}).items():
            self.groups[name].scale = value
        set_gamma(self.model, self.gamma, self.adapter)
