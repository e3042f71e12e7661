"""Test-only fault injection; inert unless one of two environment variables is set.

``JUMPLORA_TEST_KILL_AT=<point>[:<n>]`` sends SIGKILL to the process the n-th time (default: the
first) it reaches ``<point>``, which is how the tests simulate ``kill -9`` at a precise moment:

=============  ==========================================================================
``step``       after an optimizer step (mid-task training)
``eval``       before evaluating one task (mid-evaluation)
``checkpoint`` inside a checkpoint, after the task's files, before ``state.json`` (mid-write)
``commit``     after ``state.json``, before ``results.json``
``write``      inside an atomic write: temporary file complete, not yet renamed
``finish``     after the final plots, before the final ``results.json``
=============  ==========================================================================

``JUMPLORA_TEST_NAN_AT=<task index>:<step>`` turns the loss into NaN at that optimizer step of that
task (``step`` counts the steps already taken in the task, from 0).
"""

from __future__ import annotations

import os
import signal
from typing import Any

KILL_ENV = "JUMPLORA_TEST_KILL_AT"
NAN_ENV = "JUMPLORA_TEST_NAN_AT"
POINTS = ("step", "eval", "checkpoint", "commit", "write", "finish")
_hits: dict[str, int] = {}


def point(name: str) -> None:
    """Die here if ``$JUMPLORA_TEST_KILL_AT`` names this point and its count is reached."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_at(task_index: int, step: int) -> bool:
    spec = os.environ.get(NAN_ENV)
    return bool(spec) and spec == f"{task_index}:{step}"


def instrument(trainer: Any) -> None:
    """Route ``trainer.evaluate`` through the ``eval`` kill point (only when that point is armed)."""
    if not os.environ.get(KILL_ENV, "").startswith("eval"):
        return
    evaluate = trainer.evaluate

    def evaluate_with_fault(*args: Any, **kwargs: Any) -> Any:
        point("eval")
        return evaluate(*args, **kwargs)

    trainer.evaluate = evaluate_with_fault
