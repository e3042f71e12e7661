"""`RunConfig`: everything that defines a continual-learning run (saved as config.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class RunConfig:
    """One run: a task stream, a model, a strategy (dense or +JumpLoRA), and the training budget."""

    out: str = "runs/default"
    # stream
    order: int = 1
    stream_file: str | None = None
    tasks: list[str] | None = None
    data_dir: str | None = None
    max_train: int | None = 256
    max_eval: int | None = 200
    eval_split: Literal["dev", "test"] = "test"
    option_space: Literal["task", "stream"] = "stream"
    # model
    model: str | None = None
    family: str | None = None
    target_modules: list[str] | None = None
    max_length: int = 128
    rank_options: bool = False
    trust_remote_code: bool = False
    # strategy
    strategy: str = "inclora"
    jumplora: bool = False
    ella_lambda: float = 3e4
    olora_lambda: float = 0.5
    olora_l2: float = 0.0
    # adapter
    r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    threshold_granularity: Literal["global", "per_block", "per_module"] = "global"
    threshold_param: Literal["log", "direct"] = "log"
    bandwidth: float = 1e-3
    threshold_reduction: Literal["mean", "sum"] = "mean"
    sparsify_start: float = 0.2
    sparsify_end: float = 0.8
    target_density: float | None = None
    density_control: Literal["none", "l0", "dual"] = "dual"
    l0_lambda: float = 1e-4
    dual_lr: float = 0.1
    dual_gain: float = 1.0
    controller_theta_lr: float | None = 0.05
    # optimisation
    lr: float = 1e-3
    theta_lr: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 16
    eval_batch_size: int = 64
    epochs: int = 1
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    # run
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    log_every: int = 10
    checkpoint_every: int = 0
    plots: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        positive = ("r", "batch_size", "eval_batch_size", "epochs", "grad_accum", "max_length", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train", "max_eval"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_split not in ("dev", "test"):
            problems.append(f"eval_split must be 'dev' or 'test', got {self.eval_split!r}")
        if self.option_space not in ("task", "stream"):
            problems.append(f"option_space must be 'task' or 'stream', got {self.option_space!r}")
        if self.checkpoint_every < 0:
            problems.append(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if problems:
            raise ValueError("invalid run configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run configuration keys: {', '.join(unknown)}")
        return cls(**data)

    @property
    def label(self) -> str:
        return f"{self.strategy}{'+jumplora' if self.jumplora else ''}"
