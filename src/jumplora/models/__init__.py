"""Model families (encoder ranking, seq2seq, causal LM) and offline model loading."""

from .base import ModelFamily, PromptExample, exact_match, normalize_answer
from .causal import CausalFamily
from .encoder import EncoderRankingFamily
from .generative import GenerativeFamily
from .loading import (
    DEFAULT_TARGET_MODULES,
    FAMILY_TARGET_MODULES,
    MODEL_FAMILIES,
    LoadedModel,
    ModelLoadError,
    default_model_path,
    default_target_modules,
    detect_family,
    load_model,
    make_family,
    max_positions,
    wrap_model,
)
from .seq2seq import Seq2SeqFamily
from .sources import KNOWN_MODELS, cache_home, convert_gguf, list_models, pull_model, resolve_model

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "FAMILY_TARGET_MODULES",
    "KNOWN_MODELS",
    "MODEL_FAMILIES",
    "CausalFamily",
    "EncoderRankingFamily",
    "GenerativeFamily",
    "LoadedModel",
    "ModelFamily",
    "ModelLoadError",
    "PromptExample",
    "Seq2SeqFamily",
    "cache_home",
    "convert_gguf",
    "default_model_path",
    "default_target_modules",
    "detect_family",
    "exact_match",
    "list_models",
    "load_model",
    "make_family",
    "max_positions",
    "normalize_answer",
    "pull_model",
    "resolve_model",
    "wrap_model",
]
