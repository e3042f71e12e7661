"""Small tensor/tokenisation helpers shared by the model families."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

# Tokens kept from the end of an over-long prompt: prompts end with "...\nAnswer:", which must survive.
_TAIL_TOKENS = 16


def truncate_middle(ids: list[int], max_length: int) -> list[int]:
    """Cut over-long sequences in the middle so the instruction/options head and the "Answer:" tail stay."""
    if len(ids) <= max_length:
        return ids
    tail = min(_TAIL_TOKENS, max_length // 4)
    head = max_length - tail
    return ids[:head] + (ids[-tail:] if tail else [])


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad integer sequences to the longest one (right by default, left for generation)."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        row = torch.as_tensor(list(s), dtype=torch.long)
        if left:
            out[i, width - len(s) :] = row
        else:
            out[i, : len(s)] = row
    return out


def attention_mask_for(seqs: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    """1 on real tokens, 0 on padding, matching `pad_sequences`' layout."""
    return pad_sequences([[1] * len(s) for s in seqs], 0, left=left)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-less stubs)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a batch; metadata (strings, lists) is left as is."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def example_metadata(features: list[dict]) -> dict:
    """Per-example answers and candidates carried through a batch (candidate ids when ranking)."""
    meta = {"answers": [f["answer"] for f in features], "candidates": [f["candidates"] for f in features]}
    if all("candidate_ids" in f for f in features):
        meta["candidate_ids"] = [f["candidate_ids"] for f in features]
    return meta


def answer_token_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy on the answer tokens: the labels mask everything else with -100."""
    batch = to_device(batch, model_device(model))
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def eos_id(tokenizer: Any) -> int | None:
    """End-of-answer token: eos, else [SEP] for BERT-style vocabularies."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def pad_id(tokenizer: Any) -> int:
    """Padding id, falling back to eos (decoder-only tokenizers often lack a pad token)."""
    value = getattr(tokenizer, "pad_token_id", None)
    if value is None:
        value = eos_id(tokenizer)
    return int(value) if value is not None else 0


def token_ids(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of one string, without truncation (callers truncate deliberately)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def token_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-prob of each label token; 0 where the label is -100."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (labels != -100)


def sequence_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token log-probs per row; positions labelled -100 are ignored."""
    return token_log_likelihoods(logits, labels).sum(-1)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under a PEFT wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_params(model: torch.nn.Module) -> set[str]:
    """Keyword names the underlying HF model's forward accepts (looks through a PEFT wrapper)."""
    return set(inspect.signature(base_model(model).forward).parameters)


def cache_kwarg(params: set[str]) -> str:
    """Name of the KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    return out["cache"] if "cache" in out else out["past_key_values"]
