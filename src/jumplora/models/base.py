"""Common interface every model family implements, plus the prompt example type.

A *model family* turns prompt examples into tensors, a batch into a training loss, and a batch into
predicted strings. The training loop and the evaluator only talk to this interface, so encoders,
encoder-decoders and decoder-only models can be swapped without touching the training loop.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ModelFamily", "PromptExample", "exact_match", "normalize_answer"]


@dataclass(frozen=True)
class PromptExample:
    """One classification example posed as a text prompt."""

    prompt: str  # e.g. "Task Instruction: ...\nOptions: a | b\nText: ...\nAnswer:"
    answer: str  # gold option string
    candidates: tuple[str, ...]  # option strings to rank among

    def __post_init__(self) -> None:
        # Accept lists for convenience but store a tuple so examples stay hashable.
        if not isinstance(self.candidates, tuple):
            object.__setattr__(self, "candidates", tuple(self.candidates))
        if not self.candidates:
            raise ValueError("PromptExample.candidates must not be empty")


def normalize_answer(text: str) -> str:
    """Lower-case, strip and collapse whitespace, as the paper does before exact match."""
    return " ".join(text.lower().split())


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after normalisation (generated strings carry stray spaces/casing)."""
    return normalize_answer(prediction) == normalize_answer(answer)


class ModelFamily(ABC):
    """How a batch of prompt examples becomes a loss and predictions for one kind of model."""

    name: str = ""
    #: Whether the family answers with text it produces (generation or option ranking are its two modes);
    #: a ranking-only family (the encoder) neither takes ``rank_options`` nor reports a second metric.
    generates: bool = False
    rank_options: bool = False

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length

    @abstractmethod
    def encode(self, examples: Sequence[PromptExample]) -> list[dict]:
        """Tokenise once, without padding; the run caches the result for all epochs."""

    @abstractmethod
    def collate(self, features: list[dict]) -> dict:
        """Pad dynamically to the longest feature of the batch."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Scalar differentiable training loss."""

    def metric_modes(self) -> dict[str, str | None]:
        """Metric name → predict mode: what evaluation reports for this family.

        One ``accuracy`` (the family's own answer) by default; a family that generates also ranks the
        options, reported beside it as ``rank_accuracy`` (unless it was built to rank only).
        """
        if self.generates and not self.rank_options:
            return {"accuracy": "generate", "rank_accuracy": "rank"}
        return {"accuracy": None}

    @abstractmethod
    def predict(self, model: torch.nn.Module, batch: dict) -> list[str]:
        """Predicted answer strings (no gradients; putting the model in eval mode is the caller's job)."""

    @abstractmethod
    def answers_and_gold_nll(
        self, model: torch.nn.Module, batch: dict, modes: dict[str, str | None]
    ) -> tuple[dict[str, list[str]], list[float]]:
        """Answers per metric (``modes``: metric name → predict mode) and each item's gold-answer NLL.

        The NLL is the continuous twin of accuracy (the forgetting measure L): it moves when an answer
        becomes less likely long before the answer flips. NaN for an item whose gold answer is not
        among its options.
        """

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Make the model agree with the family's tokenizer (e.g. pad token); called once after loading."""
        del model  # encoders need nothing

    @contextlib.contextmanager
    def eval_cache(self, model: torch.nn.Module) -> Iterator[None]:
        """Scope inside which weight-dependent, batch-independent results may be cached.

        The default caches nothing; families with reusable work (e.g. option embeddings) override it.
        """
        yield

    def is_correct(self, prediction: str, answer: str) -> bool:
        """Whether a prediction counts as correct (normalised exact match)."""
        return exact_match(prediction, answer)
