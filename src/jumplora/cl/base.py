"""The strategy interface: a context, five hooks, tensor state, and a registry of named strategies.

A strategy is a dataclass whose fields are its hyper-parameters (float, int, bool or str, each with a
default), registered under a name with ``@register_strategy("name")``. It never trains and never
evaluates: the runner builds a :class:`StrategyContext` and calls, per task,

``on_task_start`` (the task's adapter is on ``ctx.model``) → per micro-batch ``loss_term`` (added to the
task loss) and, once per optimizer step, ``after_backward`` (the step's accumulated gradients exist, the
optimizer has not stepped) → ``on_task_end`` (after the sparse merge, with the merged updates; ``None``
while an adapter is shared across tasks).

A strategy reads the current adapter through ``ctx.layers()`` (A, B and the effective ΔW of each adapted
module) rather than PEFT's internals, and sees the data of the tasks up to the current one only.

``adapter_lifecycle`` says whether the runner gives each task a fresh adapter (``"per_task"``, merged
at the task's end) or trains one adapter across the stream (``"shared"``, merged after the last task).
Whatever must survive a restart is returned by ``state_dict`` as tensors (saved with safetensors) and
given back to ``load_state_dict`` before the next hook runs.

This module imports only torch: PEFT loads on the first hook (``jumplora_layers``), so listing the
strategies (``jumplora strategies``, ``--help``) stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from jumplora.adapters import JumpLoraLayer, MergeResult
    from jumplora.models import ModelFamily

__all__ = [
    "LayerView",
    "Strategy",
    "StrategyContext",
    "jumplora_layers",
    "make_strategy",
    "register_strategy",
    "strategy_help",
    "strategy_names",
    "strip_prefix",
]

ArgValue = str | float | int | bool


@dataclass
class StrategyContext:
    """What a hook may look at; built by the runner (``Setup.context``) and passed to every hook."""

    model: nn.Module | None  # the PEFT model being trained (unwrapped); None outside a task
    task_index: int
    task_name: str
    num_tasks: int
    family: ModelFamily  # batch -> loss / predictions
    device: torch.device
    train_features: Sequence[list[dict]]  # tokenised training features of the tasks so far (current one last)
    batch_size: int
    seed: int

    def layers(self) -> list[LayerView]:
        """The current adapter of every adapted module of ``model``, in module order (empty without a model)."""
        if self.model is None:
            return []
        return [LayerView(name, layer) for name, layer in jumplora_layers(self.model)]


class LayerView:
    """One adapted module's current adapter: its factors and its update, without PEFT's adapter keys.

    A view stays valid after the task's merge removed the layer from the model (``on_task_end``)."""

    def __init__(self, name: str, layer: JumpLoraLayer) -> None:
        self.name = name
        self._layer = layer
        self._adapter = layer.active_adapters[0]

    @property
    def A(self) -> torch.Tensor:
        """The (r, in) down-projection being trained."""
        return self._layer.jumplora_A[self._adapter]

    @property
    def B(self) -> torch.Tensor:
        """The (out, r) up-projection being trained."""
        return self._layer.jumplora_B[self._adapter]

    def delta(self, gamma: float | None = None) -> torch.Tensor:
        """The effective update s·ΔW_eff in the (out, in) layout, differentiable; ``gamma=0.0``: ungated s·B·A."""
        return self._layer.effective_delta(self._adapter, gamma=gamma)


@dataclass
class Strategy:
    """A fresh adapter per task, merged at the task's end, no extra loss; subclasses override hooks."""

    name: ClassVar[str] = ""
    adapter_lifecycle: ClassVar[Literal["per_task", "shared"]] = "per_task"

    def on_task_start(self, ctx: StrategyContext) -> None:
        """The task's adapter is on ``ctx.model`` (also called again when a task resumes mid-way)."""

    def loss_term(self, ctx: StrategyContext, batch: dict, task_loss: torch.Tensor) -> torch.Tensor | None:
        """Extra loss added to the task loss of this micro-batch (None: nothing)."""
        return None

    def after_backward(self, ctx: StrategyContext) -> None:
        """Once per optimizer step: the accumulated gradients of its micro-batches exist, the optimizer has
        not stepped yet (nor are they clipped or, under sharding, averaged over processes)."""

    def on_task_end(self, ctx: StrategyContext, merged: MergeResult | None) -> None:
        """The task's update was merged (``merged`` is None while an adapter is shared)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs, as CPU tensors."""
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"strategy {self.name!r} keeps no state, got {sorted(tensors)[:3]}")

    def hparams(self) -> dict[str, ArgValue]:
        """The hyper-parameters (the dataclass fields), e.g. for config.json."""
        return {f.name: getattr(self, f.name) for f in _arg_fields(type(self))}


def jumplora_layers(model: nn.Module) -> Iterator[tuple[str, JumpLoraLayer]]:
    """``jumplora.adapters.jumplora_layers``, imported on first use (PEFT takes seconds to import)."""
    from jumplora.adapters import jumplora_layers as layers

    return layers(model)


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str, strategy: str) -> dict[str, torch.Tensor]:
    """``{prefix + module: t}`` → ``{module: t}`` for ``load_state_dict``; any other key means a wrong file."""
    stray = [k for k in tensors if not k.startswith(prefix)]
    if stray:
        raise ValueError(f"strategy {strategy!r}: unexpected state keys {stray[:3]} (expected {prefix}<module>)")
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


# -- registry ---------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Strategy]] = {}
_TYPES: dict[str, type] = {t.__name__: t for t in (bool, int, float, str)}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
S = TypeVar("S", bound=type[Strategy])


def _arg_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _field_type(f: dataclasses.Field) -> type | None:
    """The field's type; annotations may be strings (``from __future__ import annotations``)."""
    return f.type if f.type in _TYPES.values() else _TYPES.get(str(f.type))


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: register a ``Strategy`` dataclass under ``name`` (re-registering on reload is fine)."""

    def register(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"@register_strategy({name!r}) needs a @dataclass subclass of Strategy, got {cls!r}")
        for f in _arg_fields(cls):
            if _field_type(f) is None:
                raise TypeError(f"strategy {name!r}: field {f.name!r} must be float, int, bool or str, not {f.type}")
            if f.default is dataclasses.MISSING:
                raise TypeError(f"strategy {name!r}: field {f.name!r} needs a default")
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"strategy name {name!r} is already taken by {old.__module__}.{old.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def strategy_names() -> list[str]:
    """Registered names, in registration order (built-ins first)."""
    return list(_REGISTRY)


def _coerce(strategy: str, key: str, kind: type, value: Any) -> ArgValue:
    """``value`` as ``kind``; strings are parsed (CLI ``--strategy-arg key=value``)."""
    out: ArgValue | None = None
    text = value.strip().lower() if isinstance(value, str) else None
    if kind is bool:
        out = value if isinstance(value, bool) else (True if text in _TRUE else False if text in _FALSE else None)
    elif kind is int and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            out = int(value)
        elif text is not None and text.lstrip("+-").isdigit():
            out = int(text)
    elif kind is float and not isinstance(value, bool):
        try:
            out = float(value) if isinstance(value, int | float | str) else None
        except ValueError:
            out = None
        if out is not None and not math.isfinite(out):
            raise ValueError(f"strategy {strategy!r}: argument {key!r} must be a finite number, got {value!r}")
    elif kind is str and isinstance(value, str):
        out = value
    if out is None:
        raise ValueError(f"strategy {strategy!r}: argument {key!r} expects {kind.__name__}, got {value!r}")
    return out


def make_strategy(name: str, args: Mapping[str, ArgValue] | None = None) -> Strategy:
    """Build the strategy ``name`` with ``args`` checked against its fields and coerced to their types."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of: {', '.join(_REGISTRY)} "
            "(a strategy of your own registers when its file is imported: jumplora run --plugin my_strategy.py)"
        )
    cls = _REGISTRY[name]
    fields = {f.name: f for f in _arg_fields(cls)}
    kwargs = {}
    for key, value in (args or {}).items():
        if key not in fields:
            valid = ", ".join(fields) or "(none)"
            raise ValueError(f"strategy {name!r}: unknown argument {key!r}; valid arguments: {valid}")
        kwargs[key] = _coerce(name, key, _field_type(fields[key]), value)
    return cls(**kwargs)


def strategy_help() -> str:
    """Every strategy with its one-line doc, adapter lifecycle, and fields with type, default and help."""
    width = max((len(n) for n in _REGISTRY), default=0)
    lines = []
    for name, cls in _REGISTRY.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        shared = " [one adapter shared across tasks]" if cls.adapter_lifecycle == "shared" else ""
        lines.append(f"{name:<{width}}  {doc}{shared}")
        for f in _arg_fields(cls):
            note = f"  ({f.metadata['help']})" if "help" in f.metadata else ""
            lines.append(f"{'':<{width}}    {f.name}: {_field_type(f).__name__} = {f.default!r}{note}")
    return "\n".join(lines)
