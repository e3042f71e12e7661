"""ELLA: penalise the new update where the past updates were large, λ·mean_l ‖ΔW_t ⊙ W_past‖²_F.

``ΔW_t`` is the effective (scaled, gated) update of the current adapter, ``LayerView.delta()``,
so θ and the γ ramp shape the penalty as they shape the forward pass. ``W_past`` sums, per module and in
the (out, in) layout of ``MergeResult.updates``, each earlier task's ungated update s·B·A (``past="dense"``,
the default: what the task learned) or the update that was merged (``past="merged"``). Without JumpLoRA
the two are the same. With it the merged updates are sparse, so a merged W_past covers only their few
entries and the new task simply avoids them: on SmolLM2 its kept entries never met W_past's support and
ELLA + JumpLoRA did no better than IncLoRA + JumpLoRA (docs/RESULTS.md, with the ablation).
The mean runs over the adapted modules that have a past update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .base import LayerView, Strategy, StrategyContext, register_strategy, strip_prefix

if TYPE_CHECKING:
    from jumplora.adapters import MergeResult

PAST_KINDS = ("merged", "dense")


@register_strategy("ella")
@dataclass
class ELLA(Strategy):
    """ELLA: loss + λ·mean_l ‖ΔW_t ⊙ W_past‖² keeps new updates off the entries earlier tasks used."""

    lam: float = field(default=3e4, metadata={"help": "the public release's λ; suits T5's update scale"})
    past: str = field(
        default="dense", metadata={"help": "W_past sums the 'dense' s·B·A updates or the 'merged' (gated) ones"}
    )

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"strategy 'ella': lam must be >= 0, got {self.lam}")
        if self.past not in PAST_KINDS:
            raise ValueError(f"strategy 'ella': past must be one of {', '.join(PAST_KINDS)}, got {self.past!r}")
        self.w_past: dict[str, torch.Tensor] = {}  # CPU float32, the state
        self._on_device: dict[str, torch.Tensor] = {}  # W_past on the model's device and dtype
        self._current: list[LayerView] = []  # the task's layers (gone from the model after the merge)

    def on_task_start(self, ctx: StrategyContext) -> None:
        self._on_device = {}
        self._current = ctx.layers()
        for view in self._current:
            if view.name in self.w_past:
                weight = view.A
                self._on_device[view.name] = self.w_past[view.name].to(device=weight.device, dtype=weight.dtype)

    def loss_term(self, ctx: StrategyContext, batch: dict, task_loss: torch.Tensor) -> torch.Tensor | None:
        if not self._on_device:
            return None
        terms = [
            (view.delta() * self._on_device[view.name]).square().sum()
            for view in ctx.layers()
            if view.name in self._on_device
        ]
        return self.lam * torch.stack(terms).mean()

    def on_task_end(self, ctx: StrategyContext, merged: MergeResult | None) -> None:
        if merged is None:
            return
        updates = merged.updates
        if self.past == "dense":
            with torch.no_grad():
                updates = {view.name: view.delta(gamma=0.0).float().cpu() for view in self._current}
        for name, update in updates.items():
            self.w_past[name] = self.w_past[name] + update if name in self.w_past else update.clone()
        self._current = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"w_past.{name}": t.contiguous() for name, t in self.w_past.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.w_past = strip_prefix(tensors, "w_past.", self.name)
