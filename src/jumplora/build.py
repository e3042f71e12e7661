"""RunConfig → Setup: the accelerator, the stream, the loaded model, every task's data, the peft config and
the strategy, all loaded and checked before anything is written.

What a run *does* with them — train a task, evaluate, merge — is ``jumplora.train``; how tasks follow
each other and what is recorded is ``jumplora.run``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import peft
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from tqdm.auto import tqdm

from jumplora import sharding
from jumplora.adapters.targets import check_target_modules
from jumplora.cl import Strategy, StrategyContext, make_strategy
from jumplora.config import RunConfig
from jumplora.data import Task, TaskStream, load_stream, resolve_stream_source
from jumplora.models import LoadedModel, PromptExample, load_model, wrap_model
from jumplora.precision import Precision, resolve_precision
from jumplora.run.directory import tracking_dir
from jumplora.train.evaluate import Evaluator, TaskData

log = logging.getLogger("jumplora")


def load_task_stream(config: RunConfig) -> TaskStream:
    """The stream a config names (custom file, explicit task list, or a benchmark order)."""
    s = config.stream
    source = resolve_stream_source(s.order, s.stream_file, s.tasks)
    return load_stream(source, s.data_dir, max_train=s.max_train, max_eval=s.max_eval, seed=config.seed,
                       allow_outside_paths=s.allow_outside_paths)  # fmt: skip


@dataclass
class Runtime:
    """The accelerator a run trains on, its precision and sharding (made before anything is loaded)."""

    accelerator: Accelerator
    precision: Precision
    #: "none" or one of jumplora.sharding.BACKENDS: fsdp2 and zero3 shard the base model, zero1 and zero2
    #: partition the adapter's optimizer state (jumplora.sharding).
    shard: str
    quiet: bool = False

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def base_sharded(self) -> bool:
        """Whether every process holds only its part of the base model (its forward passes need them all)."""
        return self.shard in sharding.BASE_BACKENDS

    def progress(self, items: Any, desc: str, **kwargs: Any) -> tqdm:
        """A progress bar on a terminal only: redirected logs get the per-task log lines instead."""
        hidden = self.quiet or not self.is_main or not sys.stderr.isatty()
        return tqdm(items, desc=desc, disable=hidden, leave=False, **kwargs)


def make_runtime(
    config: RunConfig, accelerator: Accelerator | None = None, quiet: bool = False, shard_refusal: str | None = None
) -> Runtime:
    """The run's Accelerator (the caller's when given), its precision and its sharding backend.

    ``shard_refusal``: why the configured runner cannot shard (None: it can)."""
    precision = resolve_precision(config.mixed_precision, config.cpu)
    if accelerator is not None:  # the caller's Accelerator decides
        precision = Precision(config.mixed_precision, accelerator.mixed_precision, "the given Accelerator's")
    else:
        _allow_precision_change(precision.mixed_precision)
    shard = sharding.resolve_shard(config.shard, config.runner, precision.mixed_precision, shard_refusal,
                                   config.checkpoint_every)  # fmt: skip
    config.shard = shard  # config.json says what ran, also when accelerate launch chose it
    with sharding.launcher_sharding_hidden() if shard != "none" else contextlib.nullcontext():
        accelerator = accelerator or Accelerator(
            cpu=config.cpu,
            mixed_precision=precision.mixed_precision,
            gradient_accumulation_steps=config.optim.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            log_with=config.report_to,
            project_dir=str(tracking_dir(config.out)) if config.report_to else None,
        )
    if accelerator.is_main_process:
        log.info("compute precision: %s (%s)", precision.mixed_precision, precision.reason)
    return Runtime(accelerator, precision, shard, quiet)


@dataclass
class Setup:
    """Everything a run's runner needs, loaded and checked: nothing here changes while the run goes on
    except ``base_model``'s weights (each task's update is merged into them)."""

    config: RunConfig
    runtime: Runtime
    stream: TaskStream
    loaded: LoadedModel
    target_modules: list[str] | str
    tasks: list[TaskData]
    base_model: nn.Module
    strategy: Strategy
    evaluator: Evaluator = field(init=False)

    def __post_init__(self) -> None:
        self.evaluator = Evaluator(
            self.loaded.family, self.runtime.accelerator, batch_size=self.config.optim.eval_batch_size,
            sharded=self.runtime.base_sharded, progress=self.runtime.progress,
        )  # fmt: skip

    @property
    def accelerator(self) -> Accelerator:
        return self.runtime.accelerator

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    def peft_config(self) -> peft.PeftConfig:
        return sharding.fit_adapter(self.config.adapter.to_peft(self.target_modules), self.runtime.shard)

    def new_adapter(self, base: nn.Module, task_index: int) -> nn.Module:
        """A fresh adapter on ``base``, drawn from the task's seed."""
        set_seed(self.config.task_seed(task_index))
        return peft.get_peft_model(base, self.peft_config())

    def steps_per_task(self) -> list[int]:
        """Optimizer steps each task takes (for checking a mid-task checkpoint's position)."""
        o = self.config.optim
        return [max(1, math.ceil(math.ceil(len(d.train_features) / o.batch_size) / o.grad_accum)) * o.epochs
                for d in self.tasks]  # fmt: skip

    def context(self, model: nn.Module | None, task_index: int) -> StrategyContext:
        """What the strategy may see at task ``task_index``: the tasks seen so far, never a later one's data."""
        return StrategyContext(
            model=model, task_index=task_index, task_name=self.tasks[task_index].task.name,
            num_tasks=len(self.tasks), family=self.loaded.family, device=self.accelerator.device,
            train_features=[d.train_features for d in self.tasks[: task_index + 1]],
            batch_size=self.config.optim.batch_size, seed=self.config.seed,
        )  # fmt: skip


def build(config: RunConfig, runtime: Runtime, *, model: nn.Module | None = None, tokenizer: Any = None) -> Setup:
    """Load and validate everything (data, model, targets, adapter options) before anything is written.

    ``model``/``tokenizer``: a model object the caller holds, instead of loading ``config.model.name``."""
    stream = load_task_stream(config)
    loaded = _load(config, model, tokenizer)
    limit = loaded.max_positions
    if limit is not None and config.model.max_length > limit:
        raise ValueError(f"max_length {config.model.max_length} exceeds the model's {limit} positions")
    targets = check_target_modules(loaded.model, config.model.targets or loaded.target_modules)
    config.adapter.to_peft(targets)  # validates the adapter options now, not at the first task
    tasks = [task_data(task, stream, loaded, config) for task in stream.tasks]
    base_model = loaded.model.to(runtime.accelerator.device)
    if runtime.shard != "none":
        base_model = sharding.shard_base_model(base_model, runtime.accelerator.device, runtime.shard)
    strategy = make_strategy(config.strategy.name, config.strategy.args)
    return Setup(config, runtime, stream, loaded, targets, tasks, base_model, strategy)


def _load(config: RunConfig, model: nn.Module | None, tokenizer: Any) -> LoadedModel:
    m = config.model
    if model is not None:
        return wrap_model(model, tokenizer, m.family, max_length=m.max_length, rank_options=m.rank_options)
    return load_model(
        m.name, m.family, revision=m.revision, trust_remote_code=m.trust_remote_code,
        max_length=m.max_length, rank_options=m.rank_options, quantize=m.quantize,
    )  # fmt: skip


def task_data(task: Task, stream: TaskStream, loaded: LoadedModel, config: RunConfig) -> TaskData:
    """A task's prompts (candidates: its own options or the whole stream's), tokenised once."""
    candidates = tuple(task.options) if config.stream.option_space == "task" else stream.option_space
    split = config.stream.eval_split

    def examples(name: str) -> list[PromptExample]:
        return [PromptExample(task.prompt(ex.text), ex.label, candidates) for ex in task.split(name)]

    data = TaskData(task, examples("train"), examples(split))
    data.train_features = loaded.family.encode(data.train_examples)
    data.eval_features = loaded.family.encode(data.eval_examples)
    return data


def _allow_precision_change(mixed_precision: str) -> None:
    """Accelerate keeps one precision per process: a run in a process whose earlier run chose another one
    (tests, notebooks, a Python loop over configs) resets the single-process state instead of failing."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", mixed_precision) != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


__all__ = ["Runtime", "Setup", "TaskData", "build", "load_task_stream", "make_runtime"]
