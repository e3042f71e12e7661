"""The public ``ContinualTrainer`` and the runner registry: one configuration run end to end."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from jumplora.build import Setup, build, make_runtime
from jumplora.config import RESUME_FREE_KEYS, RunConfig
from jumplora.lock import RunLock
from jumplora.results import RunResults
from jumplora.run.base import Runner
from jumplora.run.continual import ContinualRunner
from jumplora.run.directory import check_out_dir, check_same_config, has_checkpoint, read_state
from jumplora.run.reference import IndependentRunner, MultitaskRunner

#: ``--runner`` name → runner; each runner carries its name, ``config.RUNNERS`` lists them for the options.
RUNNER_TYPES: dict[str, type[Runner]] = {r.name: r for r in (ContinualRunner, MultitaskRunner, IndependentRunner)}


class ContinualTrainer:
    """Runs one configuration end to end; ``run()`` returns the results also saved to ``config.out``.

    Pass ``model`` and ``tokenizer`` to train a model object you already hold (placed with
    ``device_map``, quantised, …) instead of loading ``config.model.name``. ``resume`` and ``overwrite``
    mean what ``--resume`` and ``--overwrite`` mean: by default a ``config.out`` that already holds a run
    is refused (never silently reused), ``resume=True`` continues it only when its recorded
    configuration equals ``config`` (output-only options aside), ``overwrite=True`` starts it again.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        accelerator: Accelerator | None = None,
        quiet: bool = False,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        if model is not None and tokenizer is None:
            raise ValueError("pass the model's tokenizer with the model object")
        self.config = config
        self.resume, self.overwrite = resume, overwrite
        self._given = (model, tokenizer)
        self.runtime = make_runtime(config, accelerator, quiet, RUNNER_TYPES[config.runner].shard_refusal)
        self.setup: Setup | None = None

    def prepare(self) -> Setup:
        """Load and validate data, model and targets (nothing is written)."""
        if self.setup is None:
            model, tokenizer = self._given
            self.setup = build(self.config, self.runtime, model=model, tokenizer=tokenizer)
        return self.setup

    def check_resumable(self) -> None:
        """Refuse a resume whose configuration differs from the one the checkpoint recorded (config.json)."""
        out = Path(self.config.out)
        if has_checkpoint(out):
            state = read_state(out)
            check_same_config(out, state.get("config"), self.config.to_dict(), RESUME_FREE_KEYS)

    def run(self) -> RunResults:
        """Run the stream (resumed from the checkpoint in ``config.out`` only with ``resume=True``).

        Ends the run's trackers and, under several processes, the process group."""
        check_out_dir(Path(self.config.out), resume=self.resume, overwrite=self.overwrite)
        if self.resume:
            self.check_resumable()
        setup = self.prepare()
        runner = RUNNER_TYPES[self.config.runner](setup)
        accelerator = self.runtime.accelerator
        accelerator.wait_for_everyone()
        # One run per directory: a second run or a live --resume on the same folder is refused here,
        # after every input was validated and before the first write.
        with RunLock(Path(self.config.out)) if self.runtime.is_main else contextlib.nullcontext():
            results = runner.run(not self.resume)
        accelerator.wait_for_everyone()
        # Only once every rank is past its last barrier: trackers are flushed and the process group is
        # destroyed (a gloo group left to the interpreter's exit can abort it).
        accelerator.end_training()
        return results
