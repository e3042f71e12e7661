"""What the seq2seq and decoder-only families share: the answer is text the model produces.

Training is cross-entropy on the answer tokens only; prediction is greedy generation, or, with
``rank_options``, the option whose tokens the model finds most likely. Subclasses say how to tokenise,
how to score candidates and how to generate.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from ._utils import answer_token_loss
from .base import ModelFamily


class GenerativeFamily(ModelFamily):
    """Loss on answer tokens; predict by greedy generation or by ranking the options."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 256,
        max_answer_length: int = 16,
        rank_options: bool = False,
        rank_batch_size: int = 16,
    ) -> None:
        if max_answer_length < 1:
            raise ValueError(f"max_answer_length must be >= 1, got {max_answer_length}")
        super().__init__(tokenizer, max_length)
        self.max_answer_length = max_answer_length
        self.rank_options = rank_options
        self.rank_batch_size = max(1, rank_batch_size)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return answer_token_loss(model, batch)

    def predict(self, model: torch.nn.Module, batch: dict) -> list[str]:
        if not self.rank_options:
            return self.generate(model, batch)
        scores = self.candidate_log_likelihoods(model, batch)
        return [cands[int(s.argmax())] for cands, s in zip(batch["candidates"], scores, strict=True)]

    def candidate_log_likelihoods(self, model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
        """Per example, the summed log-prob of each of its candidates (+eos)."""
        if "candidate_ids" not in batch:
            raise ValueError("batch has no candidate_ids: build the family with rank_options=True")
        return self._score_candidates(model, batch)

    @abstractmethod
    def _score_candidates(self, model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
        """:meth:`candidate_log_likelihoods` once the batch is known to carry candidate ids."""

    @abstractmethod
    def generate(self, model: torch.nn.Module, batch: dict) -> list[str]:
        """Greedy answers, decoded and stripped."""
