"""The JumpLoRA adapter's settings (default and help of each), without PEFT.

``JumpLoraConfig`` (the PEFT config) and the run configuration's adapter part both take their fields
from here, so each default is written once, and ``jumplora run --help`` can list them without importing
PEFT, Transformers or torch (seconds on a busy machine).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: How a task's end picks the merged entries: the learned gate, or a control of the mechanism study.
MERGE_MASKS = ("gate", "random", "posthoc-topk")


@dataclass
class AdapterDefaults:
    """Defaults and help texts of the JumpLoRA fields of ``JumpLoraConfig`` (types narrowed there)."""

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    sparse: bool = field(
        default=True, metadata={"help": "Sparse JumpLoRA adapters: gate ΔW with the JumpReLU (--dense: plain LoRA)."}
    )
    threshold_granularity: str = field(
        default="global",
        metadata={"help": "One θ for the model ('global'), per transformer block, or per module."},
    )
    threshold_param: str = field(
        default="log", metadata={"help": "Learn log θ ('log', keeps θ > 0) or θ itself ('direct')."}
    )
    init_threshold: float = field(
        default=1e-3, metadata={"help": "θ before the budget-matched re-initialisation at the ramp start."}
    )
    bandwidth: float = field(default=1e-3, metadata={"help": "Width ε of the rectangle kernel of the θ STE."})
    threshold_reduction: str = field(
        default="mean",
        metadata={"help": "Reduce the θ pseudo-gradient over a matrix's entries by mean or sum."},
    )
    gamma: float = field(
        default=0.0,
        metadata={"help": "Interpolation γ between dense (0) and gated (1) ΔW; saved so a loaded adapter matches."},
    )
    sparsify_start: float = field(default=0.2, metadata={"help": "Fraction of a task's steps where γ leaves 0."})
    sparsify_end: float = field(default=0.8, metadata={"help": "Fraction of a task's steps where γ reaches 1."})
    target_density: float | None = field(
        default=None,
        metadata={
            "help": "Density to init θ at and to control towards (None: the LoRA budget "
            "r·(d_in+d_out)/(d_in·d_out) of each threshold group)."
        },
    )
    density_control: str = field(
        default="dual",
        metadata={
            "help": "How θ keeps the density after its init: 'none' (task loss alone, the paper), 'l0' "
            "(+ l0_lambda·density through the STE) or 'dual' (a Lagrange multiplier drives the density "
            "to target_density)."
        },
    )
    target_path: str = field(
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


_FIELDS = {f.name: f for f in dataclasses.fields(AdapterDefaults)}


def adapter_field(name: str) -> Any:
    """A dataclass field with the default and help of ``AdapterDefaults.<name>``."""
    source = _FIELDS[name]
    return field(default=source.default, metadata=dict(source.metadata))


def adapter_defaults() -> dict[str, dataclasses.Field]:
    """Every field of ``AdapterDefaults`` by name."""
    return dict(_FIELDS)
