"""Test-only fault injection: named points in the run, inert unless the environment arms one.

One mechanism, read from the environment once, at import:

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

``JUMPLORA_TEST_NAN_AT=<task index>:<step>`` arms the ``loss`` point: :func:`poisoned` is true there,
and the engine turns that step's loss into NaN (``step`` counts the steps already taken in the task).
"""

from __future__ import annotations

import os
import signal

KILL_ENV = "JUMPLORA_TEST_KILL_AT"
NAN_ENV = "JUMPLORA_TEST_NAN_AT"
POINTS = ("step", "eval", "checkpoint", "commit", "write", "finish")

_kill_point, _, _kill_count = os.environ.get(KILL_ENV, "").partition(":")
_nan_at = os.environ.get(NAN_ENV, "")
_hits: dict[str, int] = {}


def point(name: str) -> None:
    """Die here if ``$JUMPLORA_TEST_KILL_AT`` names this point and its count is reached."""
    if name != _kill_point:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(_kill_count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def poisoned(task_index: int, step: int) -> bool:
    """Whether ``$JUMPLORA_TEST_NAN_AT`` asks for a NaN loss at this step of this task."""
    return bool(_nan_at) and _nan_at == f"{task_index}:{step}"
