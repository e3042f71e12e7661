"""jumplora: continual learning with sparse JumpLoRA adapters."""
__version__ = "0.1.0"
