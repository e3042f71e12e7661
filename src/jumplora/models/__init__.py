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
)
from .seq2seq import Seq2SeqFamily

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "FAMILY_TARGET_MODULES",
    "MODEL_FAMILIES",
    "CausalFamily",
    "EncoderRankingFamily",
    "GenerativeFamily",
    "LoadedModel",
    "ModelFamily",
    "ModelLoadError",
    "PromptExample",
    "Seq2SeqFamily",
    "default_model_path",
    "default_target_modules",
    "detect_family",
    "exact_match",
    "load_model",
    "make_family",
    "normalize_answer",
]
