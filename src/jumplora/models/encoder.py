"""Option ranking with a sentence encoder (BERT-like; default all-MiniLM-L6-v2).

Each candidate option is embedded like a sentence and scored by its cosine similarity to the prompt
embedding; the task becomes a softmax over the example's options. This needs no LM head, which is
why small sentence encoders can be used for continual classification.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._utils import (
    attention_mask_for,
    model_device,
    pad_id,
    pad_sequences,
    to_device,
    token_ids,
    truncate_middle,
)
from .base import ModelFamily, PromptExample

__all__ = ["EncoderRankingFamily"]


class EncoderRankingFamily(ModelFamily):
    """Cosine-similarity ranking of candidate options against the prompt (mean pooling)."""

    name = "encoder"

    def __init__(self, tokenizer: Any, max_length: int = 128, temperature: float = 0.05) -> None:
        super().__init__(tokenizer, max_length)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self._pad_id = pad_id(tokenizer)
        # Candidate text -> unit embedding; only populated inside `eval_cache`.
        self._cache: dict[str, torch.Tensor] | None = None
        self._cache_model: torch.nn.Module | None = None

    # -- data -----------------------------------------------------------------------------------
    def encode(self, examples: Sequence[PromptExample]) -> list[dict]:
        memo: dict[str, list[int]] = {}  # options repeat across examples: tokenise each once

        def tok(text: str) -> list[int]:
            if text not in memo:
                memo[text] = truncate_middle(token_ids(self.tokenizer, text), self.max_length)
            return memo[text]

        return [
            {
                "input_ids": truncate_middle(token_ids(self.tokenizer, ex.prompt), self.max_length),
                "candidates": ex.candidates,
                "candidate_ids": tuple(tok(c) for c in ex.candidates),
                "answer": ex.answer,
            }
            for ex in examples
        ]

    def collate(self, features: list[dict]) -> dict:
        # Unique candidates of the whole batch, so each is embedded once per step.
        index: dict[str, int] = {}
        cand_ids: list[list[int]] = []
        for f in features:
            for text, ids in zip(f["candidates"], f["candidate_ids"], strict=True):
                if text not in index:
                    index[text] = len(index)
                    cand_ids.append(ids)
        cand_mask = torch.zeros(len(features), len(index), dtype=torch.bool)
        labels = torch.full((len(features),), -100, dtype=torch.long)
        for i, f in enumerate(features):
            for text in f["candidates"]:
                cand_mask[i, index[text]] = True
            if f["answer"] in f["candidates"]:
                labels[i] = index[f["answer"]]
        prompts = [f["input_ids"] for f in features]
        return {
            "input_ids": pad_sequences(prompts, self._pad_id),
            "attention_mask": attention_mask_for(prompts),
            "candidate_input_ids": pad_sequences(cand_ids, self._pad_id),
            "candidate_attention_mask": attention_mask_for(cand_ids),
            "candidate_mask": cand_mask,
            "labels": labels,
            "candidate_texts": list(index),
            "answers": [f["answer"] for f in features],
        }

    # -- model ----------------------------------------------------------------------------------
    @staticmethod
    def embed(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm, attention-masked mean of the last hidden state (sentence-transformers pooling)."""
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(pooled.float(), dim=-1)

    def _candidate_embeddings(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        ids, mask = batch["candidate_input_ids"], batch["candidate_attention_mask"]
        cache = self._cache if self._cache_model is model else None
        if cache is None:
            return self.embed(model, ids, mask)
        texts: list[str] = batch["candidate_texts"]
        missing = [i for i, t in enumerate(texts) if t not in cache]
        if missing:
            rows = torch.as_tensor(missing, device=ids.device)
            width = int(mask[rows].sum(-1).max())  # drop padding only the cached candidates needed
            new = self.embed(model, ids[rows, :width], mask[rows, :width]).detach()
            for k, i in enumerate(missing):
                cache[texts[i]] = new[k]
        return torch.stack([cache[t] for t in texts])

    def scores(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Logits [batch, unique candidates]; candidates outside an example's set are -inf."""
        batch = to_device(batch, model_device(model))
        prompt = self.embed(model, batch["input_ids"], batch["attention_mask"])
        cands = self._candidate_embeddings(model, batch).to(prompt.device)
        logits = prompt @ cands.T / self.temperature
        return logits.masked_fill(~batch["candidate_mask"], float("-inf"))

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = self.scores(model, batch)
        labels = batch["labels"].to(logits.device)
        if not bool((labels != -100).any()):  # no gold option in any candidate set
            return logits.masked_fill(torch.isinf(logits), 0.0).sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=-100)

    def predict(self, model: torch.nn.Module, batch: dict) -> list[str]:
        with torch.no_grad():
            best = self.scores(model, batch).argmax(-1).tolist()
        texts: list[str] = batch["candidate_texts"]
        return [texts[i] for i in best]

    def answers_and_gold_nll(
        self, model: torch.nn.Module, batch: dict, modes: dict[str, str | None]
    ) -> tuple[dict[str, list[str]], list[float]]:
        """The best option, and the cross-entropy of the gold option over the item's options (one pass)."""
        with torch.no_grad():
            logits = self.scores(model, batch)
            labels = batch["labels"].to(logits.device)
            nll = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            nll = nll.masked_fill(labels == -100, float("nan"))
        texts: list[str] = batch["candidate_texts"]
        best = [texts[i] for i in logits.argmax(-1).tolist()]
        return dict.fromkeys(modes, best), nll.tolist()

    @contextlib.contextmanager
    def eval_cache(self, model: torch.nn.Module) -> Iterator[None]:
        """Embed each option once per evaluation: the options are shared by every batch."""
        saved = self._cache, self._cache_model
        self._cache, self._cache_model = {}, model
        try:
            yield
        finally:
            self._cache, self._cache_model = saved
