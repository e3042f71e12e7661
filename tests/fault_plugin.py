"""Test-only fault injection, loaded into a CLI run with ``--plugin tests/fault_plugin.py``.

Nothing of it lives in the package: the plugin wraps the package's functions and adds a step hook.

``JUMPLORA_TEST_KILL_AT=<point>[:<n>]`` sends SIGKILL to the process the n-th time (default: the first)
it reaches ``<point>``, which is how the tests simulate ``kill -9`` at a precise moment:

=============  ==========================================================================
``step``       after an optimizer step (and its mid-task checkpoint when one is due)
``eval``       before evaluating one task (mid-evaluation)
``checkpoint`` inside a checkpoint, after the task's files, before ``state.json`` (mid-write)
``commit``     after ``state.json``, before ``results.json``
``write``      inside an atomic write: temporary file complete, not yet renamed
``finish``     after the final plots, before the final ``results.json``
=============  ==========================================================================

``JUMPLORA_TEST_NAN_AT=<task index>:<step>`` makes that step's loss NaN (``step`` counts the steps already
taken in the task).
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jumplora import io
from jumplora.run.directory import RunDirectory
from jumplora.train.evaluate import Evaluator
from jumplora.train.hooks import StepHook, register_step_hook

KILL_ENV = "JUMPLORA_TEST_KILL_AT"
NAN_ENV = "JUMPLORA_TEST_NAN_AT"
POINTS = ("step", "eval", "checkpoint", "commit", "write", "finish")

_kill_point, _, _kill_count = os.environ.get(KILL_ENV, "").partition(":")
_nan_at = os.environ.get(NAN_ENV, "")
_hits: dict[str, int] = {}
if _kill_point and _kill_point not in POINTS:
    raise ValueError(f"${KILL_ENV}: unknown point {_kill_point!r}; choose from {', '.join(POINTS)}")


def point(name: str) -> None:
    """Die here if ``$JUMPLORA_TEST_KILL_AT`` names this point and its count is reached."""
    if name != _kill_point:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(_kill_count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class FaultHook(StepHook):
    """The ``step`` point after each optimizer step; a NaN loss at ``$JUMPLORA_TEST_NAN_AT``."""

    def __init__(self, task_index: int) -> None:
        self.task_index = task_index

    def loss_term(self, batch: dict, task_loss: torch.Tensor, step: int) -> torch.Tensor | None:
        if _nan_at and _nan_at == f"{self.task_index}:{step}":
            return task_loss * float("nan")
        return None

    def after_step(self, task_index: int, step: int) -> None:
        point("step")


def _before(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        point(name)
        return function(*args, **kwargs)

    return wrapped


def _around_commit(commit: Callable[..., Any]) -> Callable[..., Any]:
    """``checkpoint`` before state.json is written (the task's files are), ``commit`` once it is."""

    @functools.wraps(commit)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        point("checkpoint")
        out = commit(*args, **kwargs)
        point("commit")
        return out

    return wrapped


class _OsWithKillBeforeRename:
    """``os`` as jumplora.io sees it: ``replace`` (the rename of an atomic write) passes the ``write`` point."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def replace(src: Any, dst: Any) -> None:
        if Path(src).name.endswith(".tmp"):
            point("write")
        os.replace(src, dst)


register_step_hook(FaultHook)
Evaluator.evaluate = _before("eval", Evaluator.evaluate)  # type: ignore[method-assign]
RunDirectory.finish = _before("finish", RunDirectory.finish)  # type: ignore[method-assign]
RunDirectory._commit = _around_commit(RunDirectory._commit)  # type: ignore[method-assign]
io.os = _OsWithKillBeforeRename()  # type: ignore[assignment]
