"""Experience Replay (ER; Chaudhry et al., 2019, "On Tiny Episodic Memories in Continual Learning").

At the end of each task a tiny episodic memory keeps ``memory_per_task`` of its training examples
(a seeded random choice). At every step of a later task a replay batch drawn from the whole memory
is run through the model, and ``weight`` × its loss is added to the current batch's loss: the
gradient then also serves the old tasks. With ``weight`` = 1 and a replay batch as large as the
training batch this is the paper's ER (its joint-batch mean is the two means' average, i.e. the same
objective up to a factor 2 in the step size).

The memory holds *indices* into ``ctx.train_features[task]``, and the replay batch of step k of task
t is drawn with the seed (run seed, t, k), k counted in the state: the state is a few integer
tensors, and a resumed run rebuilds the same memory and draws the same batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .base import Strategy, StrategyContext, register_strategy

if TYPE_CHECKING:
    from jumplora.adapters import MergeResult


@register_strategy("replay")
@dataclass
class ExperienceReplay(Strategy):
    """Experience Replay: the loss of a batch drawn from a tiny memory of past examples is added."""

    memory_per_task: int = field(default=50, metadata={"help": "examples kept per finished task"})
    replay_batch_size: int = field(default=0, metadata={"help": "examples per replay batch; 0: the batch size"})
    weight: float = field(default=1.0, metadata={"help": "factor on the replay loss"})

    def __post_init__(self) -> None:
        if self.memory_per_task < 0 or self.replay_batch_size < 0 or self.weight < 0:
            raise ValueError(f"strategy 'replay': arguments must be >= 0, got {self.hparams()}")
        self.memory: dict[int, torch.Tensor] = {}  # task index -> int64 indices into its train features
        self.step = 0  # replay batches drawn so far (the seed of the next one)

    def sample(self, ctx: StrategyContext) -> list[tuple[int, int]]:
        """The (task, example index) pairs the next ``loss_term`` replays; empty before any memory."""
        pool = [(task, int(i)) for task in sorted(self.memory) for i in self.memory[task]]
        size = min(self.replay_batch_size or ctx.batch_size, len(pool))
        return random.Random(f"replay:{ctx.seed}:{ctx.task_index}:{self.step}").sample(pool, size)

    def loss_term(self, ctx: StrategyContext, batch: dict, task_loss: torch.Tensor) -> torch.Tensor | None:
        from jumplora.models._utils import to_device  # here: transformers takes a second to import

        chosen = self.sample(ctx)
        if not chosen:
            return None
        self.step += 1
        features = [ctx.train_features[task][i] for task, i in chosen]
        replay = to_device(ctx.family.collate(features), ctx.device)
        return self.weight * ctx.family.loss(ctx.model, replay)

    def on_task_end(self, ctx: StrategyContext, merged: MergeResult | None) -> None:
        n = len(ctx.train_features[ctx.task_index])
        rng = random.Random(f"memory:{ctx.seed}:{ctx.task_index}")
        chosen = rng.sample(range(n), min(self.memory_per_task, n))
        if chosen:
            self.memory[ctx.task_index] = torch.tensor(sorted(chosen), dtype=torch.int64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"memory.{task}": idx for task, idx in self.memory.items()}
        return {**state, "step": torch.tensor([self.step], dtype=torch.int64)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        stray = [k for k in tensors if k != "step" and not k.startswith("memory.")]
        if stray or "step" not in tensors:
            raise ValueError(f"strategy 'replay': expected 'step' and memory.<task> keys, got {sorted(tensors)[:4]}")
        self.step = int(tensors["step"][0])
        self.memory = {int(k.removeprefix("memory.")): v.long() for k, v in tensors.items() if k != "step"}
