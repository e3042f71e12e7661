"""Offline model loading: pick the model family from the config and load matching HF classes."""

from __future__ import annotations

import json
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
from transformers.utils import CONFIG_NAME  # a model folder's config file (not a run's config.json)

from jumplora.adapters.residual import disable_cpu_repack
from jumplora.adapters.targets import TARGET_MODULES
from jumplora.packaged import packaged_minilm_path

from .base import ModelFamily
from .causal import CausalFamily
from .encoder import EncoderRankingFamily
from .quantize import quantization_config
from .seq2seq import Seq2SeqFamily
from .sources import ModelLoadError, first_line, resolve_model

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
    "max_positions",
    "wrap_model",
]

MODEL_FAMILIES: dict[str, type[ModelFamily]] = {
    "encoder": EncoderRankingFamily,
    "seq2seq": Seq2SeqFamily,
    "causal": CausalFamily,
}

#: Attention projections to adapt, per model_type: the one table (jumplora.adapters.targets).
DEFAULT_TARGET_MODULES = TARGET_MODULES

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


@dataclass
class LoadedModel:
    """A model with its tokenizer, the family that drives it and where adapters should go."""

    model: torch.nn.Module
    tokenizer: Any
    family: ModelFamily
    family_name: str
    target_modules: list[str]
    path: Path | None = None
    # Longest input the model's position embeddings allow; None for relative positions (T5).
    max_positions: int | None = None


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
    return packaged_minilm_path()


def make_family(name: str, tokenizer: Any, *, max_length: int | None = None, rank_options: bool = False) -> ModelFamily:
    """Instantiate a registered family with the options that apply to it."""
    cls = MODEL_FAMILIES[_check_family(name)]
    kwargs: dict[str, Any] = {}
    if max_length is not None:
        kwargs["max_length"] = max_length
    if cls.generates:  # a ranking-only family (the encoder) always ranks options
        kwargs["rank_options"] = rank_options
    return cls(tokenizer, **kwargs)


def max_positions(config: Any) -> int | None:
    """Absolute-position limit from the config (``max_position_embeddings`` / ``n_positions``)."""
    if getattr(config, "relative_attention_num_buckets", None) is not None:
        return None  # T5 & co. have no absolute limit
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_weights(folder: Path) -> None:
    """Safetensors only: refuse pickled checkpoints and truncated files with one line naming the file."""
    tensors = sorted(folder.glob("*.safetensors"))
    if not tensors:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        found = f" (found {', '.join(sorted(pickles))}: pickled weights are never loaded)" if pickles else ""
        raise ModelLoadError(f"model folder {str(folder)!r} has no .safetensors weights{found}")
    for path in tensors:
        size = path.stat().st_size
        try:
            with path.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError("header length past the end of the file")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise ModelLoadError(f"{path}: not a valid safetensors file ({err})") from err
        if 8 + n + end > size:
            raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")


def load_model(
    path: str | Path | None,
    family: str | None = None,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    max_length: int | None = None,
    rank_options: bool = False,
    quantize: str = "none",
) -> LoadedModel:
    """Load a model folder, ``.gguf`` file, hub id or short name (see :mod:`.sources`); None = MiniLM.

    Weights are read from safetensors only; the family prepares the model (pad token and the like).
    ``quantize`` ('int8', 'nf4', 'torchao-int8') loads the linear layers quantized (see :mod:`.quantize`).
    """
    if family is not None:
        _check_family(family)
    quantized = {"quantization_config": quantization_config(quantize, dtype)} if quantize != "none" else {}
    folder = resolve_model(path, revision)
    if not (folder / CONFIG_NAME).is_file():
        raise ModelLoadError(f"model path {str(folder)!r} is not a model folder (no config.json)")
    _check_weights(folder)
    common = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(folder, **common)
        name = detect_family(config, family)
        tokenizer = AutoTokenizer.from_pretrained(folder, **common)
        model = _AUTO_CLASSES[name].from_pretrained(
            folder, config=config, dtype=dtype, use_safetensors=True, **quantized, **common
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"could not load the model at {str(folder)!r}: {first_line(err)}") from err
    return wrap_model(model, tokenizer, name, max_length=max_length, rank_options=rank_options, path=folder)


def wrap_model(
    model: torch.nn.Module,
    tokenizer: Any,
    family: str | None = None,
    *,
    max_length: int | None = None,
    rank_options: bool = False,
    path: Path | None = None,
) -> LoadedModel:
    """A model object (loaded here, or held by the user: placed, quantised…) with its family and targets."""
    name = detect_family(model.config, family)
    disable_cpu_repack(model)  # a 4-bit base must stay trainable after the zero-shot evaluation
    fam = make_family(name, tokenizer, max_length=max_length, rank_options=rank_options)
    fam.prepare_model(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=fam,
        family_name=name,
        target_modules=default_target_modules(model.config, name),
        path=path,
        max_positions=max_positions(model.config),
    )
