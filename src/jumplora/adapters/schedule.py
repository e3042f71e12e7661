"""Gradual sparsification: γ ramps 0 → 1 over a window of a task's optimizer steps."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .sparsity import init_thresholds_to_budget, set_gamma


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


class Sparsifier:
    """Drives γ and the budget-matched θ re-initialisation of a model's JumpLoRA adapter.

    Call :meth:`before_step` before each optimizer step's forward pass. At the ramp start θ is set so
    the kept entries match the LoRA parameter budget (or ``target_density``), then γ follows the
    schedule. At the end of the task γ is 1 and the merge keeps exactly the gated entries.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: SparsitySchedule | int,
        adapter: str = "default",
        target_density: float | None = None,
    ) -> None:
        config = model.peft_config[adapter]  # TEMPORARY shim until the density branch lands
        if isinstance(schedule, int):
            schedule = SparsitySchedule(schedule, config.sparsify_start, config.sparsify_end)
            target_density = config.target_density
        self.model = model
        self.schedule = schedule
        self.adapter = adapter
        self.target_density = target_density
        self.initialised_at: int | None = None
        self.gamma = 0.0

    def before_step(self, step: int) -> float:
        if self.initialised_at is None and step >= self.schedule.start_step:
            init_thresholds_to_budget(self.model, self.adapter, self.target_density)
            self.initialised_at = step
        self.gamma = self.schedule.gamma(step) if self.initialised_at is not None else 0.0
        set_gamma(self.model, self.gamma, self.adapter)
        return self.gamma

    def finish(self) -> None:
        """End of task: make sure θ was initialised and the adapter is fully gated (γ = 1)."""
        if self.initialised_at is None:
            init_thresholds_to_budget(self.model, self.adapter, self.target_density)
            self.initialised_at = self.schedule.total_steps
        self.gamma = 1.0
        set_gamma(self.model, 1.0, self.adapter)

    def loss_term(self):
        return None

    def after_step(self, step: int) -> None:
        pass

    def log_state(self) -> dict:
        from .sparsity import sparsity_stats

        return {"gamma": self.gamma, "density": sparsity_stats(self.model)[0] if self.initialised_at is not None else None}

    def state_dict(self) -> dict:
        return {"initialised_at": self.initialised_at, "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        self.initialised_at, self.gamma = state["initialised_at"], state["gamma"]
