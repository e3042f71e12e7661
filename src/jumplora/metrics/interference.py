"""Function-space interference: how much each later task's merged update raises earlier tasks' gold NLL.

Under IncLoRA the model changes between the evaluation after task ``i-1`` and the one after task ``i``
only by task ``i``'s merged update ``U_i``. So ``L[i, j] - L[i-1, j]`` (``j < i``) is the damage ``U_i``
did to task ``j``, in nats of the gold answer. "Parameter isolation" should lower it *per unit of update*:
a sparse update may forget less simply because it is smaller, so the damage is also reported per unit
of ‖U_i‖_F and per million kept entries of ``U_i``. A run records ‖U_i‖_F and the kept count of each task
in its per-task analytics (``update_norm``, ``kept_entries``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["interference", "nll_increases"]


def nll_increases(L: Sequence[Sequence[float | None]]) -> list[list[float]]:
    """``L[i][j] - L[i-1][j]`` for every earlier task ``j < i`` (row ``i - 1`` for ``i = 1..T-1``)."""
    m = np.asarray([[np.nan if v is None else v for v in row] for row in L], dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"the NLL matrix must be a square T×T matrix with T ≥ 2, got shape {m.shape}")
    return [[float(m[i, j] - m[i - 1, j]) for j in range(i)] for i in range(1, m.shape[0])]


def interference(
    L: Sequence[Sequence[float | None]],
    update_norms: Sequence[float | None] | None = None,
    kept_entries: Sequence[int | None] | None = None,
) -> dict[str, object]:
    """Per later task ``i ≥ 1``: the mean NLL increase it caused on tasks ``j < i``, raw and normalised.

    ``update_norms[i]`` = ‖U_i‖_F and ``kept_entries[i]`` = nnz(U_i) (absent or None: that column is None).
    Summary values are means over tasks ``i ≥ 1``: ``increase`` (nats), ``per_norm`` (nats per unit
    Frobenius norm), ``per_million_entries`` (nats per 10⁶ kept entries).
    """
    rows = nll_increases(L)
    T = len(rows) + 1
    for name, values in (("update_norms", update_norms), ("kept_entries", kept_entries)):
        if values is not None and len(values) != T:
            raise ValueError(f"{name} has {len(values)} values for {T} tasks")
    per_task = []
    for i, row in enumerate(rows, start=1):
        increase = float(np.mean(row))
        norm = None if update_norms is None else update_norms[i]
        kept = None if kept_entries is None else kept_entries[i]
        per_task.append({
            "task": i,
            "increase": increase,
            "per_norm": increase / norm if norm else None,
            "per_million_entries": 1e6 * increase / kept if kept else None,
        })  # fmt: skip
    summary = {key: _mean(per_task, key) for key in ("increase", "per_norm", "per_million_entries")}
    return {"per_task": per_task, **summary}


def _mean(per_task: list[dict], key: str) -> float | None:
    values = [t[key] for t in per_task]
    return None if any(v is None for v in values) else float(np.mean(values))
