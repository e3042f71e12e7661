"""jumplora: continual learning of language models with sparse JumpLoRA adapters."""

from .adapters import JumpLoraConfig, JumpLoraModel, merge_and_discard

__version__ = "0.1.0"
__all__ = ["JumpLoraConfig", "JumpLoraModel", "__version__", "merge_and_discard"]
