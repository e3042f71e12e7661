"""Decoder-only family (LLaMA, Qwen, GPT-2, ...): the answer continues the prompt."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ._utils import (
    attention_mask_for,
    eos_id,
    example_metadata,
    model_device,
    pad_sequences,
    sequence_log_likelihoods,
    to_device,
    token_ids,
    truncate_middle,
)
from .base import PromptExample
from .generative import GenerativeFamily

__all__ = ["CausalFamily"]

# Characters of the prompt's last line used as context when tokenising an answer continuation.
_CONTEXT_CHARS = 64


def _forward_params(model: torch.nn.Module) -> set[str]:
    """Keyword names the underlying HF model's forward accepts (looks through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


class CausalFamily(GenerativeFamily):
    """Loss on the answer (+eos) tokens only; predict by greedy generation or option ranking."""

    name = "causal"

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 256,
        max_answer_length: int = 16,
        rank_options: bool = False,
        rank_batch_size: int = 16,
    ) -> None:
        super().__init__(tokenizer, max_length, max_answer_length, rank_options, rank_batch_size)
        if max_length <= max_answer_length + 1:
            raise ValueError(f"max_length ({max_length}) must exceed max_answer_length + 1 ({max_answer_length + 1})")
        eos = eos_id(tokenizer)
        if eos is None:
            raise ValueError("the tokenizer has neither an eos nor a sep token to end answers with")
        if tokenizer.pad_token_id is None:  # decoder-only tokenizers often have no pad token
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
        self._eos_id = eos
        self._pad_id = int(tokenizer.pad_token_id)
        # Prompt budget is fixed so training and generation see the exact same prompt tokens.
        self._prompt_budget = max_length - max_answer_length - 1
        self._continuations: dict[tuple[str, str], list[int]] = {}

    def _continuation(self, prompt: str, text: str) -> list[int]:
        """Token ids of " " + text as it continues the prompt, truncated, plus eos.

        Tokenising " yes" on its own differs from its in-context form for SentencePiece/BPE
        vocabularies, so we tokenise the prompt's tail with and without the answer and take the
        difference; the tail-only context keeps this cheap and memoisable across examples.
        """
        context = prompt.rsplit("\n", 1)[-1][-_CONTEXT_CHARS:]
        key = (context, text)
        if key not in self._continuations:
            ctx = token_ids(self.tokenizer, context, add_special_tokens=False)
            full = token_ids(self.tokenizer, f"{context} {text}", add_special_tokens=False)
            if full[: len(ctx)] == ctx and len(full) > len(ctx):
                ids = full[len(ctx) :]
            else:
                ids = token_ids(self.tokenizer, f" {text}", add_special_tokens=False)
            self._continuations[key] = [*ids[: self.max_answer_length], self._eos_id]
        return self._continuations[key]

    def encode(self, examples: Sequence[PromptExample]) -> list[dict]:
        features = []
        for ex in examples:
            prompt = truncate_middle(token_ids(self.tokenizer, ex.prompt), self._prompt_budget)
            answer = self._continuation(ex.prompt, ex.answer)
            feature = {
                "input_ids": prompt + answer,
                "prompt_length": len(prompt),
                "answer": ex.answer,
                "candidates": ex.candidates,
            }
            if self.rank_options:
                feature["candidate_ids"] = tuple(self._continuation(ex.prompt, c) for c in ex.candidates)
            features.append(feature)
        return features

    def collate(self, features: list[dict]) -> dict:
        seqs = [f["input_ids"] for f in features]
        prompts = [f["input_ids"][: f["prompt_length"]] for f in features]
        # Right padding for teacher forcing (positions start at 0 as in generation).
        labels = pad_sequences(seqs, -100)
        for i, f in enumerate(features):
            labels[i, : f["prompt_length"]] = -100
        batch = {
            "input_ids": pad_sequences(seqs, self._pad_id),
            "attention_mask": attention_mask_for(seqs),
            "labels": labels,
            # Left-padded prompts for generation / ranking.
            "prompt_input_ids": pad_sequences(prompts, self._pad_id, left=True),
            "prompt_attention_mask": attention_mask_for(prompts, left=True),
            **example_metadata(features),
        }
        return batch

    def _score_candidates(self, model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
        device = model_device(model)
        params = _forward_params(model)
        prompts = [
            row[mask.bool()].tolist()
            for row, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"], strict=True)
        ]
        rows = [(prompts[i], cand) for i, cands in enumerate(batch["candidate_ids"]) for cand in cands]
        scores = []
        with torch.no_grad():
            for start in range(0, len(rows), self.rank_batch_size):
                chunk = rows[start : start + self.rank_batch_size]
                seqs = [p + c for p, c in chunk]
                # Left padding puts every candidate at the end, so only the last k logits are needed.
                ids = pad_sequences(seqs, self._pad_id, left=True).to(device)
                mask = attention_mask_for(seqs, left=True).to(device)
                width = ids.shape[1]
                keep = min(max(len(c) for _, c in chunk) + 1, width)
                kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
                if "position_ids" in params:
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                if "logits_to_keep" in params:
                    kwargs["logits_to_keep"] = keep
                logits = model(**kwargs).logits[:, -keep:-1]
                labels = ids[:, width - keep + 1 :].clone()
                for r, (_, cand) in enumerate(chunk):
                    labels[r, : max(0, keep - 1 - len(cand))] = -100  # prompt tokens are not scored
                scores.append(sequence_log_likelihoods(logits, labels))
        flat = torch.cat(scores).cpu()
        return list(flat.split([len(c) for c in batch["candidate_ids"]]))

    def generate(self, model: torch.nn.Module, batch: dict) -> list[str]:
        batch = to_device(batch, model_device(model))
        ids = batch["prompt_input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=batch["prompt_attention_mask"],
                max_new_tokens=self.max_answer_length,
                do_sample=False,
                pad_token_id=self._pad_id,
                eos_token_id=self._eos_id,
            )
        preds = []
        for row in out[:, ids.shape[1] :].tolist():
            if self._eos_id in row:
                row = row[: row.index(self._eos_id)]
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            preds.append(text.split("\n", 1)[0].strip())
        return preds
