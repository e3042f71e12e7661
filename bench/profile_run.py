"""Where the wall time of an end-to-end run goes: phase timers plus a cProfile of the whole run.

    python bench/profile_run.py --out /tmp/prof --tasks dbpedia,amazon --max-train 64   # a short look
    python bench/profile_run.py --out /tmp/prof   # the default order-1 run

Prints seconds spent in set-up (data, tokenisation, model), training, evaluation and saving, then the
top functions by own time and by cumulative time. Any ``RunConfig`` field can be given as
``--field value`` (ints, floats and booleans are parsed; ``--tasks`` takes a comma-separated list).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import time
from collections import defaultdict

from jumplora import ContinualTrainer
from jumplora.config import RunConfig
from jumplora.run.base import Runner
from jumplora.run.record import RunState
from jumplora.train.evaluate import Evaluator

#: (owner, method) → phase; the methods are wrapped on their classes, so every call is timed.
PHASES = {
    (ContinualTrainer, "prepare"): "set-up (data, tokenisation, model)",
    (Runner, "train_task"): "training",
    (Evaluator, "evaluate_all"): "evaluation",
    (RunState, "task_analytics"): "analytics",
}


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--pstats", default=None, help="also dump the raw profile here")
    known, rest = p.parse_known_args()
    overrides = {"strategy": "inclora", "jumplora": True, "out": "/tmp/jumplora_profile"}
    for key, value in zip(rest[::2], rest[1::2], strict=True):
        name = key.lstrip("-").replace("-", "_")
        overrides[name] = value.split(",") if name in ("tasks", "targets") else _parse(value)
    trainer = ContinualTrainer(RunConfig.from_flat(**overrides), quiet=True, overwrite=True)  # always a fresh run

    spent: dict[str, float] = defaultdict(float)
    for owner, method in PHASES:
        original = getattr(owner, method)

        @functools.wraps(original)
        def timed(*args, _original=original, _name=method, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - t0

        setattr(owner, method, timed)

    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    trainer.run()
    profiler.disable()
    total = time.perf_counter() - t0
    print(f"\nwall {total:.1f} s")
    for (_, method), label in PHASES.items():
        print(f"  {label:<40} {spent[method]:7.1f} s")
    print(f"  {'other (checkpoints, merges, plots)':<40} {total - sum(spent.values()):7.1f} s\n")
    stats = pstats.Stats(profiler)
    if known.pstats:
        stats.dump_stats(known.pstats)
    stats.sort_stats("tottime").print_stats(known.top)
    stats.sort_stats("cumulative").print_stats(known.top)


if __name__ == "__main__":
    main()
