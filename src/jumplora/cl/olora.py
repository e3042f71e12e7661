"""O-LoRA: keep each new A orthogonal to the past A's, λ1·Σ_l |A_past·A_tᵀ| + λ2·(‖A_t‖² + ‖B_t‖²).

``A_past`` stacks the A matrices of the earlier tasks (rows), per module; the L2 term (off by
default) also acts on the first task. Sums run over the adapted modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .base import LayerView, Strategy, StrategyContext, register_strategy, strip_prefix

if TYPE_CHECKING:
    from jumplora.adapters import MergeResult


@register_strategy("olora")
@dataclass
class OLoRA(Strategy):
    """O-LoRA: loss + λ1·Σ|A_past·A_tᵀ| + λ2·(‖A_t‖² + ‖B_t‖²) puts each task in its own subspace."""

    lam_orth: float = field(default=0.5, metadata={"help": "λ1, orthogonality to the past A's"})
    lam_l2: float = field(default=0.0, metadata={"help": "λ2, L2 on the current A and B"})

    def __post_init__(self) -> None:
        if self.lam_orth < 0 or self.lam_l2 < 0:
            raise ValueError(f"strategy 'olora': lam_orth and lam_l2 must be >= 0, got {self.lam_orth}, {self.lam_l2}")
        self.past_A: dict[str, torch.Tensor] = {}  # CPU float32 (tasks·r, in), the state
        self._current: list[LayerView] = []  # the task's layers (gone from the model after the merge)
        self._past_on_device: dict[str, torch.Tensor] = {}

    def on_task_start(self, ctx: StrategyContext) -> None:
        self._current = ctx.layers()
        self._past_on_device = {}
        for view in self._current:
            if view.name in self.past_A:
                a = view.A
                self._past_on_device[view.name] = self.past_A[view.name].to(device=a.device, dtype=a.dtype)

    def loss_term(self, ctx: StrategyContext, batch: dict, task_loss: torch.Tensor) -> torch.Tensor | None:
        terms = []
        for view in self._current:
            a_t = view.A
            if view.name in self._past_on_device and self.lam_orth:
                terms.append(self.lam_orth * (self._past_on_device[view.name] @ a_t.t()).abs().sum())
            if self.lam_l2:
                b_t = view.B
                terms.append(self.lam_l2 * (a_t.square().sum() + b_t.square().sum()))
        return torch.stack(terms).sum() if terms else None

    def on_task_end(self, ctx: StrategyContext, merged: MergeResult | None) -> None:
        for view in self._current:
            a_t, past = view.A.detach().float().cpu(), self.past_A.get(view.name)
            self.past_A[view.name] = torch.cat([past, a_t]) if past is not None else a_t.clone()
        self._current = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"past_A.{name}": t.contiguous() for name, t in self.past_A.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.past_A = strip_prefix(tensors, "past_A.", self.name)
