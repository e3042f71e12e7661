"""`JumpLoraConfig`: the PEFT config of the JumpLoRA method (LoRA whose ΔW entries are gated by θ)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from ..adapter_fields import adapter_field
from .peft_type import JUMPLORA

Granularity = Literal["global", "per_block", "per_module"]
ThresholdParam = Literal["log", "direct"]
DensityControl = Literal["none", "l0", "dual"]


@dataclass
class JumpLoraConfig(PeftConfig):
    """Configuration of a JumpLoRA adapter.

    The LoRA part (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``) means what it means
    in PEFT's ``LoraConfig``. The JumpLoRA part gates each entry of ΔW = B·A: the effective update is
    ``γ·ΔW·1[|ΔW|>θ] + (1−γ)·ΔW``, scaled by ``lora_alpha / r``. With ``sparse=False`` the layer is plain
    LoRA (γ stays 0 and merges keep every entry), so dense and sparse runs share one code path.
    """

    r: int = adapter_field("r")
    lora_alpha: float = adapter_field("lora_alpha")
    lora_dropout: float = adapter_field("lora_dropout")
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex, as in PEFT LoRA; 'all-linear' works too."},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to skip."})
    bias: Literal["none", "all"] = field(default="none", metadata={"help": "Train biases too ('all')."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trainable modules."})
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    init_lora_weights: bool = field(
        default=True, metadata={"help": "B = 0 (ΔW starts at zero). False draws B at random (tests only)."}
    )

    sparse: bool = adapter_field("sparse")
    threshold_granularity: Granularity = adapter_field("threshold_granularity")
    threshold_param: ThresholdParam = adapter_field("threshold_param")
    init_threshold: float = adapter_field("init_threshold")
    bandwidth: float = adapter_field("bandwidth")
    threshold_reduction: Literal["mean", "sum"] = adapter_field("threshold_reduction")
    gamma: float = adapter_field("gamma")
    sparsify_start: float = adapter_field("sparsify_start")
    sparsify_end: float = adapter_field("sparsify_end")
    target_density: float | None = adapter_field("target_density")
    density_control: DensityControl = adapter_field("density_control")
    target_path: Literal["flat", "falling"] = adapter_field("target_path")
    l0_lambda: float = adapter_field("l0_lambda")
    dual_lr: float = adapter_field("dual_lr")
    dual_gain: float = adapter_field("dual_gain")
    controller_theta_lr: float | None = adapter_field("controller_theta_lr")
    fused: bool = adapter_field("fused")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's, then the README.md PEFT wrote there names the stable base model id (never a site-packages
        path) and says that loading needs ``pip install jumplora; import jumplora``."""
        super().save_pretrained(save_directory, **kwargs)
        from ..cards import JUMPLORA_LOADING_NOTE, fix_adapter_card

        fix_adapter_card(save_directory, self.base_model_name_or_path, tags=["jumplora"], note=JUMPLORA_LOADING_NOTE)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = JUMPLORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        problems = []
        if self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.threshold_granularity not in ("global", "per_block", "per_module"):
            problems.append(
                f"threshold_granularity must be 'global', 'per_block' or 'per_module', "
                f"got {self.threshold_granularity!r}"
            )
        if self.threshold_param not in ("log", "direct"):
            problems.append(f"threshold_param must be 'log' or 'direct', got {self.threshold_param!r}")
        if self.threshold_reduction not in ("mean", "sum"):
            problems.append(f"threshold_reduction must be 'mean' or 'sum', got {self.threshold_reduction!r}")
        if self.init_threshold <= 0:
            problems.append(f"init_threshold must be > 0, got {self.init_threshold}")
        if self.bandwidth <= 0:
            problems.append(f"bandwidth must be > 0, got {self.bandwidth}")
        if not 0.0 <= self.gamma <= 1.0:
            problems.append(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.sparsify_start <= self.sparsify_end <= 1.0:
            problems.append(
                "need 0 <= sparsify_start <= sparsify_end <= 1, "
                f"got {self.sparsify_start}, {self.sparsify_end}"
            )
        if self.target_density is not None and not 0.0 < self.target_density <= 1.0:
            problems.append(f"target_density must be in (0, 1], got {self.target_density}")
        if self.density_control not in ("none", "l0", "dual"):
            problems.append(f"density_control must be 'none', 'l0' or 'dual', got {self.density_control!r}")
        if self.target_path not in ("flat", "falling"):
            problems.append(f"target_path must be 'flat' or 'falling', got {self.target_path!r}")
        if self.l0_lambda < 0 or self.dual_lr < 0 or self.dual_gain < 0:
            problems.append("l0_lambda, dual_lr and dual_gain must be >= 0")
        if self.controller_theta_lr is not None and self.controller_theta_lr <= 0:
            problems.append(f"controller_theta_lr must be > 0, got {self.controller_theta_lr}")
        if self.bias not in ("none", "all"):
            problems.append(f"bias must be 'none' or 'all', got {self.bias!r}")
        if problems:
            raise ValueError("JumpLoraConfig: " + "; ".join(problems))
