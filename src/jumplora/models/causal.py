"""Decoder-only family (LLaMA, Qwen, GPT-2, ...): the answer continues the prompt."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ._utils import (
    attention_mask_for,
    base_model,
    cache_kwarg,
    eos_id,
    example_metadata,
    forward_params,
    model_device,
    pad_sequences,
    returned_cache,
    sequence_log_likelihoods,
    to_device,
    token_ids,
    token_log_likelihoods,
    truncate_middle,
)
from .base import PromptExample
from .generative import GenerativeFamily

__all__ = ["CausalFamily"]

# Characters of the prompt's last line used as context when tokenising an answer continuation.
_CONTEXT_CHARS = 64


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
        chat_template: bool | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length, max_answer_length, rank_options, rank_batch_size)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        # Instruction-tuned models answer in their chat format: the prompt is the user turn and the
        # answer is the assistant's reply. Default: whenever the tokenizer has a template.
        self.chat_template = has_template if chat_template is None else chat_template
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
        self._packed_ranking: dict[type, bool] = {}  # model class → honours custom 4D masks (checked once)

    def _continuation(self, prompt: str, text: str) -> list[int]:
        """Token ids of " " + text (text alone after a chat prompt) as it continues the prompt, truncated, plus eos.

        Tokenising " yes" on its own differs from its in-context form for SentencePiece/BPE
        vocabularies, so we tokenise the prompt's tail with and without the answer and take the
        difference; the tail-only context keeps this cheap and memoisable across examples.
        """
        context = prompt.rsplit("\n", 1)[-1][-_CONTEXT_CHARS:]
        key = (context, text)
        if key not in self._continuations:
            ctx = token_ids(self.tokenizer, context, add_special_tokens=False)
            sep = "" if self.chat_template else " "
            full = token_ids(self.tokenizer, f"{context}{sep}{text}", add_special_tokens=False)
            if full[: len(ctx)] == ctx and len(full) > len(ctx):
                ids = full[len(ctx) :]
            else:
                ids = token_ids(self.tokenizer, f"{sep}{text}", add_special_tokens=False)
            self._continuations[key] = [*ids[: self.max_answer_length], self._eos_id]
        return self._continuations[key]

    def _chat_prompt(self, prompt: str) -> str:
        """The prompt as the user turn, followed by the start of the assistant's turn."""
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, examples: Sequence[PromptExample]) -> list[dict]:
        features = []
        for ex in examples:
            text = self._chat_prompt(ex.prompt) if self.chat_template else ex.prompt
            # a chat template writes its own special tokens
            ids = token_ids(self.tokenizer, text, add_special_tokens=not self.chat_template)
            prompt = truncate_middle(ids, self._prompt_budget)
            answer = self._continuation(text, ex.answer)
            candidate_ids = tuple(self._continuation(text, c) for c in ex.candidates)
            features.append(
                {
                    "input_ids": prompt + answer,
                    "prompt_length": len(prompt),
                    "answer": ex.answer,
                    "candidates": ex.candidates,
                    "candidate_ids": candidate_ids,  # ranking is always available as a second metric
                    "max_new_tokens": max(len(c) - 1 for c in candidate_ids),  # longest option, no eos
                }
            )
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
            "max_new_tokens": [f["max_new_tokens"] for f in features],
            **example_metadata(features),
        }
        return batch

    def _score_candidates(self, model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
        if not self._takes_positions(model):
            return self._score_full_sequences(model, batch)
        batch = to_device(batch, model_device(model))
        with torch.no_grad():
            return self._score_from_prefill(model, self._prefill(model, batch), batch["candidate_ids"])

    def predict_both(self, model: torch.nn.Module, batch: dict) -> dict[str, list[str]]:
        """Both metrics from one prefill: each prompt is encoded once, then ranked and continued."""
        scores, generated = self.scores_and_generation(model, batch, generate=True)
        return {"generate": generated, "rank": self.best_options(batch["candidates"], scores)}

    def scores_and_generation(
        self, model: torch.nn.Module, batch: dict, generate: bool
    ) -> tuple[list[torch.Tensor], list[str] | None]:
        """Option scores and greedy answers from one prefill (each prompt encoded once)."""
        if not generate or not self._takes_positions(model):
            return super().scores_and_generation(model, batch, generate)
        if "candidate_ids" not in batch:
            raise ValueError("batch has no candidate_ids (features were not built by this family)")
        batch = to_device(batch, model_device(model))
        with torch.no_grad():
            prefill = self._prefill(model, batch)
            scores = self._score_from_prefill(model, prefill, batch["candidate_ids"])  # leaves the cache intact
            generated = self._greedy_from_prefill(model, prefill, self.max_new_tokens(batch))
        return scores, generated

    @staticmethod
    def _takes_positions(model: torch.nn.Module) -> bool:
        """Cached decoding needs explicit position ids: with left padding, implicit ones would shift."""
        return "position_ids" in forward_params(model)

    def _prefill(self, model: torch.nn.Module, batch: dict) -> _Prefill:
        """Encode the prompts into a KV cache; the prefix shared by the whole batch runs once.

        Prompts of one task share "Task Instruction: ...\nOptions: ...\nText:", so that prefix runs at
        batch size 1, its cache is repeated over the batch and only the rest of each prompt is prefilled
        (left-padded after the prefix; masked positions and position ids keep every row's computation
        that of its own unpadded prompt).
        """
        ids = batch["prompt_input_ids"]
        params = forward_params(model)
        prompts = _unpadded_prompts(batch)
        shared = _common_prefix(prompts)
        cache_kw = cache_kwarg(params)
        cache = None
        if shared:
            cache = returned_cache(model(input_ids=prompts[0][None, :shared], use_cache=True))
            cache.batch_repeat_interleave(len(prompts))
        rest = [p[shared:].tolist() for p in prompts]
        rest_mask = attention_mask_for(rest, left=True).to(ids.device)
        full_mask = torch.cat([rest_mask.new_ones(len(rest), shared), rest_mask], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        out = model(
            input_ids=pad_sequences(rest, self._pad_id, left=True).to(ids.device),
            attention_mask=full_mask,
            position_ids=positions[:, shared:],
            **{cache_kw: cache},
            use_cache=True,
            **extra,
        )
        return _Prefill(out.logits[:, -1], returned_cache(out), full_mask, positions[:, -1:], cache_kw)

    def _score_from_prefill(
        self, model: torch.nn.Module, prefill: _Prefill, candidate_ids: Sequence[Sequence[Sequence[int]]]
    ) -> list[torch.Tensor]:
        """Summed log-prob of every candidate (+eos), continuing the prompts' cache; the cache is left intact.

        Packs each prompt's candidates into one row under a tree attention mask (one forward per batch).
        The first time a model class is seen, the packed scores are checked against the per-candidate
        path; an architecture that does not honour custom 4D masks keeps the per-candidate path.
        """
        kind = type(base_model(model))
        packed_ok = self._packed_ranking.get(kind)
        if packed_ok is False or not candidate_ids:
            return self._score_per_candidate(model, prefill, candidate_ids)
        packed = self._score_packed(model, prefill, candidate_ids)
        if packed_ok is None:
            reference = self._score_per_candidate(model, prefill, candidate_ids)
            packed_ok = all(torch.allclose(a, b, atol=0.1, rtol=0.02) for a, b in zip(packed, reference, strict=True))
            if not packed_ok or any(len(c) > 1 for cands in candidate_ids for c in cands):  # the mask was used
                self._packed_ranking[kind] = packed_ok
            if not packed_ok:
                warnings.warn(
                    f"{kind.__name__} ignores custom attention masks: ranking runs per candidate", stacklevel=2
                )
                return reference
        return packed

    def _score_packed(
        self, model: torch.nn.Module, prefill: _Prefill, candidate_ids: Sequence[Sequence[Sequence[int]]]
    ) -> list[torch.Tensor]:
        """Every candidate of a prompt in one row: candidate k's tokens see the prompt and themselves only.

        Candidate c = [t0, ..., eos] is scored as log p(t0) from the prefill's logits plus the log-probs
        of c[1:] given c[:-1], fed as a segment with positions continuing the prompt's. Up to
        ``rank_batch_size`` prompts go through one forward, on a copy of their cache rows.
        """
        first_logp = torch.log_softmax(prefill.logits.float(), dim=-1)
        device = prefill.mask.device
        dtype = model.get_input_embeddings().weight.dtype
        scores = []
        for start in range(0, len(candidate_ids), self.rank_batch_size):
            chunk = range(start, min(start + self.rank_batch_size, len(candidate_ids)))
            index = torch.tensor(chunk, device=device)
            rows = [candidate_ids[i] for i in chunk]
            firsts = [first_logp[i, [c[0] for c in candidate_ids[i]]] for i in chunk]
            tree = _CandidateTree.build(rows, self._pad_id, device)
            if tree.width == 0:  # every candidate is a single token (eos only)
                scores += firsts
                continue
            out = model(
                input_ids=tree.tokens,
                attention_mask=tree.attention_mask(prefill.mask[index], dtype),
                position_ids=prefill.last_position[index] + 1 + tree.depth,
                use_cache=True,
                **{prefill.cache_kw: _cache_rows(prefill.cache, index)},
            )
            token_logp = token_log_likelihoods(out.logits, tree.labels)
            sums = token_logp.new_zeros(len(rows), tree.max_candidates)
            sums.scatter_add_(1, tree.segment.clamp(min=0), token_logp)
            scores += [first + sums[r, : len(first)] for r, first in enumerate(firsts)]
        return [s.cpu() for s in scores]

    def _score_per_candidate(
        self, model: torch.nn.Module, prefill: _Prefill, candidate_ids: Sequence[Sequence[Sequence[int]]]
    ) -> list[torch.Tensor]:
        """The reference path: each candidate continues its own copy of the prompt's cache rows.

        The first candidate token is scored from the prefill's logits; the rest run as a short
        continuation, ``rank_batch_size`` candidates at a time.
        """
        first_logp = torch.log_softmax(prefill.logits.float(), dim=-1)
        rows = [(i, list(cand)) for i, cands in enumerate(candidate_ids) for cand in cands]
        device = prefill.mask.device
        scores = []
        for start in range(0, len(rows), self.rank_batch_size):
            chunk = rows[start : start + self.rank_batch_size]
            index = torch.tensor([i for i, _ in chunk], device=device)
            first = first_logp[index, torch.tensor([c[0] for _, c in chunk], device=device)]
            width = max(len(c) for _, c in chunk) - 1
            if width == 0:  # every candidate is a single token (eos only)
                scores.append(first)
                continue
            # Right padding: pad positions come after each row's real tokens, so no scored token sees them.
            tokens = pad_sequences([c[:-1] for _, c in chunk], self._pad_id).to(device)
            labels = pad_sequences([c[1:] for _, c in chunk], -100).to(device)
            mask = torch.cat([prefill.mask[index], prefill.mask.new_ones(len(chunk), width)], dim=1)
            positions = prefill.last_position[index] + 1 + torch.arange(width, device=device)
            out = model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{prefill.cache_kw: _cache_rows(prefill.cache, index)},
            )
            scores.append(first + sequence_log_likelihoods(out.logits, labels))
        flat = torch.cat(scores).cpu()
        return list(flat.split([len(c) for c in candidate_ids]))

    def _score_full_sequences(self, model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
        """Every prompt + candidate run in full: ranking for models whose forward takes no position ids."""
        device = model_device(model)
        params = forward_params(model)
        prompts = [p.tolist() for p in _unpadded_prompts(batch)]
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

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Answer-token cross-entropy with the LM head run only where some row has an answer token."""
        if "logits_to_keep" not in forward_params(model):
            return super().loss(model, batch)
        batch = to_device(batch, model_device(model))
        targets = batch["labels"][:, 1:]  # position p predicts token p + 1
        positions = (targets != -100).any(0).nonzero().squeeze(-1)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions
        ).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets[:, positions].flatten(), ignore_index=-100)

    def generate(self, model: torch.nn.Module, batch: dict) -> list[str]:
        """Greedy decoding over a KV cache, continuing the shared-prefix prefill (see :meth:`_prefill`)."""
        if not self._takes_positions(model):
            return self._generate_hf(model, batch)
        batch = to_device(batch, model_device(model))
        with torch.no_grad():
            return self._greedy_from_prefill(model, self._prefill(model, batch), self.max_new_tokens(batch))

    def _greedy_from_prefill(self, model: torch.nn.Module, prefill: _Prefill, max_new: int) -> list[str]:
        """Greedy answers; the prefill's cache grows with every step."""
        state = {"cache": prefill.cache, "mask": prefill.mask, "pos": prefill.last_position}

        def step(tokens: torch.Tensor) -> torch.Tensor:
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(tokens), 1)], dim=1)
            state["pos"] = state["pos"] + 1
            nxt = model(
                input_ids=tokens[:, None],
                attention_mask=state["mask"],
                position_ids=state["pos"],
                use_cache=True,
                **{prefill.cache_kw: state["cache"]},
            )
            state["cache"] = returned_cache(nxt)
            return nxt.logits[:, -1]

        return self.decode_answers(self.greedy(prefill.logits, step, max_new))

    def _generate_hf(self, model: torch.nn.Module, batch: dict) -> list[str]:
        """``model.generate`` for models whose forward takes no position ids."""
        ids = batch["prompt_input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=batch["prompt_attention_mask"],
                max_new_tokens=self.max_new_tokens(batch),
                do_sample=False,
                pad_token_id=self._pad_id,
                eos_token_id=self._eos_id,
            )
        return self.decode_answers(out[:, ids.shape[1] :].tolist())


class _Prefill(NamedTuple):
    """Prompts encoded into a KV cache: what generation and ranking continue from."""

    logits: torch.Tensor  # (batch, vocab): the distribution of the first answer token
    cache: Any
    mask: torch.Tensor  # (batch, cached length): 0 on left padding
    last_position: torch.Tensor  # (batch, 1): position id of each prompt's last token
    cache_kw: str  # the forward's name for the cache argument


@dataclass(frozen=True)
class _CandidateTree:
    """The candidates of a batch of prompts packed one segment per candidate, one row per prompt."""

    tokens: torch.Tensor  # (prompts, width): c[:-1] of every candidate, concatenated; pad after
    labels: torch.Tensor  # (prompts, width): c[1:], aligned with tokens; -100 on padding
    segment: torch.Tensor  # (prompts, width): the candidate each token belongs to; -1 on padding
    depth: torch.Tensor  # (prompts, width): position of the token inside its candidate
    max_candidates: int

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def build(cls, rows: Sequence[Sequence[Sequence[int]]], pad_id: int, device: torch.device) -> _CandidateTree:
        tokens, labels, segment, depth = [], [], [], []
        for cands in rows:
            tokens.append([t for c in cands for t in c[:-1]])
            labels.append([t for c in cands for t in c[1:]])
            segment.append([k for k, c in enumerate(cands) for _ in c[:-1]])
            depth.append([d for c in cands for d in range(len(c) - 1)])
        return cls(
            tokens=pad_sequences(tokens, pad_id).to(device),
            labels=pad_sequences(labels, -100).to(device),
            segment=pad_sequences(segment, -1).to(device),
            depth=pad_sequences(depth, 0).to(device),
            max_candidates=max(len(c) for c in rows),
        )

    def attention_mask(self, prompt_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive (prompts, 1, width, cached + width) mask: a token sees its prompt (not its left padding)
        and the earlier tokens of its own candidate. Padding rows see the prompt only."""
        order = torch.arange(self.width, device=self.tokens.device)
        same = (self.segment[:, :, None] == self.segment[:, None, :]) & (self.segment[:, None, :] >= 0)
        own = same & (order[None, None, :] <= order[None, :, None])
        prompt = prompt_mask.bool()[:, None, :].expand(-1, self.width, -1)
        allowed = torch.cat([prompt, own], dim=-1)[:, None]
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )


def _cache_rows(cache: Any, index: torch.Tensor) -> Any:
    """A cache holding the given batch rows (repeats allowed); ``cache`` itself is left untouched."""
    if hasattr(cache, "layers"):  # transformers >= 4.56: selecting rebinds each layer's tensors
        rows = copy.copy(cache)
        rows.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        rows = copy.deepcopy(cache)
    rows.batch_select_indices(index)
    return rows


def _unpadded_prompts(batch: dict) -> list[torch.Tensor]:
    """Each prompt's token ids without its left padding."""
    return [row[m.bool()] for row, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"], strict=True)]


def _common_prefix(prompts: list[torch.Tensor]) -> int:
    """Tokens every prompt starts with, leaving each at least one token of its own to prefill."""
    shortest = min(len(p) for p in prompts)
    if len(prompts) < 2 or shortest < 2:
        return 0
    stacked = torch.stack([p[: shortest - 1] for p in prompts])
    same = (stacked == stacked[0]).all(0)
    return int(same.long().cumprod(0).sum())
