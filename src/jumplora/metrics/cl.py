"""Continual-learning metrics computed from the accuracy matrix.

``R[i, j]`` is the accuracy on task ``j`` after training task ``i`` (T×T, full,
including tasks not yet seen). Functions return plain floats so the results can be
dumped to JSON directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ArrayLike = np.ndarray | Sequence[Sequence[float]]
VectorLike = np.ndarray | Sequence[float]

__all__ = [
    "average_accuracy",
    "bwt",
    "cl_metrics",
    "forgetting",
    "fwt",
    "fwt_vs_independent",
    "learning_accuracy",
    "nll_metrics",
]


def _as_matrix(R: ArrayLike) -> np.ndarray:
    """Validate early so a malformed matrix fails loudly instead of giving silent NaNs."""
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be a non-empty square T×T matrix, got shape {m.shape}")
    return m


def _as_vector(v: VectorLike, T: int, name: str) -> np.ndarray:
    x = np.asarray(v, dtype=float)
    if x.shape != (T,):
        raise ValueError(f"{name} must have shape ({T},) to match the {T}×{T} accuracy matrix, got {x.shape}")
    return x


def average_accuracy(R: ArrayLike) -> float:
    """OP / average accuracy: mean over tasks of the accuracy after the final task."""
    m = _as_matrix(R)
    return float(m[-1].mean())


def learning_accuracy(R: ArrayLike) -> float:
    """Mean of the diagonal: how well each task is learned right after training on it."""
    m = _as_matrix(R)
    return float(np.diag(m).mean())


def bwt(R: ArrayLike) -> float:
    """Backward transfer (Lopez-Paz & Ranzato): mean_{j<T-1} R[T-1, j] - R[j, j]; negative = forgetting."""
    m = _as_matrix(R)
    T = m.shape[0]
    if T < 2:
        raise ValueError("BWT needs at least 2 tasks")
    j = np.arange(T - 1)
    return float((m[T - 1, j] - m[j, j]).mean())


def fwt(R: ArrayLike, zero_shot: VectorLike) -> float:
    """Forward transfer (Lopez-Paz & Ranzato) vs. the untrained model.

    mean_{j>=1} R[j-1, j] - zero_shot[j]: how much training on earlier tasks helps a task not yet seen.
    """
    m = _as_matrix(R)
    T = m.shape[0]
    z = _as_vector(zero_shot, T, "zero_shot")
    if T < 2:
        raise ValueError("FWT needs at least 2 tasks")
    j = np.arange(1, T)
    return float((m[j - 1, j] - z[j]).mean())


def fwt_vs_independent(R: ArrayLike, independent: VectorLike) -> float:
    """O-LoRA/ELLA-style FWT vs. training each task alone: mean_j R[j, j] - independent[j].

    Named separately from :func:`fwt` because the two definitions are often conflated in the
    literature and give very different numbers.
    """
    m = _as_matrix(R)
    ind = _as_vector(independent, m.shape[0], "independent")
    return float((np.diag(m) - ind).mean())


def forgetting(R: ArrayLike) -> float:
    """Average forgetting (Chaudhry et al.): mean_{j<T-1} max_{l in [j, T-2]} R[l, j] - R[T-1, j]."""
    m = _as_matrix(R)
    T = m.shape[0]
    if T < 2:
        raise ValueError("forgetting needs at least 2 tasks")
    vals = [m[j : T - 1, j].max() - m[T - 1, j] for j in range(T - 1)]
    return float(np.mean(vals))


def cl_metrics(
    R: ArrayLike,
    zero_shot: VectorLike | None = None,
    independent: VectorLike | None = None,
) -> dict[str, float | None]:
    """All CL metrics at once; ``None`` where a metric is undefined (T=1) or its input is missing.

    Shapes are validated even for metrics that end up ``None``, so a wrong-length
    ``zero_shot`` never slips through on a single-task run.
    """
    m = _as_matrix(R)
    T = m.shape[0]
    if zero_shot is not None:
        _as_vector(zero_shot, T, "zero_shot")
    if independent is not None:
        _as_vector(independent, T, "independent")
    multi = T >= 2
    return {
        "op": average_accuracy(m),
        "bwt": bwt(m) if multi else None,
        "fwt": fwt(m, zero_shot) if multi and zero_shot is not None else None,
        "fwt_vs_independent": fwt_vs_independent(m, independent) if independent is not None else None,
        "forgetting": forgetting(m) if multi else None,
        "learning_accuracy": learning_accuracy(m),
    }


def nll_metrics(L: ArrayLike, zero_shot: VectorLike | None = None) -> dict[str, float | None]:
    """The CL metrics on the gold-answer NLL matrix L (lower is better, so the signs differ from R's).

    - ``final``: mean_j L[T-1, j], the NLL at the end (OP's twin);
    - ``learned``: mean_j L[j, j], right after each task;
    - ``bwt``: mean_{j<T-1} L[T-1, j] - L[j, j]; positive = forgetting (the answers became less likely);
    - ``forgetting``: mean_{j<T-1} L[T-1, j] - min_{l in [j, T-2]} L[l, j];
    - ``fwt``: mean_{j>=1} L[j-1, j] - zero_shot[j]; negative = earlier tasks helped.
    NaN cells (no scorable item) propagate as NaN.
    """
    m = _as_matrix(L)
    T = m.shape[0]
    z = _as_vector(zero_shot, T, "zero_shot") if zero_shot is not None else None
    multi = T >= 2
    j = np.arange(T - 1)
    return {
        "final": float(m[-1].mean()),
        "learned": float(np.diag(m).mean()),
        "bwt": float((m[T - 1, j] - m[j, j]).mean()) if multi else None,
        "forgetting": float(np.mean([m[T - 1, i] - m[i : T - 1, i].min() for i in j])) if multi else None,
        "fwt": float((m[j, j + 1] - z[j + 1]).mean()) if multi and z is not None else None,
    }
