"""`RunConfig`: everything that defines a continual-learning run (saved as config.json).

A run has five parts — stream, model, adapter, optimisation, strategy — each a dataclass whose fields
carry their default, their help text and their command-line flag. The CLI options, config files
(``jumplora run --config run.yaml``) and the Python API are all built from these fields, so every
default is written once; the adapter part takes its defaults and help from ``JumpLoraConfig`` and
becomes one with ``adapter.to_peft(targets)``. Field names are unique across the parts, which lets
:meth:`RunConfig.from_flat` take the flat keyword form (``RunConfig.from_flat(lr=1e-3, tasks=[...])``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jumplora.adapter_fields import MERGE_MASKS, adapter_defaults

if TYPE_CHECKING:
    from jumplora.adapters.config import JumpLoraConfig

#: ``--runner`` values: the CL stream first, then the reference rows (no strategy; labelled by their name).
RUNNERS = ("continual", "multitask", "independent")
REFERENCE_RUNNERS = RUNNERS[1:]
#: ``--quantize`` values (jumplora.models.quantize loads them); "none" loads the base in float32 as usual.
QUANTIZE_CHOICES = ("none", "int8", "nf4", "torchao-int8")
#: Sharding backends ``--shard`` takes (jumplora.sharding.BACKENDS, and none).
SHARD_CHOICES = ("none", "fsdp2", "zero1", "zero2", "zero3")
_JUMPLORA_FIELDS = adapter_defaults()


class ConfigError(ValueError):
    """A configuration value is out of range, not finite, or unknown."""


def opt(default: Any = None, help: str = "", *, flag: str | None = None, **meta: Any) -> Any:
    """A config field with its help text; ``flag`` overrides the CLI flag derived from the name.

    ``meta`` flags for the CLI: ``csv`` (comma-separated list), ``zero_is_none`` (0 on the command line
    means None), ``choices`` (allowed values).
    """
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, "flag": flag, **meta}, **factory)


def from_jumplora(name: str, **meta: Any) -> Any:
    """A field whose default and help come from ``JumpLoraConfig`` (one source for the adapter)."""
    source = _JUMPLORA_FIELDS[name]
    return opt(source.default, source.metadata.get("help", ""), **meta)


@dataclass
class StreamConfig:
    order: int = opt(1, "Benchmark order: 1-3 standard (4 tasks), 4-6 long (15 tasks).")
    stream_file: str | None = opt(None, "Custom stream file (YAML/JSON) instead of --order.", flag="--stream")
    tasks: list[str] | None = opt(None, "Comma-separated benchmark tasks instead of --order.", csv=True)
    data_dir: str | None = opt(None, "Benchmark folder (default: $JUMPLORA_DATA, else ../shared/cl_benchmark).")
    max_train: int | None = opt(256, "Training examples per task (0 = all).", zero_is_none=True)
    max_eval: int | None = opt(200, "Evaluation examples per task (0 = all).", zero_is_none=True)
    eval_split: str = opt("test", "dev (for tuning) or test (final numbers).", choices=("dev", "test"))
    option_space: str = opt(
        "stream", "Encoder candidates: 'stream' (all options of the stream) or 'task' (its own).",
        choices=("task", "stream"),
    )  # fmt: skip
    allow_outside_paths: bool = opt(False, "Let a stream file name data files outside its folder.")

    def problems(self) -> list[str]:
        from jumplora.data import DataError, resolve_stream_source

        out = _at_least(self, 1, "max_train", "max_eval")
        try:
            resolve_stream_source(self.order, self.stream_file, self.tasks)
        except DataError as err:
            out.append(str(err))
        return out


@dataclass
class ModelConfig:
    name: str | None = opt(
        None, "Model: a local folder, a .gguf file, a hub id, or a short name (default: the packaged MiniLM).",
        flag="--model",
    )  # fmt: skip
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) when --model is a hub id.")
    family: str | None = opt(None, "encoder | seq2seq | causal (default: from the model config).")
    targets: list[str] | None = opt(
        None, "Comma-separated target modules, or all-linear (default: per model).", csv=True
    )
    max_length: int = opt(128, "Maximum prompt length in tokens.")
    rank_options: bool = opt(False, "Generative models: rank the options by likelihood instead of generating.")
    trust_remote_code: bool = opt(False, "Allow custom model code from the model folder.")
    quantize: str = opt(
        "none", "Load the frozen base quantized (needs the optional extra 'quant'); task updates are kept beside "
        "it as exact float32 sparse residuals.", choices=QUANTIZE_CHOICES,
    )  # fmt: skip

    def problems(self) -> list[str]:
        return _at_least(self, 2, "max_length")


@dataclass
class AdapterConfig:
    """The JumpLoRA/LoRA adapter of every task; sparse by default (``JumpLoraConfig``'s), ``sparse`` False
    (``--dense``) is the dense LoRA baseline (the same layer)."""

    sparse: bool = from_jumplora("sparse", flag="--jumplora/--dense")
    r: int = from_jumplora("r", flag="--r")
    lora_alpha: float = from_jumplora("lora_alpha")
    lora_dropout: float = from_jumplora("lora_dropout")
    threshold_granularity: str = from_jumplora("threshold_granularity", flag="--granularity")
    threshold_param: str = from_jumplora("threshold_param")
    bandwidth: float = from_jumplora("bandwidth")
    threshold_reduction: str = from_jumplora("threshold_reduction")
    sparsify_start: float = from_jumplora("sparsify_start")
    sparsify_end: float = from_jumplora("sparsify_end")
    target_density: float | None = from_jumplora("target_density")
    density_control: str = from_jumplora("density_control", choices=("none", "l0", "dual"))
    target_path: str = from_jumplora("target_path", choices=("flat", "falling"))
    l0_lambda: float = from_jumplora("l0_lambda")
    dual_lr: float = from_jumplora("dual_lr")
    dual_gain: float = from_jumplora("dual_gain")
    controller_theta_lr: float | None = from_jumplora("controller_theta_lr")
    # Controls of the mechanism study (jumplora.adapters.controls): train densely, change only the merge.
    merge_mask: str = opt(
        "gate", "What a task's end merges: 'gate' (|ΔW| > θ; dense with --dense), or a control trained densely "
        "and masked at the end to --target-density (default: the LoRA budget): 'random' entries or "
        "'posthoc-topk' (largest |ΔW|).", flag="--mask", choices=MERGE_MASKS,
    )  # fmt: skip
    norm_match: bool = opt(
        False, "Control: train densely, merge the whole update scaled per module to the Frobenius norm of its "
        "top-k part at --target-density (default: the LoRA budget).",
    )  # fmt: skip

    @property
    def control(self) -> bool:
        """A post-hoc control: the update trains densely and the task's end decides what is merged."""
        return self.merge_mask != "gate" or self.norm_match

    def problems(self) -> list[str]:
        out = []
        if self.control and self.sparse:
            out.append("--mask random|posthoc-topk and --norm-match train a dense update: add --dense, drop --jumplora")
        if self.merge_mask != "gate" and self.norm_match:
            out.append("--norm-match merges the whole update; it does not combine with --mask")
        try:
            self.to_peft(["x"])
        except ValueError as err:
            out.append(str(err).removeprefix("JumpLoraConfig: "))
        return out

    def to_peft(self, target_modules: list[str] | str) -> JumpLoraConfig:
        """The PEFT config of this adapter (JumpLoraConfig validates the values)."""
        from jumplora.adapters.config import JumpLoraConfig

        targets = target_modules if target_modules == "all-linear" else list(target_modules)
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in CONTROL_FIELDS}
        return JumpLoraConfig(**values, target_modules=targets)


#: AdapterConfig fields that are not JumpLoraConfig's: the run's merge, not the adapter's math.
CONTROL_FIELDS = ("merge_mask", "norm_match")


@dataclass
class OptimConfig:
    lr: float = opt(1e-3, "Learning rate (AdamW, warm-up then constant).")
    theta_lr: float | None = opt(None, "Learning rate of the thresholds (default: --lr).")
    weight_decay: float = opt(0.0, "AdamW weight decay of the adapter weights (never of θ).")
    batch_size: int = opt(16, "Per-device training batch size.")
    eval_batch_size: int = opt(64, "Evaluation batch size.")
    epochs: int = opt(1, "Epochs per task.")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    warmup_ratio: float = opt(0.06, "Fraction of a task's steps spent warming up.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 = off).")

    def problems(self) -> list[str]:
        out = _at_least(self, 1, "batch_size", "eval_batch_size", "epochs", "grad_accum")
        out += _positive(self, "lr", "theta_lr") + _at_least(self, 0.0, "weight_decay", "max_grad_norm")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr > 1.0:
            out.append(f"lr must be <= 1 (an adapter diverges far below that), got {self.lr}")
        return out


@dataclass
class StrategyConfig:
    name: str = opt("inclora", "CL strategy (see `jumplora strategies`).", flag="--strategy")
    args: dict[str, Any] = opt(
        dict, "Strategy hyper-parameter, repeatable: --strategy-arg lam=1e6.", flag="--strategy-arg"
    )

    def problems(self) -> list[str]:
        from jumplora.cl import make_strategy

        try:
            make_strategy(self.name, self.args)
        except ValueError as err:
            return [str(err)]
        return []


@dataclass
class RunConfig:
    """One run: a task stream, a model, an adapter (dense or JumpLoRA), a strategy and a budget."""

    out: str = opt("runs/default", "Run directory (results.json, train_log.jsonl, plots/, checkpoint/).")
    runner: str = opt(
        "continual", "continual (the stream, one task after another) | multitask (all tasks jointly: "
        "upper bound) | independent (each task from scratch).", choices=RUNNERS,
    )  # fmt: skip
    seed: int = opt(0, "Seed for data caps, initialisation and shuffling.")
    mixed_precision: str = opt(
        "no", "no (fp32) | bf16 | fp16 (through Accelerate; on CPU bf16 autocast keeps base weights, LoRA factors, "
        "θ and optimizer state fp32) | auto (bf16 on a CPU with native bf16, e.g. AVX512-BF16, else fp32).",
        choices=("no", "auto", "fp16", "bf16"),
    )  # fmt: skip
    cpu: bool = opt(False, "Force the CPU even when a GPU is present.")
    shard: str = opt(
        "none", "Shard over the processes: none | fsdp2 (the base model, FSDP2 fully_shard per block; also "
        "chosen by accelerate launch with an fsdp_version: 2 config) | zero3 (the base model, DeepSpeed ZeRO-3 "
        "partitioning) | zero1, zero2 (the adapter's AdamW state, and at 2 its gradients, by DeepSpeed's ZeRO "
        "optimizer; the base stays whole). DeepSpeed ones need jumplora[deepspeed] and are also chosen by "
        "accelerate launch --use_deepspeed --zero_stage N. Works on CPU (gloo) too.",
        choices=SHARD_CHOICES,
    )  # fmt: skip
    log_every: int = opt(10, "Log every N optimizer steps to train_log.jsonl.")
    checkpoint_every: int = opt(0, "Also checkpoint every N optimizer steps within a task (0 = task ends only).")
    plots: bool = opt(True, "Draw the run's plots at the end.")
    save_predictions: bool = opt(
        False, "Write every evaluation's answers to predictions/<NN>-<after>.jsonl (one line per item)."
    )
    report_to: list[str] | None = opt(
        None, "Experiment trackers through Accelerate: tensorboard, wandb, mlflow, ... (comma-separated).", csv=True
    )
    stream: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)

    def __post_init__(self) -> None:
        wrong = type_problems({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if wrong:
            raise ConfigError("invalid run configuration: " + wrong[0])
        problems = _at_least(self, 1, "log_every") + _at_least(self, 0, "checkpoint_every")
        problems += _check_trackers(self.report_to)
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed must be in [0, 2**32), got {_short(self.seed)}")
        problems += _check_choices(self)
        for part in self.parts():
            problems += _check_choices(part) + _finite(part) + part.problems()
        if problems:
            raise ConfigError("invalid run configuration: " + "; ".join(problems))
        from jumplora.cl import make_strategy

        # Every hyper-parameter of the strategy, defaults included: config.json says what ran.
        self.strategy.args = make_strategy(self.strategy.name, self.strategy.args).hparams()

    def task_seed(self, task_index: int) -> int:
        """The seed of everything drawn for one task (its adapter's init, a control's random support)."""
        return self.seed * 1000 + task_index

    def parts(self) -> tuple[Any, ...]:
        return (self.stream, self.model, self.adapter, self.optim, self.strategy)

    # -- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> RunConfig:
        """A config.json (nested) as written by :meth:`to_dict`; unknown keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        parts = {f.name: f.type for f in dataclasses.fields(cls) if f.name in PART_TYPES}
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: {key!r} must be a mapping, got {type(value).__name__}")
                unknown = sorted(set(value) - {f.name for f in dataclasses.fields(PART_TYPES[key])})
                if unknown:
                    raise ConfigError(f"{source}: unknown key {key}.{_short(unknown[0])}")
                flat.update({_flat_name(PART_TYPES[key], k): v for k, v in value.items()})
            else:
                flat[key] = value
        return cls.from_flat(source=source, **flat)

    @classmethod
    def from_flat(cls, source: str = "configuration", **values: Any) -> RunConfig:
        """Build from flat keys (``lr=…, tasks=…, strategy="ella", strategy_args={...}``)."""
        index = flat_fields()
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise ConfigError(f"{source}: unknown setting {_short(unknown[0])}")
        parts: dict[str, dict[str, Any]] = {name: {} for name in PART_TYPES}
        top: dict[str, Any] = {}
        for key, value in values.items():
            part, name = index[key]
            (parts[part] if part else top)[name] = value
        wrong = type_problems({**top, **parts})
        if wrong:
            raise ConfigError(f"{source}: {wrong[0]}")
        try:
            return cls(**top, **{name: PART_TYPES[name](**kw) for name, kw in parts.items()})
        except TypeError as err:  # e.g. a list where a number belongs, caught by the dataclass
            raise ConfigError(f"{source}: {err}") from err

    def replace(self, **flat: Any) -> RunConfig:
        """A copy with some flat settings changed."""
        return RunConfig.from_flat(**{**self.flat(), **flat})

    def flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, (part, name) in flat_fields().items():
            out[key] = getattr(getattr(self, part), name) if part else getattr(self, name)
        return out

    @property
    def label(self) -> str:
        if self.runner in REFERENCE_RUNNERS:
            return self.runner
        a = self.adapter
        control = f"+mask-{a.merge_mask}" if a.merge_mask != "gate" else ("+norm-match" if a.norm_match else "")
        return f"{self.strategy.name}{'+jumplora' if a.sparse else ''}{control}"


PART_TYPES: dict[str, type] = {
    "stream": StreamConfig,
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "optim": OptimConfig,
    "strategy": StrategyConfig,
}
# Settings that may differ between a run and its resumption.
RESUME_FREE_KEYS = frozenset({"out", "plots", "log_every", "checkpoint_every", "report_to", "save_predictions"})


def _flat_name(part_type: type, name: str) -> str:
    """The flat (and CLI) name of a part's field: ``name`` fields take the part's name."""
    if name == "name":
        return {ModelConfig: "model", StrategyConfig: "strategy"}[part_type]
    if part_type is StrategyConfig and name == "args":
        return "strategy_args"
    if part_type is AdapterConfig and name == "sparse":
        return "jumplora"
    return name


def flat_fields() -> dict[str, tuple[str | None, str]]:
    """flat name → (part or None for top-level, field name); the CLI builds its options from this."""
    index: dict[str, tuple[str | None, str]] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name not in PART_TYPES:
            index[f.name] = (None, f.name)
    for part, part_type in PART_TYPES.items():
        for f in dataclasses.fields(part_type):
            index[_flat_name(part_type, f.name)] = (part, f.name)
    return index


def field_of(flat_name: str) -> dataclasses.Field:
    part, name = flat_fields()[flat_name]
    owner = PART_TYPES[part] if part else RunConfig
    return next(f for f in dataclasses.fields(owner) if f.name == name)


# -- types: one strict check driven by the dataclass fields ---------------------------------------------
def type_problems(values: dict[str, Any]) -> list[str]:
    """Every value whose type is not its RunConfig field's, as ``part.field must be …, got …``.

    ``values`` is nested like config.json (parts as mappings or dataclasses; missing keys take their
    defaults). Strict on purpose: a bool is not an int, a float is not an int, a string is not a list,
    so ``"sparse": "false"`` or ``"epochs": 2.0`` cannot run as something the file does not say. Needs
    no plugin and no strategy registry, so it runs before either.
    """
    hints = _hints(RunConfig)
    out = []
    for key, value in values.items():
        if key in PART_TYPES:
            if dataclasses.is_dataclass(value):
                value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            if not isinstance(value, dict):
                out.append(f"{key} must be a mapping of settings, got {_kind(value)}")
                continue
            part_hints = _hints(PART_TYPES[key])
            out += [_type_error(f"{key}.{k}", part_hints[k], v) for k, v in value.items() if k in part_hints]
        elif key in hints:
            out.append(_type_error(key, hints[key], value))
    return [p for p in out if p]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_error(name: str, hint: Any, value: Any) -> str:
    """'' when ``value`` fits ``hint`` (int, float, bool, str, list[str], dict[str, Any], each maybe None)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if value is None:
        return "" if optional else f"{name} must be {_expected(hint)}, got None"
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        ok = type(value) is int
    elif origin is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif origin is str:
        ok = isinstance(value, str)
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    else:  # a part (a dataclass): checked by type_problems itself
        return ""
    return "" if ok else f"{name} must be {_expected(hint)}, got {_short(value)} ({_kind(value)})"


def _expected(hint: Any) -> str:
    origin = typing.get_origin(hint) or hint
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list of strings", dict: "a mapping"}.get(origin, str(hint))  # fmt: skip


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)  # fmt: skip


def check_types(data: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming ``source`` and the first field of a nested config whose type is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {_kind(data)}")
    wrong = type_problems(data)
    if wrong:
        raise ConfigError(f"{source}: {wrong[0]}")


# -- validation helpers ---------------------------------------------------------------------------------
#: Accelerate's trackers; each is the name of the package it needs (checked before the run starts).
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def _check_trackers(names: list[str] | None) -> list[str]:
    import importlib.util

    out = []
    for name in names or []:
        if name not in TRACKERS:
            out.append(f"report_to: unknown tracker {_short(name)}; choose from {', '.join(TRACKERS)}")
        elif importlib.util.find_spec(name) is None:
            out.append(f"report_to: tracker {name!r} needs its package (pip install {name})")
    return out


def _short(value: Any, limit: int = 60) -> str:
    """A value for an error message: never a whole user structure."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


def _check_choices(part: Any) -> list[str]:
    out = []
    for f in dataclasses.fields(part):
        choices, value = f.metadata.get("choices"), getattr(part, f.name)
        if choices and value not in choices:
            out.append(f"{f.name} must be one of {', '.join(choices)}; got {_short(value)}")
    return out


def _finite(part: Any) -> list[str]:
    return [
        f"{f.name} must be a finite number, got {getattr(part, f.name)}"
        for f in dataclasses.fields(part)
        if isinstance(getattr(part, f.name), float) and not math.isfinite(getattr(part, f.name))
    ]


def _at_least(obj: Any, low: float, *names: str) -> list[str]:
    out = []
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (isinstance(value, (int, float)) and value >= low):
            out.append(f"{name} must be >= {low:g}, got {_short(value)}")
    return out


def _positive(obj: Any, *names: str) -> list[str]:
    out = []
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            out.append(f"{name} must be > 0, got {_short(value)}")
    return out
