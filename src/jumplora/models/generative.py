"""What the seq2seq and decoder-only families share: the answer is text the model produces.

The prompt is the paper's (``TaskSpec.prompt``)::

    Task Instruction: <instruction>
    Options: <option 1> | <option 2> | ...
    Text: <input>
    Answer:

and the target is the option string (+eos). Training is cross-entropy on the answer tokens only.
Prediction is greedy generation scored by exact match (``mode="generate"``, the paper's metric), or the
option whose tokens the model finds most likely (``mode="rank"``); :meth:`predict_both` gives both.

Greedy generation is our own loop over a KV cache: at most as many new tokens as the batch's longest
option has tokens, and it stops as soon as every row has produced eos or a token containing a newline
(the answer is the text before the first newline). Up to that point its tokens are those of
``model.generate(do_sample=False)``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from ._utils import answer_token_loss
from .base import ModelFamily

PREDICT_MODES = ("generate", "rank")


class GenerativeFamily(ModelFamily):
    """Loss on answer tokens; predict by greedy generation or by ranking the options."""

    generates = True

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
        self._newline_ids: frozenset[int] | None = None

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return answer_token_loss(model, batch)

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Give the model the family's pad token when its config has none (``generate`` reads it)."""
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self._pad_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = self._pad_id

    def predict(self, model: torch.nn.Module, batch: dict, mode: str | None = None) -> list[str]:
        """Answers by ``mode`` ("generate" | "rank"); default: rank if built with ``rank_options``."""
        mode = mode or ("rank" if self.rank_options else "generate")
        if mode == "generate":
            return self.generate(model, batch)
        if mode == "rank":
            return self.best_options(batch["candidates"], self.candidate_log_likelihoods(model, batch))
        raise ValueError(f"unknown predict mode {mode!r}; expected one of {PREDICT_MODES}")

    def predict_both(self, model: torch.nn.Module, batch: dict) -> dict[str, list[str]]:
        """Generated answers (exact match, the main metric) and ranked options (the second metric)."""
        return {mode: self.predict(model, batch, mode) for mode in PREDICT_MODES}

    def answers_and_gold_nll(
        self, model: torch.nn.Module, batch: dict, modes: dict[str, str | None]
    ) -> tuple[dict[str, list[str]], list[float]]:
        """Answers per metric and the gold option's summed token NLL (+eos), from the ranking's own scores."""
        resolved = {key: mode or ("rank" if self.rank_options else "generate") for key, mode in modes.items()}
        for mode in resolved.values():
            if mode not in PREDICT_MODES:
                raise ValueError(f"unknown predict mode {mode!r}; expected one of {PREDICT_MODES}")
        scores, generated = self.scores_and_generation(model, batch, "generate" in resolved.values())
        ranked = self.best_options(batch["candidates"], scores)
        answers = {key: generated if mode == "generate" else ranked for key, mode in resolved.items()}
        return answers, gold_nll(batch["candidates"], batch["answers"], scores)

    def scores_and_generation(
        self, model: torch.nn.Module, batch: dict, generate: bool
    ) -> tuple[list[torch.Tensor], list[str] | None]:
        """Every option's log-likelihood, and the greedy answers when ``generate`` (families may share work)."""
        scores = self.candidate_log_likelihoods(model, batch)
        return scores, (self.generate(model, batch) if generate else None)

    @staticmethod
    def best_options(candidates: list[tuple[str, ...]], scores: list[torch.Tensor]) -> list[str]:
        """Per example, the candidate with the highest score."""
        return [cands[int(s.argmax())] for cands, s in zip(candidates, scores, strict=True)]

    def candidate_log_likelihoods(self, model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
        """Per example, the summed log-prob of each of its candidates (+eos)."""
        if "candidate_ids" not in batch:
            raise ValueError("batch has no candidate_ids (features were not built by this family)")
        return self._score_candidates(model, batch)

    @abstractmethod
    def _score_candidates(self, model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
        """:meth:`candidate_log_likelihoods` once the batch is known to carry candidate ids."""

    @abstractmethod
    def generate(self, model: torch.nn.Module, batch: dict) -> list[str]:
        """Greedy answers, decoded, cut at the first newline and stripped."""

    # -- greedy decoding shared by both families ------------------------------------------------
    def max_new_tokens(self, batch: dict) -> int:
        """Tokens to generate for a batch: its longest option (features carry their own maximum)."""
        return max(batch.get("max_new_tokens") or [self.max_answer_length])

    def stop_ids(self) -> frozenset[int]:
        """eos and every token whose text contains a newline: the answer ends at either."""
        if self._newline_ids is None:
            vocab = len(self.tokenizer)
            texts = self.tokenizer.batch_decode([[i] for i in range(vocab)])
            self._newline_ids = frozenset(i for i, t in enumerate(texts) if "\n" in t)
        eos = getattr(self, "_eos_id", None)
        return self._newline_ids | ({eos} if eos is not None else set())

    def greedy(
        self, first: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], max_new: int
    ) -> list[list[int]]:
        """Greedy tokens per row, each cut after its first stop token.

        ``first`` is the logits of the first new token (batch, vocab); ``step(tokens)`` feeds one token
        per row to the cached model and returns the next logits. Finished rows are fed the pad token
        (as ``generate`` does) until every row has stopped.
        """
        stop = self.stop_ids()
        rows: list[list[int]] = [[] for _ in range(first.shape[0])]
        done = [False] * len(rows)
        tokens = first.argmax(-1)
        for t in range(max_new):
            for i, tok in enumerate(tokens.tolist()):
                if not done[i]:
                    rows[i].append(tok)
                    done[i] = tok in stop
            if all(done) or t == max_new - 1:
                break
            fed = tokens.masked_fill(torch.tensor(done, device=tokens.device), self._pad_id)
            tokens = step(fed).argmax(-1)
        return rows

    def decode_answers(self, rows: list[list[int]]) -> list[str]:
        """Text of each row before eos / the first newline, stripped."""
        eos = getattr(self, "_eos_id", None)
        out = []
        for row in rows:
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            out.append(self.tokenizer.decode(row, skip_special_tokens=True).split("\n", 1)[0].strip())
        return out


def gold_nll(candidates: list[tuple[str, ...]], answers: list[str], scores: list[torch.Tensor]) -> list[float]:
    """−log p(gold option) per item (summed over its tokens); NaN when the gold answer is not an option."""
    out = []
    for cands, answer, row in zip(candidates, answers, scores, strict=True):
        out.append(-float(row[cands.index(answer)]) if answer in cands else float("nan"))
    return out
