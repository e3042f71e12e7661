"""`JumpLoraConfig`: the PEFT config of the JumpLoRA method (LoRA whose ΔW entries are gated by θ)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

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

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
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

    sparse: bool = field(default=True, metadata={"help": "Gate ΔW with the JumpReLU (False: plain LoRA)."})
    threshold_granularity: Granularity = field(
        default="global",
        metadata={"help": "One θ for the model ('global'), per transformer block, or per module."},
    )
    threshold_param: ThresholdParam = field(
        default="log", metadata={"help": "Learn log θ ('log', keeps θ > 0) or θ itself ('direct')."}
    )
    init_threshold: float = field(
        default=1e-3, metadata={"help": "θ before the budget-matched re-initialisation at the ramp start."}
    )
    bandwidth: float = field(default=1e-3, metadata={"help": "Width ε of the rectangle kernel of the θ STE."})
    threshold_reduction: Literal["mean", "sum"] = field(
        default="mean",
        metadata={"help": "Reduce the θ pseudo-gradient over a matrix's entries by mean or sum."},
    )
    gamma: float = field(
        default=0.0,
        metadata={
            "help": "Interpolation γ between dense (0) and gated (1) ΔW; saved so a loaded adapter matches."
        },
    )
    sparsify_start: float = field(
        default=0.2, metadata={"help": "Fraction of a task's steps where γ leaves 0."}
    )
    sparsify_end: float = field(
        default=0.8, metadata={"help": "Fraction of a task's steps where γ reaches 1."}
    )
    target_density: float | None = field(
        default=None,
        metadata={
            "help": "Density to init θ at and to control towards (None: the LoRA budget "
            "r·(d_in+d_out)/(d_in·d_out) of each threshold group)."
        },
    )
    density_control: DensityControl = field(
        default="dual",
        metadata={
            "help": "How θ keeps the density after its init: 'none' (task loss alone, the paper), 'l0' "
            "(+ l0_lambda·density through the STE) or 'dual' (a Lagrange multiplier drives the density "
            "to target_density)."
        },
    )
    target_path: Literal["flat", "falling"] = field(
        default="flat",
        metadata={
            "help": "'flat': control towards target_density from θ's init on; 'falling': the target falls "
            "geometrically over the ramp from the LoRA budget to target_density (as 'l0' lowers the density)."
        },
    )
    l0_lambda: float = field(default=1e-4, metadata={"help": "Weight of the 'l0' density penalty."})
    dual_lr: float = field(
        default=0.1, metadata={"help": "'dual': multiplier += dual_lr·log(density/target) per step."}
    )
    dual_gain: float = field(
        default=1.0,
        metadata={"help": "'dual': proportional term; the θ-gradient weight is multiplier + gain·error."},
    )
    controller_theta_lr: float | None = field(
        default=0.05,
        metadata={
            "help": "Learning rate of θ under a density controller (Adam's step on log θ is about this "
            "size, whatever the gradient scale); None keeps the optimizer's."
        },
    )
    fused: bool = field(
        default=True,
        metadata={"help": "One matmul with W + s·ΔW_eff when possible (same result, less work)."},
    )

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
